"""What the embedded DNS of a node answers: a pure function of the cluster view."""

from __future__ import annotations

from meshctl.dns import DnsPort, DnsService, DnsTask, DnsView
from meshctl.lb.endpoints import reachable, serving
from meshctl.model import INGRESS
from meshctl.view import ClusterView


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
