"""Task processes on this node: start, watch, restart by policy with back-off, stop, re-adopt.

The supervisor keeps what only this process knows (the TaskProcess handles, back-off timers,
stops in progress) and writes what users see (state, pid, exit code, error, history) back to
the task records. Every decision is taken again on each pass from the store's view plus that
local knowledge, so a missed wake-up costs one resync period, never correctness. Only the pass
changes that knowledge: a stop runs in a thread of its own (it waits out a grace period), which
ends the process and hands back its exit code, and the pass records the end.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field

from kernel.errors import KernelError
from meshctl import naming, runtime
from meshctl.cluster import tasks
from meshctl.lb.endpoints import out_of_every_spread
from meshctl.model import TASK, Health, Service, Task, TaskState
from meshctl.reconcile import PassContext
from meshctl.store import Conflict, Store
from meshctl.view import ClusterView

log = logging.getLogger("meshctl.supervisor")

BACKOFF_CAP = 60.0  # seconds: the restart delay doubles after each failure up to this
MIN_DELAY = 0.1  # even with --restart-delay 0 a crash loop backs off
STABLE_RUN = 10.0  # a process that ran this long resets the back-off
DRAIN_CHECK = 0.2  # seconds between looks at a draining task's open connections
DEFAULT_GRACE = 10.0


@dataclass(frozen=True)
class Stop:
    """A stop in flight: its thread ends the process and sets `code` (its exit code)."""

    why: str
    code: Future[int | None] = field(default_factory=Future)


@dataclass
class Local:
    """What this controller alone knows of one task."""

    process: runtime.TaskProcess | None = None
    started_at: float = 0.0
    failures: int = 0  # restarts in a row without a stable run, for the back-off
    not_before: float = 0.0  # no (re)start before this time
    stopping: Stop | None = None  # while set, the stop's thread uses the process
    draining_since: float | None = None  # leaving: out of the LB spread, connections finishing
    health: Health = "none"
    last_exit: tuple[int | None, str] | None = None  # (code, message) not yet written

    def stopped(self) -> bool:
        """Whether a stop in flight has ended the process (the pass has yet to record it)."""
        return self.stopping is not None and self.stopping.code.done()


@dataclass(frozen=True)
class TaskStep:
    """The supervisor's step over a view; unwired: task ids whose namespace is gone."""

    view: ClusterView
    unwired: frozenset[str]


