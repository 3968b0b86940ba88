"""The cluster's nodes as users see them: records, liveness, and the `meshctl node` commands.

A node's record (kind node) is what the cluster knows of it for good: its id, the address other
nodes reach it on, labels, availability. Whether it is up is a separate key, its NodeStatus
(kind node-status), which its controller keeps under an expiring lease: no key, node down.
The leader (the controller holding the `leader/scheduler` key) places tasks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from meshctl import ipam
from meshctl.cluster.tasks import drop_task
from meshctl.model import (
    CONTAINER,
    LEADER,
    LEADER_KEY,
    NODE,
    NODE_STATUS,
    TASK,
    Availability,
    Container,
    Node,
    NodeState,
    NodeStatus,
    NotFoundError,
    Task,
    ValidationError,
    check_label,
    check_name,
    from_record,
)
from meshctl.ops import drop_container
from meshctl.store import Delete, Op, Put, Store, retry_conflicts
from meshctl.store.changes import Changes, networks_by_name


@dataclass(frozen=True)
class NodeView:
    """A node as `node ls` shows it: its record, its controller's status if live, leadership."""

    node: Node
    status: NodeStatus | None
    leader: bool
    tasks: int  # tasks assigned to it that should run

    @property
    def state(self) -> NodeState:
        return "ready" if self.status is not None else "down"


def get_node(store: Store, name: str) -> Node:
    record = store.get(NODE, check_name(name, "node name"))
    if record is None:
        raise NotFoundError(f"node {name} not found; list nodes with: meshctl node ls")
    return from_record(Node, record)


def statuses(store: Store) -> dict[str, NodeStatus]:
    """The status of every node whose controller is live, by node name."""
    return {r.name: from_record(NodeStatus, r) for r in store.list(NODE_STATUS)}


def leader(store: Store) -> str | None:
    """The node whose controller places tasks now, if any is live."""
    record = store.get(LEADER, LEADER_KEY)
    return str(record.value.get("node", "")) or None if record is not None else None


def node_views(store: Store) -> list[NodeView]:
    """Every node with its liveness, leadership and number of tasks, sorted by name."""
    live = statuses(store)
    leading = leader(store)
    running: dict[str, int] = {}
    for record in store.list(TASK):
        task = from_record(Task, record)
        if task.node and task.desired_state == "running":
            running[task.node] = running.get(task.node, 0) + 1
    return [
        NodeView(node, live.get(node.name), node.name == leading, running.get(node.name, 0))
        for node in (from_record(Node, r) for r in store.list(NODE))
    ]


def controller_running(store: Store) -> bool:
    """True if some node's controller is live (its status key is there)."""
    return bool(store.list(NODE_STATUS))


def update_node(
    store: Store,
    name: str,
    *,
    availability: Availability | None = None,
    labels_add: Mapping[str, str] | None = None,
    labels_rm: Iterable[str] = (),
) -> Node:
    """Change a node's availability and labels (the leader moves tasks as they require)."""
    for key, value in (labels_add or {}).items():
        check_label(key, value, "--label-add")

    def attempt() -> Node:
        record = store.get(NODE, check_name(name, "node name"))
        if record is None:
            raise NotFoundError(f"node {name} not found; list nodes with: meshctl node ls")
        node = from_record(Node, record)
        labels = {**node.labels, **(labels_add or {})}
        for key in labels_rm:
            if key not in labels:
                raise ValidationError(f"node {name} has no label {key!r}; see meshctl node inspect")
            del labels[key]
        changed = dataclasses.replace(
            node, labels=labels, availability=availability or node.availability
        )
        store.put(NODE, name, changed.to_dict(), expect=record.mod_revision)
        return changed

    return retry_conflicts(attempt, f"updating node {name}")


def remove_node(store: Store, name: str) -> Node:
    """Forget a node that is down: its record, the addresses its load balancers and its router
    held on every network, the records of the tasks it had (the leader has started their
    replacements elsewhere) and of the containers attached on it, with their addresses."""

    def attempt() -> Node:
        record = store.get(NODE, check_name(name, "node name"))
        if record is None:
            raise NotFoundError(f"node {name} not found; list nodes with: meshctl node ls")
        if store.get(NODE_STATUS, name) is not None:
            raise ValidationError(
                f"node {name} is not down and cannot be removed; stop its controller first "
                f"(or drain it: meshctl node update --availability drain {name})"
            )
        node = from_record(Node, record)
        changes = Changes(store)
        networks = networks_by_name(store)
        for network in networks.values():
            changes.release(network, [ipam.lb_owner(name), ipam.router_owner(name)])
        for task_record in store.list(TASK):
            task = from_record(Task, task_record)
            if task.node == name:
                drop_task(changes, task, task_record.mod_revision, networks)
        for container_record in store.list(CONTAINER):
            container = from_record(Container, container_record)
            if container.node == name:
                drop_container(changes, container, container_record.mod_revision, networks)
        changes.ops.append(Delete(NODE, name, expect=record.mod_revision))
        changes.commit()
        return node

    return retry_conflicts(attempt, f"removing node {name}")


def register_ops(node: Node, existing: Node | None, revision: int) -> list[Op]:
    """The write that records a starting controller's node: its id, labels and availability
    are kept from an earlier start; its address and load-balancer backend are the ones it
    runs with now."""
    if existing is None:
        return [Put(NODE, node.name, node.to_dict(), expect=0)]
    kept = dataclasses.replace(
        existing,
        address=node.address or existing.address,
        lb_backend=node.lb_backend or existing.lb_backend,
    )
    if kept == existing:
        return []
    return [Put(NODE, node.name, kept.to_dict(), expect=revision)]
