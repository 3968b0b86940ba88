"""The leader's slot keeping (swarm's orchestrator): every service has exactly one live task in
each slot 1..replicas, and no task outlives its service.

`service create/scale/rm` only write the service; here the leader makes the task records of
missing slots (pending, unassigned, addressed), drops the ones no node has yet and sends the
others to shutdown (scaled away) or `removed` (service gone). A slot that holds two live tasks
is a replacement under way (a rolling update, a drain): left to the updater and the scheduler,
unless both are equal (same spec, neither leaving a node), when the newer one goes. The
decisions are a pure function of the view (plan); apply writes them in batches.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from meshctl.cluster import tasks
from meshctl.model import DesiredState, Service, Task
from meshctl.store import Store
from meshctl.view import ClusterView

log = logging.getLogger("meshctl.orchestrator")


@dataclass(frozen=True)
class Create:
    service_id: str
    slot: int


@dataclass(frozen=True)
class Drop:
    """A task no node has: its record goes at once."""

    task_id: str


@dataclass(frozen=True)
class Stop:
    """A task a node has: its controller stops it, then forgets it."""

    task_id: str
    goal: DesiredState
    why: str


Decision = Create | Drop | Stop


def plan_tasks(
    service: Service, existing: Iterable[Task], leaving: Collection[str] = ()
) -> tuple[list[int], list[Task]]:
    """(slots to fill, live tasks to remove) so the service has one live task per slot.

    Live tasks are those of this service with desired state `running`. Removed: those in slots
    above replicas, and in a slot with several equal ones (same spec version, none on a node in
    `leaving`) all but the oldest; a slot with a replacement under way keeps both.
    """
    live = sorted(
        (t for t in existing if t.service_id == service.id and t.desired_state == "running"),
        key=lambda t: (t.slot, t.created_at, t.id),
    )
    by_slot: dict[int, list[Task]] = {}
    for task in live:
        by_slot.setdefault(task.slot, []).append(task)
    remove = [t for t in live if t.slot > service.replicas]
    for slot, held in by_slot.items():
        if slot > service.replicas or len(held) < 2:
            continue
        if len({t.spec_version for t in held}) == 1 and not {t.node for t in held} & set(leaving):
            remove += held[1:]
    missing = [slot for slot in range(1, service.replicas + 1) if slot not in by_slot]
    return missing, remove


def plan(view: ClusterView) -> list[Decision]:
    """What the leader changes in task records."""
    leaving = {n.name for n in view.nodes.values() if n.availability == "drain"}
    leaving |= {name for name in view.nodes if not view.up(name)}
    decisions: list[Decision] = []
    for service in sorted(view.services.values(), key=lambda s: s.name):
        missing, remove = plan_tasks(service, view.tasks.values(), leaving)
        decisions += [Create(service.id, slot) for slot in missing]
        decisions += [
            Stop(t.id, "shutdown", "scaled down") if t.node else Drop(t.id) for t in remove
        ]
    for task in sorted(view.tasks.values(), key=lambda t: t.id):
        if task.desired_state == "running" and task.service_id not in view.services:
            decisions.append(
                Stop(task.id, "removed", "service removed") if task.node else Drop(task.id)
            )
    return decisions


def apply(store: Store, view: ClusterView, decisions: list[Decision]) -> tuple[bool, str]:
    """Write the decisions; (whether the store changed, "" or why tasks could not be made).
    A decision that lost a race is dropped: the next pass decides again on fresh data."""
    wanted = [(view.services[d.service_id], d.slot) for d in decisions if isinstance(d, Create)]
    made, problem = tasks.create_or_report(store, wanted) if wanted else (0, "")
    dropping = [
        (view.tasks[d.task_id], view.task_revisions[d.task_id])
        for d in decisions
        if isinstance(d, Drop)
    ]
    dropped = tasks.drop_tasks(store, dropping) if dropping else 0
    stopped = 0
    for d in decisions:
        if isinstance(d, Stop):
            task = view.tasks[d.task_id]
            stopped += tasks.stop_task(store, task, view.task_revisions[d.task_id], d.goal, d.why)
    if made or dropped or stopped:
        log.info("tasks: %d made, %d dropped, %d sent to stop", made, dropped, stopped)
    return bool(made or dropped or stopped), problem