@dataclass
class Supervisor:
    """The node's task processes in a pass: its first store writer (their ends and health
    changes, `write`) and its last reconciler (start, restart, stop, forget: `plan`/`apply`),
    each decision taken again every pass (not checked by a second plan: processes start and
    stop in their own time)."""

    name = "tasks"
    converges = False

    store: Store
    node: str
    state_dir: str
    # How many connections the load balancers still send to a task (0 when none pass there).
    open_connections: Callable[[Task], int] = lambda task: 0
    wake: Callable[[], None] = lambda: None
    tasks: dict[str, Local] = field(default_factory=dict)
    # service id → why one of its published ports is not published on this node, as the
    # node's reconciler last found (PassContext.port_errors); written on the tasks' records
    port_errors: dict[str, str] = field(default_factory=dict)
    restarts: int = 0  # processes started again after an exit (for /metrics)
    log_clock: runtime.LogClock = field(default_factory=runtime.LogClock)

    # -- the pass ------------------------------------------------------------------------------

    def write(self, view: ClusterView) -> tuple[bool, dict[str, str]]:
        """The pass's first store write (see record_changes); nothing fails by name."""
        return self.record_changes(view), {}

    def plan(self, view: ClusterView, ctx: PassContext) -> TaskStep:
        gone = {tid for tid in view.tasks if naming.task_netns(tid) not in ctx.present}
        return TaskStep(view, frozenset(gone))

    def apply(self, plan: TaskStep, ctx: PassContext) -> dict[str, str]:
        self.port_errors = ctx.port_errors
        ctx.due(self.step(plan.view, set(plan.unwired)))
        return {}

    def describe(self, plan: TaskStep) -> Iterator[str]:
        return iter(())  # processes are not kernel state: `meshctl diff` shows none

    def adopt(self, view: ClusterView) -> None:
        """After a restart: take over the processes an earlier controller started: the one its
        task directory names (written as it started, so a controller killed before it wrote
        the task's record leaves no process behind), else the one the record names."""
        for task in view.tasks_on(self.node):
            if task.id in self.tasks:
                continue
            known = [runtime.read_process_file(self.task_dir(task.id))]
            if task.pid is not None and task.start_time is not None:
                known.append((task.pid, task.start_time))
            candidates = [pid_and_start for pid_and_start in known if pid_and_start is not None]
            if not candidates:
                continue
            process = next(
                (p for p in (runtime.adopt(*c) for c in candidates) if p is not None), None
            )
            local = self.tasks.setdefault(task.id, Local())
            if process is None:
                local.last_exit = (None, "the process ended while the controller was away")
            else:
                local.process = process
                local.health = task.health if task.health != "none" else "none"
                log.info("adopted task=%s pid=%d", task.name, task.pid)

    def wired(self, view: ClusterView) -> set[str]:
        """Tasks whose namespace and links must exist: wanted running, or not yet stopped."""
        wanted = {t.id for t in view.tasks_on(self.node) if t.desired_state == "running"}
        alive = {
            tid
            for tid, local in self.tasks.items()
            if local.process is not None and not local.stopped()
        }
        return wanted | alive

    def record_changes(self, view: ClusterView) -> bool:
        """Write the ends and health changes of this node's task processes, nothing else
        (the pass runs this first: the load balancers of every node follow these records).
        True if the store changed."""
        changed = False
        for task in view.tasks_on(self.node):
            local = self.tasks.get(task.id)
            if local is None:
                continue
            self._notice_exit(task, local)
            if local.last_exit is not None or local.health != task.health:
                changed |= self._write(view, task, local)
        return changed

    def step(self, view: ClusterView, unwired: set[str]) -> float:
        """Start, restart, stop and forget tasks; write what changed. Returns the next deadline.

        unwired: task ids whose namespace is gone from the kernel (torn down this pass or before).
        """
        now = time.time()
        deadline = now + 3600
        for task in view.tasks_on(self.node):
            local = self.tasks.setdefault(task.id, Local())
            service = view.service_of(task)
            self._notice_exit(task, local)
            if task.desired_state == "running" and service is not None:
                when = self._keep_running(view, task, service, local, now)
            else:
                when = self._wind_down(view, task, service, local, unwired)
            if when is not None:
                deadline = min(deadline, when)
            self._write(view, task, local)
            self.log_clock.rotate(
                runtime.task_log_path(self.state_dir, task.id),
                runtime.LOG_MAX_BYTES,
                runtime.LOG_KEEP,
            )
        for task_id in set(self.tasks) - set(view.tasks):
            self._drop_local(task_id)
        return deadline

    # -- running -------------------------------------------------------------------------------

    def _notice_exit(self, task: Task, local: Local) -> None:
        """Record the end of the task's process: a stop that has finished, or an exit by itself
        (a process being stopped is left to its stop until that finishes)."""
        process = local.process
        if process is None:
            return
        if local.stopping is not None:
            if not local.stopped():
                return
            code, message = local.stopping.code.result(), local.stopping.why
            local.stopping = local.draining_since = None
        elif process.exited():
            code = _shell_code(process.exit_code())
            message = "exit code unknown (adopted task)" if code is None else f"exit code {code}"
            log.info("task=%s exited %s", task.name, message)
        else:
            return
        process.close()
        local.process = None
        if time.time() - local.started_at > STABLE_RUN:
            local.failures = 0  # it ran well for a while: the next restart waits only the delay
        local.last_exit = (code, message)

    def _keep_running(
        self, view: ClusterView, task: Task, service: Service, local: Local, now: float
    ) -> float | None:
        if local.stopping is not None:
            return None
        if local.process is not None:
            if local.health == "unhealthy" and self._may_restart(service, task, 1):
                return self._replace_unhealthy(view, task, service, local, now)
            local.draining_since = None
            return None
        if local.last_exit is not None or task.state in ("running", "starting", "failed"):
            # It ran before and stopped: the restart policy decides, with back-off.
            code = local.last_exit[0] if local.last_exit else task.exit_code
            if not self._may_restart(service, task, code):
                return None
            if local.not_before == 0.0:
                base = max(service.restart.delay, MIN_DELAY)
                cap = max(BACKOFF_CAP, service.restart.delay)
                local.not_before = now + min(base * 2**local.failures, cap)
                local.failures += 1
            if now < local.not_before:
                return local.not_before
        self._start(view, task, service, local)
        return None

    def _replace_unhealthy(
        self, view: ClusterView, task: Task, service: Service, local: Local, now: float
    ) -> float | None:
        """As Docker does, an unhealthy task is replaced by a fresh process: once its record
        says so (this node's load balancers gave it weight 0 in this pass) and every other
        node's have too, or its grace period is over. Established connections finish in the
        stop's grace period."""
        if local.draining_since is None:
            local.draining_since = now
        out = task.health == "unhealthy" and out_of_every_spread(view, task)
        if not out and now - local.draining_since < service.stop_grace_period:
            return now + DRAIN_CHECK
        self._begin_stop(task, local, service.stop_grace_period, "unhealthy")
        return None

    def _may_restart(self, service: Service, task: Task, code: int | None) -> bool:
        policy = service.restart
        if policy.condition == "none":
            return False
        if policy.condition == "on-failure" and code == 0:
            return False
        return not (policy.max_attempts and task.restarts >= policy.max_attempts)

    def _start(self, view: ClusterView, task: Task, service: Service, local: Local) -> None:
        task_dir = self.task_dir(task.id)
        spec = runtime.TaskProcessSpec(
            task_name=task.name,
            netns=naming.task_netns(task.id),
            command=service.command,
            log_path=runtime.task_log_path(self.state_dir, task.id),
            files_dir=task_dir,
            env=tuple(sorted(service.env.items())),
            hosts=runtime.hosts_text(task.name, tuple(task.addresses.values())),
        )
        try:
            local.process = runtime.start(spec)
            runtime.write_process_file(task_dir, local.process)
        except (KernelError, OSError) as err:
            local.last_exit = (None, f"start failed: {err}")
            local.not_before = 0.0
            log.warning("task=%s start failed: %s", task.name, err)
            return
        local.not_before = 0.0
        local.started_at = time.time()
        local.health = "starting" if service.health else "none"
        log.info("task=%s started pid=%d", task.name, local.process.pid)

    # -- stopping ------------------------------------------------------------------------------

    def _wind_down(
        self,
        view: ClusterView,
        task: Task,
        service: Service | None,
        local: Local,
        unwired: set[str],
    ) -> float | None:
        if local.process is not None and local.stopping is None:
            grace = service.stop_grace_period if service else DEFAULT_GRACE
            now = time.time()
            # Drain first: this pass already gave it weight 0 in this node's load balancers (it
            # is leaving); stop it once every other node's have taken it out too and its
            # connections are done, or the grace period is over.
            if local.draining_since is None:
                local.draining_since = now
                return now + DRAIN_CHECK
            if now - local.draining_since < grace and (
                not out_of_every_spread(view, task) or self.open_connections(task) > 0
            ):
                return now + DRAIN_CHECK
            self._begin_stop(task, local, grace, "stopped")
            return None
        if local.process is None and task.id in unwired:
            self._forget(task)
        return None

    def _begin_stop(self, task: Task, local: Local, grace: float, why: str) -> None:
        assert local.process is not None
        local.stopping = Stop(why)
        threading.Thread(
            target=self._stop,
            args=(task, local.process, grace, local.stopping),
            name=f"stop:{task.name}",
            daemon=True,
        ).start()

    def _stop(self, task: Task, process: runtime.TaskProcess, grace: float, stop: Stop) -> None:
        """The stop's thread: it touches nothing but the process and the stop's result."""
        stop.code.set_result(_shell_code(process.stop(grace)))
        log.info("task=%s stopped", task.name)
        self.wake()

    def _forget(self, task: Task) -> None:
        """The task is stopped and unwired: its record, addresses and files go."""
        tasks.forget_task(self.store, task.id)
        shutil.rmtree(self.task_dir(task.id), ignore_errors=True)
        self._drop_local(task.id)
        log.info("task=%s removed", task.name)

    def _drop_local(self, task_id: str) -> None:
        """Let go of a task; one whose stop is in flight is kept until the stop finishes."""
        local = self.tasks.get(task_id)
        if local is None or (local.stopping is not None and not local.stopped()):
            return
        del self.tasks[task_id]
        if local.process is not None:
            local.process.close()

    def note_logs(self) -> None:
        """Note when the logs of this node's tasks grew (service logs --timestamps)."""
        self.log_clock.note(
            [runtime.task_log_path(self.state_dir, tid) for tid in list(self.tasks)]
        )

    def task_dir(self, task_id: str) -> str:
        return naming.task_dir(self.state_dir, task_id)

    # -- what users see ------------------------------------------------------------------------

    def _write(self, view: ClusterView, task: Task, local: Local) -> bool:
        """Bring the task record's observed fields in line with what this controller knows;
        True if it wrote."""
        now = time.time()
        updated = task
        if local.last_exit is not None:
            code, message = local.last_exit
            state: TaskState = "complete" if code == 0 else "failed"
            if task.desired_state != "running":
                state = "shutdown"
            updated = dataclasses.replace(
                updated, exit_code=code, error="" if code == 0 else message
            )
            updated = updated.with_event(now, state, message)
        if local.process is not None:
            pid, start_time = local.process.pid, local.process.start_time
            if (updated.pid, updated.start_time) != (pid, start_time):
                # A start after a recorded exit is a restart; the first start is not.
                restarted = updated.state in ("failed", "complete")
                restarts = updated.restarts + (1 if restarted else 0)
                self.restarts += restarted
                updated = dataclasses.replace(
                    updated, pid=pid, start_time=start_time, restarts=restarts
                ).with_event(now, "running", f"started, pid {pid}")
            elif updated.state != "running":
                updated = updated.with_event(now, "running")
        elif updated.pid is not None:
            updated = dataclasses.replace(updated, pid=None, start_time=None)
        if updated.health != local.health:
            updated = dataclasses.replace(updated, health=local.health)
        port_error = self.port_errors.get(task.service_id)
        if port_error and updated.error != port_error:
            updated = dataclasses.replace(updated, error=port_error)
            updated = updated.with_event(now, updated.state, port_error)
        elif not port_error and updated.error.startswith("published port "):
            updated = dataclasses.replace(updated, error="")
        if updated == task:
            return False
        try:
            self.store.put(TASK, task.id, updated.to_dict(), expect=view.task_revisions[task.id])
        except Conflict:
            self.wake()  # changed meanwhile: read again and redo this on the next pass
            return False
        local.last_exit = None
        return True


def _shell_code(code: int | None) -> int | None:
    """An exit code as a shell (and Docker) reports it: 128 + n when killed by signal n."""
    return 128 - code if code is not None and code < 0 else code
