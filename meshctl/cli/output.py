"""What the CLI prints: docker-like tables and the stable JSON documented in docs/cli-json.md.

Pure functions from model objects to text or JSON-able dicts, so the formats are tested
without a store; key names here are a public interface: add keys, never rename or drop them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from meshctl.cluster.nodes import NodeView, task_problem
from meshctl.durations import format_duration, format_time
from meshctl.events import MeshEvent
from meshctl.ipam import IpamState
from meshctl.model import (
    Certificate,
    Network,
    NodeStatus,
    PublishedPort,
    Route,
    Router,
    Service,
    Task,
)


def table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Columns padded to the widest cell with three spaces between, as docker prints them."""
    lines = [list(headers), *([str(cell) for cell in row] for row in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(headers))]
    return "\n".join(
        "   ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def dumps(data: Any) -> str:
    """JSON as printed: two-space indent, keys in the documented order."""
    return json.dumps(data, indent=2)


def key_values(pairs: Iterable[tuple[str, str]]) -> str:
    """`Key:   value` lines, for the table form of inspect."""
    items = list(pairs)
    width = max(len(k) for k, _ in items) + 1
    return "\n".join(f"{(k + ':').ljust(width)} {v}" for k, v in items)


# -- networks --------------------------------------------------------------------------------


def network_json(network: Network, state: IpamState) -> dict[str, Any]:
    return {
        **network.to_dict(),
        "gateway": state.gateway,
        "allocations": [{"address": a, "owner": o} for a, o in sorted(state.allocations.items())],
    }


def network_table(networks: Iterable[Network]) -> str:
    return table(
        ["NETWORK ID", "NAME", "DRIVER", "SUBNET", "INTERNAL"],
        ([n.id, n.name, n.driver, n.subnet, "yes" if n.internal else "no"] for n in networks),
    )


def network_pretty(network: Network, state: IpamState) -> str:
    labels = ",".join(f"{k}={v}" for k, v in network.labels.items())
    return key_values(
        [
            ("ID", network.id),
            ("Name", network.name),
            ("Driver", network.driver + (f" (VNI {network.vni})" if network.vni else "")),
            ("Subnet", network.subnet),
            ("Gateway", state.gateway),
            ("Internal", "yes" if network.internal else "no"),
            ("Labels", labels or "-"),
            ("Addresses in use", str(len(state.allocations))),
        ]
    )


# -- services --------------------------------------------------------------------------------


def _running(service: Service, tasks: Iterable[Task]) -> int:
    return sum(1 for t in tasks if t.service_id == service.id and t.state == "running")


def _ports(ports: Iterable[PublishedPort]) -> str:
    return ", ".join(str(p) for p in ports)


def service_summary_json(service: Service, tasks: Iterable[Task]) -> dict[str, Any]:
    return {
        "id": service.id,
        "name": service.name,
        "mode": "replicated",
        "replicas": service.replicas,
        "running": _running(service, tasks),
        "endpoint_mode": service.endpoint_mode,
        "ports": [p.to_dict() for p in service.ports],
    }


def service_json(service: Service, tasks: Iterable[Task]) -> dict[str, Any]:
    """The whole spec (networks carry their `vip`) plus how many tasks run."""
    return {**service.to_dict(), "mode": "replicated", "running": _running(service, tasks)}


def service_table(services: Iterable[Service], tasks: Sequence[Task]) -> str:
    return table(
        ["ID", "NAME", "MODE", "REPLICAS", "PORTS"],
        (
            [s.id, s.name, "replicated", f"{_running(s, tasks)}/{s.replicas}", _ports(s.ports)]
            for s in services
        ),
    )


def service_pretty(service: Service, tasks: Sequence[Task]) -> str:
    networks = "; ".join(
        f"{a.network}"
        + (f" aliases={','.join(a.aliases)}" if a.aliases else "")
        + (f" vip={a.vip}" if a.vip else "")
        for a in service.networks
    )
    restart = service.restart
    return key_values(
        [
            ("ID", service.id),
            ("Name", service.name),
            ("Version", str(service.version)),
            ("Command", " ".join(service.command)),
            ("Replicas", f"{_running(service, tasks)}/{service.replicas}"),
            ("Endpoint mode", service.endpoint_mode),
            ("Networks", networks or "-"),
            ("Ports", _ports(service.ports) or "-"),
            ("Health check", service.health.describe() if service.health else "-"),
            (
                "Restart policy",
                f"{restart.condition}, delay {format_duration(restart.delay)}, "
                f"max attempts {restart.max_attempts or 'unlimited'}",
            ),
            ("Stop grace period", format_duration(service.stop_grace_period)),
            ("Env", " ".join(f"{k}={v}" for k, v in service.env.items()) or "-"),
            ("Routes", ", ".join(_route(r, service) for r in service.routes()) or "-"),
        ]
    )


def _route(route: Route, service: Service) -> str:
    return f"{route}{' sticky' if route.sticky else ''}"


# -- the router --------------------------------------------------------------------------------


def _router_routes(services: Iterable[Service]) -> list[dict[str, Any]]:
    return [
        {
            "host": r.host,
            "path": r.path,
            "service": s.name,
            "port": r.port,
            "sticky": r.sticky,
            "tls": r.tls,
        }
        for s in services
        for r in s.routes()
    ]


def router_json(
    router: Router,
    services: Iterable[Service],
    certificates: Iterable[Certificate],
    statuses: Mapping[str, NodeStatus],
) -> dict[str, Any]:
    """The router as `router inspect --format json` prints it (never the cookie key)."""
    return {
        "id": router.id,
        "http_port": router.http_port,
        "https_port": router.https_port,
        "publish_mode": router.mode,
        "vip": router.vip,
        "created_at": router.created_at,
        "routes": _router_routes(services),
        "certificates": sorted(c.host for c in certificates),
        "nodes": {
            name: status.errors.get("router", "") for name, status in sorted(statuses.items())
        },
    }


def router_pretty(
    router: Router,
    services: Iterable[Service],
    certificates: Iterable[Certificate],
    statuses: Mapping[str, NodeStatus],
) -> str:
    data = router_json(router, services, certificates, statuses)
    routes = [
        f"{r['host']}{r['path'] if r['path'] != '/' else ''} -> {r['service']}:{r['port']}"
        + (" sticky" if r["sticky"] else "")
        + (" (tls passthrough)" if r["tls"] == "passthrough" else "")
        for r in data["routes"]
    ]
    nodes = [f"{name}: {error or 'ok'}" for name, error in data["nodes"].items()]
    return key_values(
        [
            ("ID", router.id),
            ("Ports", f"http {router.http_port}, https {router.https_port}"),
            ("Publish mode", router.mode + (f" (vip {router.vip})" if router.vip else "")),
            ("Routes", "; ".join(routes) or "-"),
            ("Certificates", ", ".join(data["certificates"]) or "-"),
            ("Nodes", "; ".join(nodes) or "- (no controller is running)"),
        ]
    )


def certificate_json(certificate: Certificate) -> dict[str, Any]:
    return {"host": certificate.host, "created_at": certificate.created_at}


def certificate_table(certificates: Iterable[Certificate]) -> str:
    now = time.time()
    return table(["HOST", "CREATED"], ([c.host, _ago(now, c.created_at)] for c in certificates))


# -- tasks -----------------------------------------------------------------------------------


def task_json(task: Task, statuses: Mapping[str, NodeStatus] | None = None) -> dict[str, Any]:
    return {**task.to_dict(), "problem": task_problem(task, statuses or {})}


def task_table(
    tasks: Iterable[Task],
    now: float | None = None,
    statuses: Mapping[str, NodeStatus] | None = None,
) -> str:
    """docker service ps: a row per task, then (as `\\_ web.1`) its earlier transitions."""
    now = time.time() if now is None else now
    rows: list[list[str]] = []
    for t in tasks:
        current = f"{t.state} {_ago(now, t.updated_at)}" if t.updated_at else t.state
        rows.append(
            [
                t.id,
                t.name,
                t.node or "-",
                t.desired_state,
                current,
                t.health,
                task_problem(t, statuses or {}) or "-",
                ",".join(f"{net}={addr}" for net, addr in t.addresses.items()) or "-",
            ]
        )
        for event in reversed(t.history[:-1]):
            rows.append(
                [
                    "",
                    f" \\_ {t.name}",
                    "",
                    "",
                    f"{event.state} {_ago(now, event.time)}",
                    "",
                    event.message or "-",
                    "",
                ]  # fmt: skip
            )
    return table(
        ["ID", "NAME", "NODE", "DESIRED STATE", "CURRENT STATE", "HEALTH", "ERROR", "ADDRESSES"],
        rows,
    )


def _ago(now: float, then: float) -> str:
    """Docker's "3 seconds ago" in short form."""
    seconds = max(0, int(now - then))
    if seconds < 120:
        return f"{seconds}s ago"
    if seconds < 7200:
        return f"{seconds // 60}m ago"
    return f"{seconds // 3600}h ago"


# -- nodes -----------------------------------------------------------------------------------


def node_json(view: NodeView) -> dict[str, Any]:
    status = view.status
    return {
        **view.node.to_dict(),
        "state": view.state,
        "leader": view.leader,
        "tasks": view.tasks,
        "message": status.message if status else "",
        "errors": dict(status.errors) if status else {},
        "since": status.since if status else None,
    }


def node_table(views: Iterable[NodeView]) -> str:
    """docker node ls: a row per node; MESSAGE says why a live node is degraded."""
    rows = [
        [
            v.node.name,
            v.node.id,
            v.node.address or "-",
            v.state,
            v.node.availability,
            "leader" if v.leader else "",
            str(v.tasks),
            _node_message(v) or "-",
        ]
        for v in views
    ]
    return table(
        ["NAME", "ID", "ADDRESS", "STATUS", "AVAILABILITY", "LEADER", "TASKS", "MESSAGE"], rows
    )


def _node_message(view: NodeView) -> str:
    status = view.status
    if status is None:
        return ""
    failing = [
        f"{n if n == 'router' else 'network ' + n}: {why}"
        for n, why in sorted(status.errors.items())
    ]
    return "; ".join(([status.message] if status.message else []) + failing)


def node_pretty(view: NodeView) -> str:
    node = view.node
    pairs = [
        ("Name", node.name),
        ("ID", node.id),
        ("Address", node.address or "-"),
        ("Status", view.state + (f" ({_node_message(view)})" if _node_message(view) else "")),
        ("Availability", node.availability),
        ("Leader", "yes" if view.leader else "no"),
        ("Tasks", str(view.tasks)),
        ("Labels", ", ".join(f"{k}={v}" for k, v in sorted(node.labels.items())) or "-"),
    ]
    pairs.append(("Load balancer", node.lb_backend or "-"))
    return key_values(pairs)


# -- events ----------------------------------------------------------------------------------


def event_line(event: MeshEvent) -> str:
    """docker events' line: time, type, action, the object, then its attributes."""
    attributes = {"id": event.id, "node": event.node, **event.attributes}
    detail = ", ".join(f"{k}={v}" for k, v in attributes.items() if v)
    return f"{format_time(event.time)} {event.type} {event.action} {event.name}" + (
        f" ({detail})" if detail else ""
    )
