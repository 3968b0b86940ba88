"""What `service create/update/scale/rm` show while they wait (no --detach): each slot's task
on its way to running, as docker's `1/3: running [=====>   ]`, and why it is stuck.

`watch` reads the store every POLL_INTERVAL and yields where the services stand until they
converged, one cannot, or the time is up. The rest are pure functions of the store's records:
`progress` says where each slot stands, `bars` draws docker's lines, `stuck` gives each
unconverged slot's reason. A slot has converged when its
task of the service's current version runs (healthy, if the service has a check) and has
stayed running, with the same process, for `STABLE` seconds of the CLI's own clock; tasks
being stopped (scaled away, replaced, their service removed) must have stopped.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from meshctl.cluster.nodes import statuses as node_statuses
from meshctl.cluster.nodes import task_problem
from meshctl.commands.read import get_service, list_tasks
from meshctl.model import MeshctlError, NodeStatus, Service, Task
from meshctl.store import Store

POLL_INTERVAL = 0.5  # seconds between two looks at the store
STABLE = 1.0  # seconds a task must keep running (docker's monitor period is 5 s)
STAGES = ("pending", "assigned", "starting", "running")
BAR = 50


@dataclass(frozen=True)
class Slot:
    """One slot of a service as the wait sees it."""

    slot: int
    task: Task | None  # the task of the current version that should run there, if made yet
    stage: int  # 0 (no task) .. len(STAGES) + 1 (converged)
    label: str  # what the line says: pending, running, unhealthy, failed...
    problem: str  # why it is not converged ("" when it is, or when nothing is wrong yet)
    final: bool = False  # it ended and its restart policy starts it no more: no waiting helps


@dataclass(frozen=True)
class Progress:
    name: str
    slots: tuple[Slot, ...]
    leaving: tuple[Task, ...]  # tasks still running that must stop
    removed: bool = False  # the service is gone: only its tasks' stop is awaited

    @property
    def done(self) -> int:
        return sum(1 for s in self.slots if s.stage > len(STAGES))

    @property
    def converged(self) -> bool:
        return self.done == len(self.slots) and not self.leaving

    @property
    def hopeless(self) -> bool:
        """A slot's task has ended for good: waiting longer cannot converge."""
        return any(s.final for s in self.slots)


def watch(
    store: Store, names: Sequence[str], ids: Mapping[str, str], timeout: float
) -> Iterator[list[Progress]]:
    """Where the services stand, every POLL_INTERVAL, until all converged, one has a task that
    ended for good, or timeout seconds passed: the last list yielded says which. ids: service
    name → id (a removed one's, to find its tasks)."""
    deadline = time.monotonic() + timeout
    seen: dict[tuple[str, int | None], float] = {}  # (task, pid) → when first seen running
    while True:
        now = time.monotonic()
        statuses = node_statuses(store)
        tasks = list_tasks(store)
        for task in tasks:
            if task.state == "running":
                seen.setdefault((task.id, task.pid), now)
        views = []
        for name in names:
            try:
                service: Service | None = get_service(store, name)
            except MeshctlError:
                service = None  # removed (rm, or meanwhile)
            sid = service.id if service is not None else ids[name]
            mine = [t for t in tasks if t.service_id == sid]
            views.append(progress(name, service, mine, statuses, seen, now))
        yield views
        if now > deadline or all(v.converged for v in views) or any(v.hopeless for v in views):
            return
        time.sleep(POLL_INTERVAL)


def _running(task: Task) -> bool:
    return task.state in ("running", "starting") or task.pid is not None


def progress(
    name: str,
    service: Service | None,
    tasks: Sequence[Task],
    statuses: Mapping[str, NodeStatus],
    running_since: Mapping[tuple[str, int | None], float],
    now: float,
) -> Progress:
    """Where the service's slots stand. running_since: when the CLI first saw each (task id,
    pid) running, so a crash loop never looks converged between two restarts."""
    if service is None:
        return Progress(name, (), tuple(t for t in tasks if _running(t)), removed=True)
    current = {
        t.slot: t
        for t in sorted(tasks, key=lambda t: t.created_at)
        if t.desired_state == "running" and t.spec_version == service.version
    }
    slots = []
    for number in range(1, service.replicas + 1):
        task = current.get(number)
        slots.append(_slot(number, task, service, statuses, running_since, now))
    wanted = {s.task.id for s in slots if s.task is not None}
    leaving = tuple(
        t for t in tasks if t.id not in wanted and t.desired_state != "running" and _running(t)
    )
    return Progress(name, tuple(slots), leaving)


def _slot(
    number: int,
    task: Task | None,
    service: Service,
    statuses: Mapping[str, NodeStatus],
    running_since: Mapping[tuple[str, int | None], float],
    now: float,
) -> Slot:
    if task is None:
        return Slot(number, None, 0, "new", "no task made yet (is a leader running?)")
    problem = task_problem(task, statuses)
    if task.state == "running":
        if task.health == "unhealthy":
            return Slot(number, task, len(STAGES), "unhealthy", problem or "unhealthy")
        if service.health is not None and task.health != "healthy":
            return Slot(number, task, len(STAGES), "running", problem or "not healthy yet")
        since = running_since.get((task.id, task.pid))
        if since is None or now - since < STABLE:
            return Slot(number, task, len(STAGES), "running", problem)
        return Slot(number, task, len(STAGES) + 1, "running", "")
    if task.state in ("failed", "complete", "rejected", "shutdown"):
        code = f" with exit code {task.exit_code}" if task.exit_code is not None else ""
        policy = service.restart
        final = (
            policy.condition == "none"
            or (policy.condition == "on-failure" and task.exit_code == 0)
            or bool(policy.max_attempts and task.restarts >= policy.max_attempts)
        )
        return Slot(number, task, 1, task.state, problem or f"{task.state}{code}", final)
    stage = STAGES.index(task.state) + 1 if task.state in STAGES else 1
    return Slot(number, task, stage, task.state, problem)


def bars(p: Progress) -> list[str]:
    """docker's progress lines for one service."""
    if p.removed:
        return [f"{p.name}: removed, {len(p.leaving)} task(s) still stopping"]
    lines = [f"{p.name}: overall progress: {p.done} out of {len(p.slots)} tasks"]
    total = len(STAGES) + 1
    for s in p.slots:
        filled = BAR * s.stage // total
        bar = ("=" * max(0, filled - 1) + ">" if filled else "").ljust(BAR)
        note = f"  {s.problem}" if s.problem and s.stage <= 1 else ""
        lines.append(f"{s.slot}/{len(p.slots)}: {s.label:<9} [{bar}]{note}")
    if p.leaving:
        lines.append(f"{p.name}: {len(p.leaving)} task(s) still stopping")
    return lines


def summary(p: Progress) -> str:
    """The one line the plain-text form prints when it changes."""
    if p.removed:
        return f"{p.name}: removed, {len(p.leaving)} task(s) still stopping"
    states = ", ".join(f"{s.slot}: {s.label}" for s in p.slots if s.stage <= len(STAGES))
    text = f"{p.name}: {p.done}/{len(p.slots)} running"
    if p.leaving:
        text += f", {len(p.leaving)} stopping"
    return text + (f" ({states})" if states else "")


def stuck(p: Progress) -> list[str]:
    """One line per slot (or stopping task) that has not converged, saying why."""
    lines = [
        f"{s.task.name if s.task else f'{p.name}.{s.slot}'}: {s.label}: {s.problem or 'not yet'}"
        for s in p.slots
        if s.stage <= len(STAGES)
    ]
    lines += [f"{t.name}: still {t.state} (stopping)" for t in p.leaving]
    return lines
