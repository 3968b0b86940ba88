"""What the commands and the CLI read: each noun's records from the store, decoded, and the
errors that say where to look when one is missing."""

from __future__ import annotations

from meshctl import ipam
from meshctl.ipam import IpamState
from meshctl.model import (
    CERTIFICATE,
    CONTAINER,
    NETWORK,
    ROUTER,
    ROUTER_KEY,
    SERVICE,
    TASK,
    Certificate,
    Container,
    Network,
    NotFoundError,
    Router,
    Service,
    Task,
    from_record,
)
from meshctl.store import Store


def list_networks(store: Store) -> list[Network]:
    """All networks, sorted by name."""
    return [from_record(Network, r) for r in store.list(NETWORK)]


def get_network(store: Store, name: str) -> Network:
    record = store.get(NETWORK, name)
    if record is None:
        raise NotFoundError(f"network {name} not found; list networks with: meshctl network ls")
    return from_record(Network, record)


def network_ipam(store: Store, network: Network) -> IpamState:
    """The network's address allocations (gateway, VIPs, tasks, load balancers)."""
    return ipam.load(store, network).state


def list_services(store: Store) -> list[Service]:
    """All services, sorted by name."""
    return [from_record(Service, r) for r in store.list(SERVICE)]


def get_service(store: Store, name: str) -> Service:
    return service_record(store, name)[0]


def service_record(store: Store, name: str) -> tuple[Service, int]:
    """The service and its record's mod_revision, for a compare-and-swap."""
    record = store.get(SERVICE, name)
    if record is None:
        raise NotFoundError(f"service {name} not found; list services with: meshctl service ls")
    return from_record(Service, record), record.mod_revision


def list_tasks(store: Store, service: Service | None = None) -> list[Task]:
    """Tasks (of one service, if given), by service name, slot and age."""
    tasks = [from_record(Task, r) for r in store.list(TASK)]
    if service is not None:
        tasks = [t for t in tasks if t.service_id == service.id]
    return sorted(tasks, key=lambda t: (t.service, t.slot, t.created_at, t.id))


def find_task(store: Store, name_or_id: str) -> Task:
    """A task by name (`web.1`: its newest task in that slot) or by id."""
    record = store.get(TASK, name_or_id)
    if record is not None:
        return from_record(Task, record)
    matches = [t for t in list_tasks(store) if t.name == name_or_id]
    if not matches:
        raise NotFoundError(
            f"no service or task named {name_or_id}; list them with: meshctl service ls"
        )
    return max(matches, key=lambda t: t.created_at)


def service_tasks(store: Store, name: str) -> tuple[list[Task], bool]:
    """The tasks `service logs NAME|TASK` shows and whether it named a service (its lines then
    carry a task prefix)."""
    if store.get(SERVICE, name) is not None:
        return list_tasks(store, get_service(store, name)), True
    return [find_task(store, name)], False


def list_containers(store: Store) -> list[Container]:
    return [from_record(Container, r) for r in store.list(CONTAINER)]


def get_router(store: Store) -> Router | None:
    record = store.get(ROUTER, ROUTER_KEY)
    return from_record(Router, record) if record else None


def list_certificates(store: Store) -> list[Certificate]:
    return [from_record(Certificate, r) for r in store.list(CERTIFICATE)]
