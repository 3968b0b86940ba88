"""What each node's router should do: a pure function of the cluster view.

A backend's servers are the tasks' addresses on the network the router reaches the service on
(its first), chosen as the load balancers choose backends (meshctl.lb.endpoints): a
serving task is ready; a running task that is leaving or unhealthy is drained (no new
requests, those in flight finish); any other is left out. So health gating and draining
follow the service, as they do for its VIP.
"""

from __future__ import annotations

import hashlib

from meshctl.lb.endpoints import weights
from meshctl.model import Service
from meshctl.router.spec import (
    Backend,
    BackendMode,
    HttpRoute,
    RouterSpec,
    Server,
    SniRoute,
    backend_name,
    route_order,
)
from meshctl.view import ClusterView


def _servers(view: ClusterView, service: Service, node: str) -> tuple[Server, ...]:
    network = service.networks[0].network
    tasks = (task for task in view.tasks.values() if task.service_id == service.id)
    found = weights(view, tasks, network, node)
    return tuple(sorted(Server(address, weight > 0) for address, weight in found.items()))


def router_spec(view: ClusterView, node: str) -> RouterSpec | None:
    """The router of `node`, or None while the router is disabled."""
    router = view.router
    if router is None:
        return None
    backends: dict[str, Backend] = {}
    routes: list[HttpRoute] = []
    sni: list[SniRoute] = []
    for service in sorted(view.services.values(), key=lambda s: s.name):
        if not service.networks:
            continue
        servers = _servers(view, service, node)
        for route in service.routes():
            name = backend_name(route, service)
            mode: BackendMode = "tcp" if route.tls == "passthrough" else "http"
            backends[name] = Backend(name, service.name, route.port, mode, route.sticky, servers)
            if mode == "tcp":
                sni.append(SniRoute(route.host, name))
            else:
                routes.append(HttpRoute(route.host, route.path, name))
    certificates = sorted(view.certificates.values(), key=lambda c: route_order(c.host, ""))
    digest = hashlib.sha256()
    for cert in certificates:
        digest.update(f"{cert.host}\0{cert.cert}\0{cert.key}\0".encode())
    return RouterSpec(
        http_port=router.http_port,
        https_port=router.https_port,
        cookie_key=router.cookie_key,
        routes=tuple(sorted(routes, key=lambda r: route_order(r.host, r.path))),
        sni_routes=tuple(sorted(sni, key=lambda r: route_order(r.host, ""))),
        backends=tuple(sorted(backends.values(), key=lambda b: b.name)),
        certificates=tuple(c.host for c in certificates),
        certificate_digest=digest.hexdigest()[:16] if certificates else "",
    )
