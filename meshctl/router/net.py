"""The router's namespace on a node and its legs: one per network the router joins.

Desired: a pure function of the view (router_net_spec). A leg is named for its network
(node end `meshr<network-id>`, `mesh-<network-id>` inside), so joining or leaving one network
never touches the legs on the others (a leg's address vanishing would cut the router's
connections through it). The default route goes via the ingress network's gateway: replies
to clients a published port sent without source NAT (mode host). Applied with the task
wiring of controller.node_kernel; legs of networks the router left are deleted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from kernel.links import Link
from kernel.system import Kernel
from meshctl import naming
from meshctl.model import INGRESS
from meshctl.node.desired import TaskLinkSpec, TaskNetSpec, leg
from meshctl.node.kernel import NODE, wire_task
from meshctl.overlay.vxlan import NO_UNDERLAY, Underlay
from meshctl.view import ClusterView


def router_net_spec(
    view: ClusterView, node: str, node_id: str, underlay: Underlay = NO_UNDERLAY
) -> TaskNetSpec | None:
    """The router's namespace on `node` with a leg on each network it joins and holds an
    address on; None while the router is disabled."""
    if view.router is None:
        return None
    links = []
    joined = [
        name
        for name in sorted(view.router_networks(), key=lambda n: (n != INGRESS, n))
        if (name, node) in view.router_addresses
    ]
    for name in joined:
        network = view.networks[name]
        links.append(
            leg(naming.router_veth(network.id), network, naming.container_interface(network.id),
                view.router_addresses[(name, node)], underlay)
        )  # fmt: skip
    gateway = view.gateways.get(INGRESS) if INGRESS in joined else None
    return TaskNetSpec(
        naming.router_id(node_id), naming.router_netns(node_id), tuple(links), gateway
    )


@dataclass(frozen=True)
class RouterNetPlan:
    """What to change: legs to (re)wire, legs to delete (node ends), the namespace to delete;
    legs whose node-end name another's link holds are left alone and named in clashes."""

    netns: str
    wire: tuple[TaskLinkSpec, ...] = ()
    delete_legs: tuple[str, ...] = ()
    delete_netns: bool = False
    create_netns: bool = False
    fix_route: bool = False  # the default route is not via the desired gateway
    clashes: tuple[tuple[str, str | None], ...] = ()

    def __bool__(self) -> bool:
        return bool(
            self.wire
            or self.delete_legs
            or self.delete_netns
            or self.create_netns
            or self.fix_route
            or self.clashes
        )


def plan_router_net(kernel: Kernel, desired: TaskNetSpec | None, node_id: str) -> RouterNetPlan:
    """Compare the router's namespace in the kernel with `desired` (None: none wanted)."""
    netns = naming.router_netns(node_id)
    mark = naming.mark(naming.router_id(node_id))
    exists = kernel.netns.exists(netns)
    ours = {
        link.name: link
        for link in kernel.links.list_links(NODE)
        if link.name.startswith(naming.ROUTER_VETH_PREFIX)
    }
    clashes = tuple(
        (leg.node_end, ours[leg.node_end].alias)
        for leg in (desired.links if desired else ())
        if leg.node_end in ours and ours[leg.node_end].alias != mark
    )
    mine = {name: link for name, link in ours.items() if link.alias == mark}
    wanted = {leg.node_end for leg in desired.links} if desired else set()
    delete = tuple(sorted(name for name in mine if name not in wanted))
    if desired is None:
        return RouterNetPlan(netns, delete_legs=delete, delete_netns=exists)
    taken = {name for name, _ in clashes}
    wire: list[TaskLinkSpec] = []
    fix_route = False
    if exists:
        inside = {link.name: link for link in kernel.links.list_links(netns)}
        addresses: dict[str, list[str]] = {}
        for address in kernel.links.list_addresses(netns):
            addresses.setdefault(address.ifname, []).append(address.cidr)
        gateway = next(
            (r.gateway for r in kernel.links.list_routes(netns) if r.dst == "default"), None
        )
        for want in desired.links:
            if want.node_end in taken:
                continue
            if not _leg_holds(want, mine.get(want.node_end), inside, addresses):
                wire.append(want)
        fix_route = gateway != desired.gateway
    else:
        wire = [leg for leg in desired.links if leg.node_end not in taken]
    return RouterNetPlan(
        netns, wire=tuple(wire), delete_legs=delete, create_netns=not exists,
        fix_route=fix_route, clashes=clashes,
    )  # fmt: skip


def _leg_holds(
    want: TaskLinkSpec,
    node_end: Link | None,
    inside: Mapping[str, Link],
    addresses: Mapping[str, list[str]],
) -> bool:
    """Whether a leg is as wanted: both ends up with the MTU, on its bridge, the address and
    MAC inside."""
    end = inside.get(want.task_end)
    return (
        node_end is not None
        and end is not None
        and node_end.up
        and end.up
        and node_end.master == want.bridge
        and node_end.mtu == want.mtu == end.mtu
        and end.mac == want.mac
        and addresses.get(want.task_end) == [want.address]
        and "lo" in inside
        and inside["lo"].up
    )


def apply_router_net(kernel: Kernel, plan: RouterNetPlan, desired: TaskNetSpec | None) -> None:
    """Carry out the plan: legs deleted first (an address leaving frees it for another leg),
    then the namespace and the legs wired (controller.node_kernel.wire_task)."""
    for name in plan.delete_legs:
        kernel.links.delete_link(NODE, name)
    if plan.delete_netns:
        kernel.netns.delete(plan.netns)
        return
    if desired is not None and (plan.wire or plan.create_netns or plan.fix_route):
        wire_task(kernel, TaskNetSpec(desired.task_id, desired.netns, plan.wire, desired.gateway))


def describe_net(plan: RouterNetPlan) -> list[str]:
    """One line per difference, as `meshctl diff` prints them."""
    lines = [f"! {naming.clash_text(name, alias)}" for name, alias in plan.clashes]
    if plan.create_netns:
        lines.append(f"+ router namespace {plan.netns}")
    lines += [
        f"~ {plan.netns}: leg {leg.task_end} {leg.address} on {leg.bridge}" for leg in plan.wire
    ]
    if plan.fix_route:
        lines.append(f"~ {plan.netns}: default route")
    lines += [f"- router leg {name}" for name in plan.delete_legs]
    if plan.delete_netns:
        lines.append(f"- router namespace {plan.netns}")
    return lines
