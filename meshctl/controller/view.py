"""One consistent read of the store, typed: what every reconcile pass works from.

Read once per pass (one list per kind), so the builders below never touch the store.
"""

from __future__ import annotations

from dataclasses import dataclass

from meshctl import ipam
from meshctl.model import (
    CONTAINER,
    NETWORK,
    NODE,
    SERVICE,
    TASK,
    Container,
    Network,
    Node,
    Service,
    Task,
)
from meshctl.store import Store


@dataclass(frozen=True)
class ClusterView:
    """Networks, services, tasks and nodes as stored, with each task's store revision."""

    revision: int
    networks: dict[str, Network]  # by name
    services: dict[str, Service]  # by id
    tasks: dict[str, Task]  # by id
    task_revisions: dict[str, int]
    nodes: dict[str, Node]  # by name
    gateways: dict[str, str]  # network name → gateway address
    lb_addresses: dict[tuple[str, str], str]  # (network, node) → load-balancer address
    containers: dict[str, Container]  # attached foreign namespaces, by name

    def tasks_on(self, node: str) -> list[Task]:
        return [t for t in self.tasks.values() if t.node == node]

    def service_of(self, task: Task) -> Service | None:
        return self.services.get(task.service_id)


def read_view(store: Store) -> ClusterView:
    """Read the whole desired state once, at one revision (or close to it: a pass re-reads)."""
    revision = store.revision()
    networks = {r.name: Network.from_dict(r.value) for r in store.list(NETWORK)}
    services = {}
    for record in store.list(SERVICE):
        service = Service.from_dict(record.value)
        services[service.id] = service
    task_records = store.list(TASK)
    tasks = {r.name: Task.from_dict(r.value) for r in task_records}
    gateways: dict[str, str] = {}
    lb_addresses: dict[tuple[str, str], str] = {}
    for record in store.list(ipam.KIND):
        state = ipam.IpamState.from_dict(record.value)
        gateways[state.network] = state.gateway
        for address, owner in state.allocations.items():
            if owner.startswith("lb:"):
                lb_addresses[(state.network, owner.removeprefix("lb:"))] = address
    return ClusterView(
        revision=revision,
        networks=networks,
        services=services,
        tasks=tasks,
        task_revisions={r.name: r.mod_revision for r in task_records},
        nodes={r.name: Node.from_dict(r.value) for r in store.list(NODE)},
        gateways=gateways,
        lb_addresses=lb_addresses,
        containers={r.name: Container.from_dict(r.value) for r in store.list(CONTAINER)},
    )
