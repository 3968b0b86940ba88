"""Task placement, run by the leader each pass: pending tasks onto nodes, a down node's tasks
to other nodes, a draining node's tasks moved away one at a time, new before old.

Placement is swarm's spread: among the nodes that are ready (their controller is live),
active, match the service's constraints and run fewer than its --replicas-max-per-node, the
one with the fewest tasks of that service, then the fewest tasks, then by name. A task no node
can take stays pending and says why. The decisions are a pure function of the view (plan);
apply writes them with compare-and-swaps, so a decision taken on a stale view is dropped and
taken again on the next pass.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from dataclasses import dataclass

from meshctl.cluster import tasks
from meshctl.model import TASK, Node, Service, Task
from meshctl.store import Conflict, Put, Store
from meshctl.store.changes import MAX_TXN_OPS
from meshctl.view import ClusterView

log = logging.getLogger("meshctl.scheduler")


@dataclass(frozen=True)
class Assign:
    task_id: str
    node: str


@dataclass(frozen=True)
class Pending:
    task_id: str
    reason: str


@dataclass(frozen=True)
class Reschedule:
    """A new task for the slot elsewhere; retire: the old one goes to shutdown at once."""

    task_id: str
    why: str
    retire: bool


@dataclass(frozen=True)
class Retire:
    task_id: str
    why: str


Decision = Assign | Pending | Reschedule | Retire


def ready(task: Task, service: Service) -> bool:
    """A task that can take the place of another: running, and healthy if checked."""
    return task.state == "running" and (service.health is None or task.health == "healthy")


def plan(view: ClusterView, *, judge_down: bool = True) -> list[Decision]:
    """What the leader should change. judge_down: whether nodes without a live controller are
    down (a leader that just started gives them time to come back first)."""
    live_tasks = [t for t in view.tasks.values() if t.desired_state == "running"]
    up = {name for name in view.nodes if name in view.statuses}
    decisions: list[Decision] = []
    for task in sorted(live_tasks, key=lambda t: (t.service, t.slot, t.id)):
        if task.node and task.node not in up and (judge_down or task.node not in view.nodes):
            why = f"node {task.node} is down: rescheduled"
            if task.node not in view.nodes:
                why = f"node {task.node} was removed: rescheduled"
            decisions.append(Reschedule(task.id, why, retire=True))
    decisions += _drain(view, live_tasks, up)
    decisions += _place(view, live_tasks, up)
    return decisions


def _drain(view: ClusterView, live: list[Task], up: set[str]) -> list[Decision]:
    """Per service, one task of a draining node at a time: a replacement is started elsewhere,
    and the old task retired once the replacement is ready."""
    draining = {n.name for n in view.nodes.values() if n.availability == "drain" and n.name in up}
    decisions: list[Decision] = []
    for service in view.services.values():
        mine = [t for t in live if t.service_id == service.id]
        leaving = sorted((t for t in mine if t.node in draining), key=lambda t: t.slot)
        if not leaving:
            continue
        slots = Counter(t.slot for t in mine)
        under_way = [t for t in leaving if slots[t.slot] > 1]
        if not under_way:
            why = f"node {leaving[0].node} is draining: moved"
            decisions.append(Reschedule(leaving[0].id, why, retire=False))
            continue
        old = under_way[0]
        new = next(t for t in mine if t.slot == old.slot and t.id != old.id)
        if new.node not in draining and ready(new, service):
            decisions.append(Retire(old.id, f"node {old.node} is draining: replaced"))
    return decisions


def _place(view: ClusterView, live: list[Task], up: set[str]) -> list[Decision]:
    nodes = sorted(
        (n for n in view.nodes.values() if n.name in up and n.availability == "active"),
        key=lambda n: n.name,
    )
    per_service = Counter((t.service_id, t.node) for t in live if t.node)
    per_node = Counter(t.node for t in live if t.node)
    decisions: list[Decision] = []
    for task in sorted(live, key=lambda t: (t.service, t.slot, t.created_at, t.id)):
        service = view.services.get(task.service_id)
        if task.node or service is None:
            continue
        node, reason = _pick(service, nodes, per_service, per_node)
        if node is None:
            if task.error != reason:
                decisions.append(Pending(task.id, reason))
            continue
        per_service[(service.id, node.name)] += 1
        per_node[node.name] += 1
        decisions.append(Assign(task.id, node.name))
    return decisions


def _pick(
    service: Service,
    nodes: list[Node],
    per_service: Counter[tuple[str, str]],
    per_node: Counter[str],
) -> tuple[Node | None, str]:
    """The node for one more task of service, or None and why none can take it."""
    if not nodes:
        return None, "no suitable node: no node is ready and active"
    constraints = service.placement()
    matching = [n for n in nodes if all(c.matches(n) for c in constraints)]
    if not matching:
        wanted = " and ".join(str(c) for c in constraints)
        return None, f"no suitable node: 0 of {len(nodes)} match {wanted}"
    cap = service.max_replicas_per_node
    room = [n for n in matching if not cap or per_service[(service.id, n.name)] < cap]
    if not room:
        return None, (
            f"no suitable node: {len(matching)} of {len(nodes)} match, and each runs "
            f"{cap} task(s) of {service.name} (--replicas-max-per-node)"
        )
    best = min(room, key=lambda n: (per_service[(service.id, n.name)], per_node[n.name], n.name))
    return best, ""


def apply(store: Store, view: ClusterView, decisions: list[Decision]) -> tuple[bool, str]:
    """Write the decisions; (whether the store changed, "" or why a replacement could not be
    made: its network full, say; the task it would replace keeps running). Task records are
    written in txns of many compare-and-swaps (a placement of 1,000 tasks is a handful of
    requests, not 1,000); a txn that lost a race is written again one record at a time, and a
    record that changed meanwhile is dropped: the next pass decides again on fresh data."""
    now = time.time()
    updated: list[Task] = []
    replacing: list[tuple[Service, int]] = []
    for decision in decisions:
        task = view.tasks.get(decision.task_id)
        if task is None:
            continue
        if isinstance(decision, Assign):
            updated.append(dataclasses.replace(task, node=decision.node, error="").with_event(
                now, "assigned", f"assigned to node {decision.node}"))  # fmt: skip
        elif isinstance(decision, Pending):
            updated.append(dataclasses.replace(task, error=decision.reason).with_event(
                now, "pending", decision.reason))  # fmt: skip
            log.info("task=%s pending: %s", task.name, decision.reason)
        elif isinstance(decision, Reschedule) and not decision.retire:
            if task.service_id in view.services:
                replacing.append((view.services[task.service_id], task.slot))
                log.info("task=%s %s: its replacement is made", task.name, decision.why)
        else:
            # A retired task leaves its slot empty: the orchestrator makes its new task.
            updated.append(dataclasses.replace(task, desired_state="shutdown").with_event(
                now, task.state, decision.why))  # fmt: skip
            log.info("task=%s %s", task.name, decision.why)
    made, problem = tasks.create_or_report(store, replacing) if replacing else (0, "")
    return _write(store, view, updated) or made > 0, problem


def _write(store: Store, view: ClusterView, updated: list[Task]) -> bool:
    """Each task record as updated, compared on the revision the view read; True if any."""
    written = 0
    for start in range(0, len(updated), MAX_TXN_OPS):
        batch = updated[start : start + MAX_TXN_OPS]
        puts = [Put(TASK, t.id, t.to_dict(), expect=view.task_revisions[t.id]) for t in batch]
        try:
            store.txn(puts)
            written += len(batch)
        except Conflict:
            written += sum(_put(store, view, task) for task in batch)
    return written > 0


def _put(store: Store, view: ClusterView, task: Task) -> bool:
    try:
        store.put(TASK, task.id, task.to_dict(), expect=view.task_revisions[task.id])
    except Conflict:
        return False
    return True
