"""The node's networking in the kernel: observe it in the shape of node.NodeSpec, apply a plan.

Only objects that carry meshctl's mark are taken as its own: links whose alias is
`meshctl:<object-id>` (bridges, task and container veths), iptables chains `MESH-*` and their
commented jumps, and the namespaces `mesh-t-<task-id>` of tasks the store puts on this node or
that have a marked leg here. Another's link with a name meshctl uses is observed only as a
name and an alias, so that the plan can report the clash; it is never changed or deleted.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection, Iterable, Mapping

from kernel.errors import KernelError
from kernel.iptables_rules import OwnedTable
from kernel.links import Link, NamespaceLinks, Route
from kernel.system import Kernel
from meshctl import naming, sysctls
from meshctl.node.desired import (
    BridgeSpec,
    NodePlan,
    NodeSpec,
    TaskLinkSpec,
    TaskNetSpec,
    ports_in_use,
    published_ports,
)
from meshctl.node.task_dns import NAT_REDIRECT, TaskDns, observe_dns
from meshctl.overlay.vxlan import (
    OverlaySpec,
    apply_peers,
    ensure_overlay,
    observe_overlays,
)
from meshctl.view import ClusterView

log = logging.getLogger("meshctl.node")

NODE = None  # the controller's own namespace
TABLES = ("filter", "nat")
LEG_INDEXES = range(16)  # one hex digit in a task veth's name: at most 16 networks a task


def observe_node(
    kernel: Kernel,
    containers: Iterable[TaskNetSpec] = (),
    known: Mapping[str, TaskNetSpec] | None = None,
    mine: Collection[str] = (),
    known_tables: Mapping[str, OwnedTable] | None = None,
    task_dns: TaskDns = NAT_REDIRECT,
    known_overlays: Mapping[str, OverlaySpec] | None = None,
    node: NamespaceLinks | None = None,
) -> tuple[NodeSpec, list[str]]:
    """What the node has now, and the meshctl links on it that belong to nothing.

    Only marked links count as bridges, legs or strays; the alias of every `mesh*` link goes
    into link_aliases. Task namespaces are found by their name, and are this node's when the
    store puts the task here (`mine`) or a marked leg of it ends in this node: other nodes on
    the same host (test nodes, benches) keep theirs. Attached containers' namespaces belong to
    other runtimes and cannot be listed, so the ones desired are looked at where they should be.
    A present task namespace listed in `known` is taken to hold what it says, unread, and so
    are the node's own rules when `known_tables` is given, and the entries of the overlay
    devices in known_overlays: the controller passes what it wired or saw converged and is not
    yet due to be read again; `node` is the node's own links and addresses when the controller
    read them since anything changed (read_node). task_dns: the node's DNS redirect, whose
    rules (and those of the redirects it replaces) are read in each task namespace.
    """
    known = known or {}
    node = read_node(kernel) if node is None else node
    listed = node.links
    link_aliases = {link.name: link.alias for link in listed if naming.could_be_ours(link.name)}
    node_links = {link.name: link for link in listed if naming.is_marked(link.alias)}
    addresses: dict[str, list[str]] = {}
    for address in node.addresses:
        addresses.setdefault(address.ifname, []).append(address.cidr)
    bridges = {
        name: BridgeSpec(name, _only(addresses.get(name, [])), link.alias or "", link.up, link.mtu)
        for name, link in node_links.items()
        if link.kind == "bridge"
    }
    vxlans = [link for link in node_links.values() if link.vxlan is not None]
    overlays = observe_overlays(kernel, vxlans, known_overlays)
    tasks: dict[str, TaskNetSpec] = {}
    for ns in kernel.netns.list_namespaces(naming.TASK_NETNS_PREFIX):
        task_id = ns.removeprefix(naming.TASK_NETNS_PREFIX)
        if task_id not in mine and not _has_leg_here(task_id, node_links):
            continue
        trusted = known.get(task_id)
        tasks[task_id] = trusted or _observe_task(kernel, task_id, ns, node_links, task_dns)
    for container in containers:
        if os.path.exists(container.netns):
            tasks[container.task_id] = _observe_container(kernel, container, node_links)
    claimed = {link.node_end for t in tasks.values() for link in t.links}
    # Marked task and container veths; the LB legs (also marked veths) are the LB's.
    legs = (naming.TASK_VETH_PREFIX, naming.CONTAINER_VETH_PREFIX)
    stray = [
        name
        for name, link in node_links.items()
        if link.kind == "veth" and name.startswith(legs) and name not in claimed
    ]
    if known_tables is not None:
        tables = dict(known_tables)
    else:
        tables = {table: kernel.iptables.list_owned(NODE, table) for table in TABLES}
    spec = NodeSpec(
        bridges=bridges, tasks=tasks, tables=tables, link_aliases=link_aliases, overlays=overlays
    )
    return spec, stray


def read_node(kernel: Kernel) -> NamespaceLinks:
    """The node's own links and addresses, without its routes (a host's table may be large)."""
    return kernel.links.read_namespace(NODE, routes=False)


def _has_leg_here(task_id: str, node_links: Mapping[str, Link]) -> bool:
    return any(naming.task_veth(task_id, index) in node_links for index in LEG_INDEXES)


def _only(cidrs: list[str]) -> str:
    """A bridge's address if it has exactly one; anything else differs from every desired one."""
    return cidrs[0] if len(cidrs) == 1 else ",".join(sorted(cidrs))


