"""What load balancing and DNS should know of the cluster: pure functions of the cluster view.

A task joins its service's VIP and its DNS answers only when it runs and is healthy (or the
service has no check). A task that is leaving (scaled away, updated, removed) or unhealthy
stays a VIP backend with weight 0 while its process runs: no new connections, established
ones continue; it is taken out when its process has stopped.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from meshctl.controller.overlay import NO_UNDERLAY, Underlay
from meshctl.controller.view import ClusterView
from meshctl.dns import DnsPort, DnsService, DnsTask, DnsView
from meshctl.lb.spec import Backend, LbSpec, VirtualIp, lb_spec
from meshctl.model import INGRESS, Task


def serving(task: Task) -> bool:
    """Whether the task gets new connections and appears in DNS answers."""
    return (
        task.desired_state == "running"
        and task.state == "running"
        and task.health in ("none", "healthy")
    )


def backend_weight(task: Task) -> int | None:
    """1 serving, 0 draining (running but leaving or unhealthy), None not a backend at all."""
    if serving(task):
        return 1
    if task.state == "running" and task.pid is not None and task.health != "starting":
        return 0
    return None


def reachable(view: ClusterView, task: Task, network: str, node: str) -> bool:
    """Whether `node` can send to the task on the network: it runs there, or on another node
    that is up, on a network that spans nodes (a bridge network is one node's own)."""
    if task.node == node:
        return True
    if not task.node or not view.up(task.node):
        return False
    net = view.networks.get(network)
    return net is not None and (net.driver != "bridge" or task.node == node)


def _backends(
    view: ClusterView, tasks: Iterable[Task], network: str, node: str
) -> tuple[Backend, ...]:
    """A VIP's backends on one network: the addresses of the service's tasks (`tasks`) that
    node reaches, each with its weight."""
    backends: dict[str, int] = {}
    for task in tasks:
        if network not in task.addresses:
            continue
        if not reachable(view, task, network, node):
            continue
        weight = backend_weight(task)
        if weight is None:
            continue
        address = task.addresses[network]
        # A slot being replaced may briefly have two tasks; an address is one backend.
        backends[address] = max(weight, backends.get(address, 0))
    return tuple(Backend(address, weight) for address, weight in sorted(backends.items()))


def _router_vip(view: ClusterView, node: str) -> tuple[VirtualIp, ...]:
    """The router's VIP on the ingress network (mode ingress): it spreads over the router of
    every node this one reaches that is up, as a service's VIP spreads over its tasks."""
    router, ingress = view.router, view.networks.get(INGRESS)
    if router is None or router.vip is None or ingress is None:
        return ()
    backends = tuple(
        Backend(address)
        for (network, owner), address in sorted(view.router_addresses.items())
        if network == INGRESS and (owner == node or (ingress.overlay and view.up(owner)))
    )
    return (VirtualIp(router.id, "router", router.vip, backends),)


def lb_specs(
    view: ClusterView, node: str, node_id: str, underlay: Underlay = NO_UNDERLAY
) -> list[LbSpec]:
    """One LB namespace per network the node takes part in and has its LB address on, with
    its services' VIPs."""
    specs = []
    taking_part = view.taking_part(node)
    tasks_of: dict[str, list[Task]] = {}  # by service id: each VIP reads its own tasks only
    for task in view.tasks.values():
        tasks_of.setdefault(task.service_id, []).append(task)
    for network in sorted(view.networks.values(), key=lambda n: n.name):
        address = view.lb_addresses.get((network.name, node))
        if address is None or network.name not in taking_part:
            continue
        prefix = ipaddress.IPv4Network(network.subnet).prefixlen
        vips = tuple(
            VirtualIp(
                service.id,
                service.name,
                vip,
                _backends(view, tasks_of.get(service.id, []), network.name, node),
            )
            for service in sorted(view.services.values(), key=lambda s: s.name)
            if (vip := service.vips().get(network.name)) is not None
        )
        if network.name == INGRESS:
            vips += _router_vip(view, node)
        mtu = underlay.mtu_of(network)
        specs.append(lb_spec(node_id, network.id, f"{address}/{prefix}", vips, mtu))
    return specs


def dns_view(view: ClusterView, node: str) -> DnsView:
    """Every name the embedded DNS of `node` answers, for every network but ingress (as in
    Docker, the routing mesh's network carries published traffic only, no discovery); a task
    is known on the networks where `node` reaches it."""
    services = tuple(
        DnsService(
            name=service.name,
            mode=service.endpoint_mode,
            vips={n: vip for n, vip in service.vips().items() if n != INGRESS},
            aliases={a.network: a.aliases for a in service.networks if a.aliases},
            ports=tuple(sorted({DnsPort(p.target, p.protocol) for p in service.ports}, key=str)),
        )
        for service in sorted(view.services.values(), key=lambda s: s.name)
    )
    live = {s.id for s in view.services.values()}
    tasks = tuple(
        DnsTask(
            task.name,
            task.service,
            {
                n: a
                for n, a in task.addresses.items()
                if n != INGRESS and reachable(view, task, n, node)
            },
            healthy=serving(task),
        )
        for task in sorted(view.tasks.values(), key=lambda t: (t.name, t.id))
        if task.service_id in live and task.desired_state == "running"
    )
    # Records only for the networks this node takes part in (as swarm does: less to hold, and
    # nothing of a network none of its tasks is on).
    networks = frozenset(view.taking_part(node)) - {INGRESS}
    return DnsView(networks=networks, services=services, tasks=tasks)
