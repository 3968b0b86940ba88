"""One consistent read of the store, typed: what every reconcile pass works from.

Built from one snapshot (every record at one revision), so the builders below never touch the
store and never see half of a command's writes. A record the model cannot read is left out and
named in `broken`: one bad record must not stop the controller from serving the others.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar, cast

from meshctl import ipam
from meshctl.model import (
    CERTIFICATE,
    CONTAINER,
    INGRESS,
    LEADER,
    LEADER_KEY,
    NETWORK,
    NODE,
    NODE_STATUS,
    ROUTER,
    ROUTER_KEY,
    SERVICE,
    TASK,
    Certificate,
    Container,
    CorruptRecordError,
    Network,
    Node,
    NodeStatus,
    Router,
    Service,
    Task,
    from_record,
)
from meshctl.store import Record, Snapshot, Store

M = TypeVar("M", Network, Service, Task, Node, NodeStatus, Container, Router, Certificate)


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
    statuses: dict[str, NodeStatus] = field(default_factory=dict)  # live nodes' controllers
    leader: str | None = None  # the node that places tasks
    broken: dict[tuple[str, str], str] = field(default_factory=dict)  # (kind, name) → why
    router: Router | None = None  # the HTTP routing mesh, while enabled
    router_addresses: dict[tuple[str, str], str] = field(default_factory=dict)  # as lb_addresses
    certificates: dict[str, Certificate] = field(default_factory=dict)  # the router's, by host

    def up(self, node: str) -> bool:
        """Whether the node's controller is live."""
        return node in self.statuses

    def taking_part(self, node: str) -> set[str]:
        """The networks `node` takes part in: every bridge network (each node's own, made on
        every node so DNS and load balancing never wait for one); an overlay where one of its
        tasks (running, or still being torn down: its record stays until then) or attached
        containers has an address; and the routing mesh's network while a service publishes
        through it, since every node answers published ports."""
        names = {n.name for n in self.networks.values() if not n.overlay}
        names |= {net for t in self.tasks.values() if t.node == node for net in t.addresses}
        names |= {c.network for c in self.containers.values() if c.node == node}
        if any(port.routed for s in self.services.values() for port in s.ports):
            names.add(INGRESS)
        names |= self.router_networks()
        return names & set(self.networks)

    def router_networks(self) -> set[str]:
        """The networks every node's router joins while the router is enabled: the routing
        mesh's, where it is published, and the first network of each service with routes."""
        if self.router is None:
            return set()
        routed = {
            s.networks[0].network for s in self.services.values() if s.hostnames and s.networks
        }
        return ({INGRESS} | routed) & set(self.networks)

    def tasks_on(self, node: str) -> list[Task]:
        return [t for t in self.tasks.values() if t.node == node]

    def service_of(self, task: Task) -> Service | None:
        return self.services.get(task.service_id)


class Decoded:
    """The model objects of the last view, kept by record for the next one: a record whose
    revision has not moved is not decoded again (the objects are frozen). A pass then builds
    only what changed, and leaves the collector only that to scan."""

    def __init__(self) -> None:
        self._objects: dict[tuple[str, str], tuple[int, object]] = {}
        self._seen: set[tuple[str, str]] = set()

    def decode(self, cls: type[M], record: Record) -> M:
        key = (record.kind, record.name)
        self._seen.add(key)
        kept = self._objects.get(key)
        if kept is not None and kept[0] == record.mod_revision and type(kept[1]) is cls:
            return cast(M, kept[1])
        obj = from_record(cls, record)
        self._objects[key] = (record.mod_revision, obj)
        return obj

    def forget_unseen(self) -> None:
        """Drop the objects of records the last view did not hold (deleted ones)."""
        self._objects = {k: v for k, v in self._objects.items() if k in self._seen}
        self._seen = set()


def view_of(snapshot: Snapshot, decoded: Decoded | None = None) -> ClusterView:
    """The typed view of one snapshot of the store (reusing decoded's unchanged objects)."""
    broken: dict[tuple[str, str], str] = {}
    cache = decoded or Decoded()

    def decode(cls: type[M], kind: str, key: Callable[[M], str]) -> dict[str, M]:
        objects: dict[str, M] = {}
        for record in snapshot.of(kind):
            try:
                obj = cache.decode(cls, record)
            except CorruptRecordError as err:
                broken[(record.kind, record.name)] = str(err)
                continue
            objects[key(obj)] = obj
        return objects

    tasks = decode(Task, TASK, lambda t: t.id)
    revisions = {r.name: r.mod_revision for r in snapshot.of(TASK) if r.name in tasks}
    view = ClusterView(
        revision=snapshot.revision,
        networks=decode(Network, NETWORK, lambda n: n.name),
        services=decode(Service, SERVICE, lambda s: s.id),
        tasks=tasks,
        task_revisions=revisions,
        nodes=decode(Node, NODE, lambda n: n.name),
        gateways=ipam.gateways(snapshot),
        lb_addresses=ipam.lb_addresses(snapshot),
        containers=decode(Container, CONTAINER, lambda c: c.name),
        statuses=decode(NodeStatus, NODE_STATUS, lambda s: s.node),
        leader=next(
            (str(r.value.get("node")) for r in snapshot.of(LEADER) if r.name == LEADER_KEY), None
        ),
        broken=broken,
        router=decode(Router, ROUTER, lambda _: ROUTER_KEY).get(ROUTER_KEY),
        router_addresses=ipam.router_addresses(snapshot),
        certificates=decode(Certificate, CERTIFICATE, lambda c: c.host),
    )
    cache.forget_unseen()
    return view


def read_view(store: Store) -> ClusterView:
    """Read the whole desired state once, at one revision."""
    return view_of(store.snapshot())