def _observe_task(
    kernel: Kernel, task_id: str, ns: str, node_links: Mapping[str, Link], task_dns: TaskDns
) -> TaskNetSpec:
    """A task's namespace as it is; node_links are the node's marked links; task_dns: the
    node's DNS redirect."""
    found = kernel.links.read_namespace(ns)
    inside = {link.name: link for link in found.links}
    addresses: dict[str, list[str]] = {}
    for address in found.addresses:
        addresses.setdefault(address.ifname, []).append(address.cidr)
    links = []
    for index in LEG_INDEXES:
        task_end = naming.task_interface(index)
        node_end = naming.task_veth(task_id, index)
        node_link = node_links.get(node_end)
        if task_end not in inside and node_link is None:
            continue
        links.append(
            TaskLinkSpec(
                node_end=node_end if node_link is not None and node_link.up else "",
                bridge=(node_link.master or "") if node_link is not None else "",
                task_end=task_end
                if task_end in inside and inside[task_end].up and _lo_up(inside)
                else "",
                address=_only(addresses.get(task_end, [])),
                mac=inside[task_end].mac if task_end in inside else "",
                mtu=_mtu(node_link, inside.get(task_end)),
            )
        )
    gateway = next((r.gateway for r in found.routes if r.dst == "default"), None)
    dns = observe_dns(task_dns, kernel, ns)
    return TaskNetSpec(task_id, ns, tuple(links), gateway, dns=dns)


def _observe_container(
    kernel: Kernel, container: TaskNetSpec, node_links: Mapping[str, Link]
) -> TaskNetSpec:
    """An attached container's leg as it is; node_links are the node's marked links."""
    (want,) = container.links
    inside = {link.name: link for link in kernel.links.list_links(container.netns)}
    node_link = node_links.get(want.node_end)
    link = TaskLinkSpec(
        node_end=want.node_end if node_link is not None and node_link.up else "",
        bridge=(node_link.master or "") if node_link is not None else "",
        task_end=want.task_end if want.task_end in inside and inside[want.task_end].up else "",
        address=_only(
            [a.cidr for a in kernel.links.list_addresses(container.netns, want.task_end)]
            if want.task_end in inside
            else []
        ),
        mac=inside[want.task_end].mac if want.task_end in inside else "",
        mtu=_mtu(node_link, inside.get(want.task_end)),
    )
    return TaskNetSpec(container.task_id, container.netns, (link,), None, owns_netns=False)


def _mtu(node_end: Link | None, task_end: Link | None) -> int:
    """A leg's MTU: its ends' when they agree (0 when they do not, or an end is missing)."""
    if node_end is None or task_end is None or node_end.mtu != task_end.mtu:
        return 0
    return task_end.mtu


def _lo_up(inside: dict[str, Link]) -> bool:
    return "lo" in inside and inside["lo"].up


