"""The load balancers a node should hold: one LB namespace per network, pure functions of the
cluster view."""

from __future__ import annotations

import ipaddress

from meshctl.lb.endpoints import backends_of
from meshctl.lb.spec import Backend, LbSpec, VirtualIp, lb_spec
from meshctl.model import INGRESS, Task
from meshctl.overlay.vxlan import NO_UNDERLAY, Underlay
from meshctl.router.sync import ROUTER, ROUTER_STARTING
from meshctl.view import ClusterView


def _router_vip(view: ClusterView, node: str) -> tuple[VirtualIp, ...]:
    """The router's VIP on the ingress network (mode ingress): it spreads over the router of
    every node this one reaches that is up and has started its router (a node that just came
    back has none listening until its first pass), as a service's VIP spreads over its tasks."""
    router, ingress = view.router, view.networks.get(INGRESS)
    if router is None or router.vip is None or ingress is None:
        return ()
    backends = tuple(
        Backend(address)
        for (network, owner), address in sorted(view.router_addresses.items())
        if network == INGRESS and (owner == node or (ingress.overlay and _serves(view, owner)))
    )
    return (VirtualIp(router.id, "router", router.vip, backends),)


def _serves(view: ClusterView, node: str) -> bool:
    """Whether node is up and has run a pass since it started: its router has been started (a
    router that fails later may still serve its last good configuration, so it stays)."""
    status = view.statuses.get(node)
    return status is not None and status.errors.get(ROUTER) != ROUTER_STARTING


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
                backends_of(view, tasks_of.get(service.id, []), network.name, node),
            )
            for service in sorted(view.services.values(), key=lambda s: s.name)
            if (vip := service.vips().get(network.name)) is not None
        )
        if network.name == INGRESS:
            vips += _router_vip(view, node)
        mtu = underlay.mtu_of(network)
        specs.append(lb_spec(node_id, network.id, f"{address}/{prefix}", vips, mtu))
    return specs
