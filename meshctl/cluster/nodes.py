"""The cluster's nodes as users see them: records, liveness, what keeps a task from serving,
and the write that registers a starting controller's node (meshctl.commands.node: the others).

A node's record (kind node) is what the cluster knows of it for good: its id, the address other
nodes reach it on, labels, availability. Whether it is up is a separate key, its NodeStatus
(kind node-status), which its controller keeps under an expiring lease: no key, node down.
The leader (the controller holding the `leader/scheduler` key) places tasks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from meshctl.model import (
    LEADER,
    LEADER_KEY,
    NODE,
    NODE_STATUS,
    TASK,
    Node,
    NodeState,
    NodeStatus,
    NotFoundError,
    Task,
    check_name,
    from_record,
)
from meshctl.store import Op, Put, Store


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


def task_problem(task: Task, statuses: Mapping[str, NodeStatus]) -> str:
    """What keeps a task from serving, in one line: its own error (why it is pending, how it
    failed), else its node being down, degraded, or failing one of the task's networks."""
    if task.error:
        return task.error
    if not task.node or task.state in ("complete", "failed", "shutdown", "rejected"):
        return ""
    status = statuses.get(task.node)
    if status is None:
        return f"node {task.node} is down"  # what it last said of the task may be stale
    if task.desired_state != "running":
        return ""
    failing = [f"network {n} fails on node {task.node}: {status.errors[n]}"
               for n in sorted(task.addresses) if n in status.errors]  # fmt: skip
    if failing:
        return "; ".join(failing)
    return f"node {task.node} is {status.message}" if status.message else ""


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