def apply_node(kernel: Kernel, plan: NodePlan) -> dict[str, str]:
    """Carry out a node plan; every step is an ensure or a delete, so a retry is safe.
    A clash is only reported: the link is another's. One bridge or task that cannot be set up
    must not stop the others: returns what failed (bridge name or task namespace → error),
    and the next pass tries again."""
    failed: dict[str, str] = {}
    for name, alias in plan.clashes:
        log.warning("%s", naming.clash_text(name, alias))
    for device in plan.delete_overlays:
        kernel.links.delete_link(NODE, device)
    for bridge in plan.ensure_bridges:
        try:
            _ensure_bridge(kernel, bridge)
        except KernelError as err:
            failed[bridge.name] = str(err)
    for overlay in plan.ensure_overlays:
        try:
            ensure_overlay(kernel, overlay)
        except KernelError as err:
            failed[overlay.bridge] = f"its VXLAN device {overlay.device}: {err}"
    for peers in plan.peers:
        try:
            apply_peers(kernel, peers)
        except KernelError as err:
            failed[naming.bridge(peers.device.removeprefix(naming.VXLAN_PREFIX))] = (
                f"the peers of its VXLAN device {peers.device}: {err}"
            )
    if plan.tables:
        kernel.iptables.apply_tables(NODE, plan.tables)
    for task in plan.wire_tasks:
        try:
            wire_task(kernel, task)
        except KernelError as err:
            failed[task.netns] = str(err)
    for ns, change in plan.task_dns:
        try:
            change.apply(kernel, ns)
        except KernelError as err:
            failed[ns] = f"cannot set its DNS redirect: {err}"
    for name in plan.delete_links:
        kernel.links.delete_link(NODE, name)
    for ns in plan.unwire_tasks:
        kernel.netns.delete(ns)
    for what, why in failed.items():
        log.warning("cannot set up %s: %s", what, why)
    return failed


def _ensure_bridge(kernel: Kernel, bridge: BridgeSpec) -> None:
    kernel.links.ensure_bridge(NODE, bridge.name, alias=bridge.mark)
    kernel.links.set_mtu(NODE, bridge.name, bridge.mtu)  # after its creation: it sticks then
    _set_addresses(kernel, NODE, bridge.name, [bridge.address])
    kernel.links.set_up(NODE, bridge.name)


def _set_addresses(kernel: Kernel, ns: str | None, ifname: str, wanted: Iterable[str]) -> None:
    wanted = list(wanted)
    for address in kernel.links.list_addresses(ns, ifname):
        if address.cidr not in wanted:
            kernel.links.delete_address(ns, ifname, address.cidr)
    for cidr in wanted:
        kernel.links.ensure_address(ns, ifname, cidr)


def wire_task(kernel: Kernel, task: TaskNetSpec) -> None:
    """A task's namespace with lo up, a veth per network onto its bridge, the default route."""
    if task.owns_netns:
        kernel.netns.create(task.netns)
        kernel.links.set_up(task.netns, "lo")
    for link in task.links:
        kernel.links.ensure_veth(
            NODE, link.node_end, link.task_end, task.netns, alias=naming.mark(task.task_id),
            peer_mac=link.mac or None, mtu=link.mtu,
        )  # fmt: skip
        kernel.links.set_master(NODE, link.node_end, link.bridge)
        kernel.links.set_up(NODE, link.node_end)
        # Up before its address: once the address shows, the leg carries packets (a ping right
        # after it appeared could find the link still down).
        kernel.links.set_up(task.netns, link.task_end)
        _set_addresses(kernel, task.netns, link.task_end, [link.address])
    if not task.owns_netns:
        return
    for route in kernel.links.list_routes(task.netns):
        if route.dst == "default" and route.gateway != task.gateway:
            kernel.links.delete_route(task.netns, route)
    if task.gateway is not None:
        kernel.links.ensure_route(task.netns, Route("default", gateway=task.gateway))
    for setting in task.dns.settings:
        kernel.sysctl.set(task.netns, setting.key, setting.value)
    task.dns.make(kernel, task.netns)


def set_node_sysctls(kernel: Kernel) -> None:
    """The node namespace's kernel parameters (meshctl.sysctls lists them: ip_forward)."""
    for key, value in sysctls.node_sysctls().items():
        kernel.sysctl.set(NODE, key, value)


def empty_tables() -> dict[str, OwnedTable]:
    return {table: OwnedTable() for table in TABLES}


def blocked_ports(kernel: Kernel, view: ClusterView, nat: OwnedTable) -> set[tuple[int, str]]:
    """Published ports another process of the node holds; a port that the node's MESH-INGRESS
    chain (`nat`, as observed) already catches stays meshctl's."""
    wanted = set(published_ports(view))
    if not wanted:
        return set()
    return (set(kernel.sockets.bound_ports(NODE)) & wanted) - ports_in_use(nat)
