"""`meshctl controller run`: the node's reconcile loop.

One asyncio loop waits for a reason to reconcile — a store change (the informer's copy moved),
a task process exit, a stop finishing, a back-off or health deadline, the resync period — and
runs each pass in one worker thread, so passes never overlap. A pass works from one snapshot
of the store: the leader places tasks and rolls updates, every node takes its load-balancer
addresses, then the DNS records, the node's networking, the DNS endpoints, the load balancers
and the task processes follow the view. Each of these fails alone: a network that cannot be
set up is reported (node status, `service ps`, `meshctl diff`, the log) and the others
converge. The load balancers and the node's own rules are observed in full once per resync
period, each task namespace within a few periods at a time of its own; passes in between
apply only what changed. A pass writes its tasks' ends first: every node's load balancers
follow them. While the store is out of reach no pass runs: the kernel keeps its last state.
SIGTERM ends the loop and leaves every task running; a restarted controller adopts them.

Operating it: every part of a pass is timed and every kernel call counted
(controller.metrics, served with /healthz and /readyz by controller.endpoints); the store
changes the informer brings are turned into the event log (meshctl.events), which the leader
writes and prunes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from prometheus_client import Histogram

from kernel.errors import KernelError
from kernel.gcpause import gc_paused
from kernel.system import Kernel
from meshctl import ipam, naming, runtime
from meshctl.cluster import orchestrator, scheduler, updater
from meshctl.cluster.membership import Membership
from meshctl.controller.counted import counted
from meshctl.controller.dataplane import choose_dataplane
from meshctl.controller.endpoints import Endpoints
from meshctl.controller.liveness import Liveness
from meshctl.controller.metrics import Metrics, Sources
from meshctl.controller.supervisor import Local, Supervisor
from meshctl.dns.sync import DnsSync
from meshctl.events import DEFAULT_LIMIT, DEFAULT_WINDOW, EVENT, EventLog
from meshctl.lb.backends import backend_named
from meshctl.lb.desired import lb_specs
from meshctl.lb.reconcile import LbReconciler
from meshctl.model import HealthCheck, MeshctlError, Node, Task
from meshctl.node.kernel import set_node_sysctls
from meshctl.node.reconciler import NodeReconciler
from meshctl.overlay.vxlan import VXLAN_PORT, underlay_of
from meshctl.router.sync import RouterSync
from meshctl.store import Event, Store, StoreError
from meshctl.store.informer import Informer
from meshctl.view import ClusterView, Decoded, view_of

log = logging.getLogger("meshctl.controller")

STORE_WAIT = 5.0  # how long a pass waits for the copy to hold its own writes
LOG_NOTE_PERIOD = 0.25  # seconds between notes of the task logs' growth (their timestamps)
ORCHESTRATION_ROUNDS = 3  # make, move, place: a replacement is placed in the pass that made it


class Controller:
    """One node's controller: the store, the kernel, and what it supervises."""

    def __init__(
        self,
        store: Store,
        kernel: Kernel,
        node: Node,
        state_dir: str,
        *,
        resync_period: float = 10.0,
        lb_backend: str = "auto",
        upstreams: list[str] | None = None,
        node_ttl: float = 10.0,
        vxlan_port: int = VXLAN_PORT,
        metrics_addr: str = "",
        events_window: float = DEFAULT_WINDOW,
        events_limit: int = DEFAULT_LIMIT,
    ) -> None:
        self.store = store
        self.metrics = Metrics()
        self.liveness = Liveness(2 * resync_period)
        self.kernel = kernel = counted(kernel, self.metrics.kernel_operation)
        dataplane = choose_dataplane(kernel, lb_backend)
        backend = dataplane.lb
        self.membership = Membership(store, node, ttl=node_ttl)
        self.node = self.membership.join(lb_backend=backend.name, vxlan_port=vxlan_port).name
        self.endpoints = None
        if metrics_addr:  # after joining: a second controller of the node is told that first
            self.endpoints = Endpoints(metrics_addr, self.metrics, self.liveness)
            self.endpoints.start()
            log.info("metrics, /healthz and /readyz on %s", metrics_addr)
        self.node_id = self.membership.node.id
        self.state_dir = state_dir
        self.resync_period = resync_period
        self.started = time.monotonic()
        self._wake: Callable[[], None] = lambda: None  # set by run(): wakes the loop
        self.events = EventLog(
            store, window=events_window, limit=events_limit, keep=max(60.0, 3 * node_ttl)
        )
        self.informer = Informer(
            store, self._store_changed, ignore=(EVENT,), on_changes=self.events.observe
        )
        retired = self.membership.retired_lb_backend  # its objects go from the LB namespaces
        self.lb = LbReconciler(kernel, backend, retired=backend_named(retired) if retired else None)
        self.underlay = underlay_of(kernel, self.membership.node.address, vxlan_port)
        self.node_sync = NodeReconciler(
            kernel, self.node, resync_period, self.underlay, task_dns=dataplane.task_dns
        )
        self.dns = DnsSync(upstreams or [])
        self.router = RouterSync(
            store, kernel, self.node, self.node_id, state_dir, resync_period, self.underlay
        )
        self.supervisor = Supervisor(
            store, self.node, state_dir, open_connections=self._open_connections
        )
        self._adopted = False
        self._last_full_lb = -float("inf")  # monotonic time of the last full LB observe
        self._last_view: ClusterView | None = None
        self._decoded = Decoded()  # the last view's objects, reused where records did not move
        self._errors: dict[str, str] = {}  # what failed in the last pass, by network or task
        self._monitors: dict[str, asyncio.Task[None]] = {}
        self._exit_fds: dict[int, int] = {}  # pid → our dup of its pidfd
        self._leading = False
        self.metrics.sources = Sources(
            dns=self.dns.server.server.stats,
            forwarder=self.dns.server.server.forwarder,
            informer=self.informer,
            liveness=self.liveness,
            tasks=self._task_states,
            restarts=lambda: self.supervisor.restarts,
            leader=lambda: self._leading,
        )
        log.info("node=%s id=%s lb_backend=%s", self.node, self.node_id, backend.name)

    # -- one pass (runs in the worker thread) --------------------------------------------------

    def reconcile_once(self) -> float:
        """One full pass; returns the time by which the next one is due."""
        with gc_paused():  # a pass builds many objects that form no cycles (kernel/gcpause.py)
            return self._reconcile_once()

    def _view(self, wait: bool = False) -> ClusterView:
        """The view from the informer's copy (after our own writes reached it, if wait)."""
        if wait:
            self.informer.sync(STORE_WAIT)
        return view_of(self.informer.snapshot(), self._decoded)

    def _store_changed(self, events: list[Event]) -> None:
        """The informer applied a batch: it waits for a pass (/healthz), which it wakes."""
        if events:
            self.liveness.changed()
        self._wake()

    def _reconcile_once(self) -> float:
        if not self.informer.connected:
            return time.time() + 1.0  # the kernel keeps its last state meanwhile
        covered = self.liveness.begin()
        started = time.perf_counter()
        parts = _Parts(self.metrics.reconcile)
        try:
            return self._pass(covered, parts)
        except BaseException:
            parts("pass").failed = True
            raise
        finally:
            parts("pass").spent = time.perf_counter() - started
            parts.observe()

    def _pass(self, covered: int, timed: _Parts) -> float:
        view = self._view()
        errors: dict[str, str] = {}
        with timed("tasks"):
            # Ends and health changes first: every node (this one below, the others by the
            # store) takes a task that died out of its load balancers without waiting for
            # the rest of this pass.
            if self.supervisor.record_changes(view):
                view = self._view(wait=True)
        with timed("orchestrate") as part:
            if self._orchestrate(view, errors):
                view = self._view(wait=True)
            if self._claim_lb_addresses(view, errors) | self.router.claim_addresses(view, errors):
                view = self._view(wait=True)
            part.failed = dict(errors)
        self._last_view = view
        with timed("dns"):
            self.dns.sync_records(view, self.node)  # first: answers follow the store at once
        # Routes too; again below if its namespace needs what the node's networking makes.
        with timed("router"):
            router_errors, router_deadline = self.router.sync(view, self.node_sync.port_errors)
        if not self._adopted:
            self.supervisor.adopt(view)
            self._adopted = True
        wired = self.supervisor.wired(view)
        with timed("node") as part:
            part.failed = self.node_sync.sync(view, wired, self.dns.ports)
            errors |= part.failed
        self.supervisor.port_errors = self.node_sync.port_errors
        # Task namespaces after wiring; adding DNS endpoints below creates or removes none.
        present = set(self.kernel.netns.list_namespaces(naming.TASK_NETNS_PREFIX))
        task_dirs = {tid: self.supervisor.task_dir(tid) for tid in wired}
        with timed("dns"):
            added = self.dns.sync_endpoints(view, wired, present, task_dirs)
        if added:
            with timed("node") as part:
                failed = self.node_sync.sync(view, wired, self.dns.ports)  # their redirects
                part.failed, errors = part.failed or failed, errors | failed
        with timed("lb") as part:
            part.failed = self._sync_lb(view)
            errors |= part.failed
        if self.router.needs_node:  # a leg onto a bridge made just now
            with timed("router"):
                router_errors, router_deadline = self.router.sync(view, self.node_sync.port_errors)
        timed("router").failed = router_errors
        errors |= router_errors
        unwired = {tid for tid in view.tasks if naming.task_netns(tid) not in present}
        with timed("tasks"):
            deadline = self.supervisor.step(view, unwired)
        self._report(errors, "")
        self.events.flush(self._leading)
        problem = _problem(errors)
        for wait in self.liveness.end(covered, problem):
            self.metrics.programming.observe(wait)
        timed("pass").failed = problem
        # A pass when the next task namespace is due to be read again (see NodeReconciler),
        # at most a few times a resync period.
        reread = max(self.node_sync.next_read() - time.monotonic(), self.resync_period / 4)
        return min(deadline, router_deadline, time.time() + min(reread, self.resync_period))

    def _task_states(self) -> dict[str, int]:
        """This node's tasks by state, as the last pass saw them (for /metrics)."""
        counts: dict[str, int] = {}
        view = self._last_view
        for task in view.tasks_on(self.node) if view is not None else []:
            counts[task.state] = counts.get(task.state, 0) + 1
        return counts

    def _orchestrate(self, view: ClusterView, errors: dict[str, str]) -> bool:
        """The leader's part: keep every service's slots filled (and no more), move tasks off
        down and draining nodes, roll updates, place what is pending. True if the store
        changed. Each step works on the view after the previous one's writes; a task made by
        one (a replacement) is placed in the same pass. A leader that has just started gives
        nodes without a live controller one lease period to come back before it judges them
        down."""
        self._leading = self.membership.lead(view.leader)
        if not self._leading:
            return False
        settled = time.monotonic() - self.started > self.membership.ttl
        changed = False
        for _ in range(ORCHESTRATION_ROUNDS):
            made, problem = orchestrator.apply(self.store, view, orchestrator.plan(view))
            if made:
                view = self._view(wait=True)
            decisions = scheduler.plan(view, judge_down=settled)
            moved, unmade = scheduler.apply(self.store, view, decisions)
            if moved:
                view = self._view(wait=True)
            rolled, stuck = updater.roll(self.store, view)
            if rolled:
                view = self._view(wait=True)
            if problem or unmade or stuck:
                errors["tasks"] = "; ".join(p for p in (problem, unmade, stuck) if p)
            changed |= made or moved or rolled
            if not (made or moved or rolled):
                break
        return changed

    def _claim_lb_addresses(self, view: ClusterView, errors: dict[str, str]) -> bool:
        """A load-balancer address on every network this node takes part in, and none on an
        overlay it has left; a network that has no address left is reported, the others go
        on. True if the store changed."""
        have = view.lb_addresses
        taking_part = view.taking_part(self.node)
        changed = False
        for network in view.networks.values():
            holds = (network.name, self.node) in have
            try:
                if network.name in taking_part and not holds:
                    ipam.allocate_lb_address(self.store, network, self.node)
                    changed = True
                elif network.overlay and network.name not in taking_part and holds:
                    ipam.release_lb_address(self.store, network, self.node)
                    changed = True
            except MeshctlError as err:
                errors[network.name] = str(err)
        return changed

    def _sync_lb(self, view: ClusterView) -> dict[str, str]:
        """The load balancers: a full observe once per resync period (it repairs drift and
        checks convergence); in between, only the services whose spec changed. Returns the
        networks whose load balancer failed, and why."""
        specs = lb_specs(view, self.node, self.node_id, self.underlay)
        prefix = naming.lb_netns_prefix(self.node_id)
        now = time.monotonic()
        if now - self._last_full_lb < self.resync_period:
            plan = self.lb.sync_changed(specs, prefix)
            if not plan.empty:
                log.info("applied load-balancer changes to %d namespace(s)", len(plan.changes))
        else:
            self._last_full_lb = now
            plan = self.lb.plan(specs, prefix)
            if not plan.empty:
                log.info("applying load-balancer plan")
                self.lb.apply(plan)
                if not self.lb.failures and not self.lb.plan(specs, prefix).empty:
                    log.warning("load balancer not converged after apply")
        networks = {naming.lb_netns(self.node_id, n.id): n.name for n in view.networks.values()}
        return {networks.get(ns, ns): why for ns, why in self.lb.failures.items()}

    def _report(self, errors: dict[str, str], message: str) -> None:
        """Tell the cluster how this node does; log each failure once, when it starts."""
        for what in sorted(set(errors) - set(self._errors)):
            log.warning("%s fails on this node: %s", what, errors[what])
        self._errors = errors
        try:
            self.membership.report(message, errors)
        except StoreError as err:
            log.warning("cannot report the node's status: %s", err)

    def _open_connections(self, task: Task) -> int:
        """TCP connections the task still serves through this node's load balancers, and
        requests through its router."""
        total = self.router.open_requests(task)
        for network, address in task.addresses.items():
            net = self._last_view.networks.get(network) if self._last_view else None
            if net is None:
                continue
            try:
                total += self.kernel.conntrack.count_tcp_connections(
                    naming.lb_netns(self.node_id, net.id), address
                )
            except KernelError:
                continue  # no LB namespace (yet): nothing goes through it
        return total

    # -- the loop ------------------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        wake_event = asyncio.Event()
        stopping = asyncio.Event()

        def wake() -> None:
            loop.call_soon_threadsafe(wake_event.set)

        def lost(why: str) -> None:
            log.error("%s; stopping", why)
            loop.call_soon_threadsafe(stopping.set)

        self._wake = self.supervisor.wake = wake
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        set_node_sysctls(self.kernel)
        self.dns.start()
        self.informer.start()
        self.membership.start(lost)
        worker = ThreadPoolExecutor(1, thread_name_prefix="reconcile")
        noting = asyncio.ensure_future(self._note_logs())
        log.info("controller started node=%s state_dir=%s", self.node, self.state_dir)
        try:
            while not stopping.is_set():
                wake_event.clear()
                try:
                    deadline = await loop.run_in_executor(worker, self.reconcile_once)
                except Exception as err:
                    log.exception("reconcile pass failed; retrying")
                    self.liveness.failed(_one_line(err))
                    await loop.run_in_executor(
                        worker, self._report, self._errors, f"degraded: {_one_line(err)}"
                    )
                    deadline = time.time() + 1.0
                self._watch_exits(loop, wake)
                self._sync_monitors(wake)
                timeout = max(0.01, deadline - time.time())
                waits = {
                    asyncio.ensure_future(wake_event.wait()),
                    asyncio.ensure_future(stopping.wait()),
                }
                _, pending = await asyncio.wait(
                    waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                for waiter in pending:
                    waiter.cancel()
        finally:
            noting.cancel()
            for monitor in self._monitors.values():
                monitor.cancel()
            worker.shutdown(wait=True)
            self.dns.stop()
            self.informer.stop()
            # The lease is left to run out: a controller restarted within it takes over
            # without the node ever looking down.
            self.membership.stop()
            if self.endpoints is not None:
                self.endpoints.stop()
            log.info("controller stopped; tasks keep running")

    async def _note_logs(self) -> None:
        """Note the task logs' growth a few times a second, off the pass (which may be long)."""
        loop = asyncio.get_running_loop()
        while True:
            await loop.run_in_executor(None, self.supervisor.note_logs)
            await asyncio.sleep(LOG_NOTE_PERIOD)

    def _watch_exits(self, loop: asyncio.AbstractEventLoop, wake: Callable[[], None]) -> None:
        """Wake the loop when a task process or the router exits: its pidfd turns readable."""
        processes = [local.process for local in self.supervisor.tasks.values()]
        for process in (*processes, self.router.process):
            if process is None or process.pid in self._exit_fds:
                continue
            # Our own copy of the pidfd, so the supervisor closing its one cannot race with us.
            fd = os.dup(process.wait_fd())
            self._exit_fds[process.pid] = fd

            def exited(pid: int = process.pid, fd: int = fd) -> None:
                loop.remove_reader(fd)
                os.close(fd)
                self._exit_fds.pop(pid, None)
                wake()

            loop.add_reader(fd, exited)

    def _sync_monitors(self, wake: Callable[[], None]) -> None:
        """A health monitor per running task whose service has a check; none for the others."""
        view = self.supervisor
        wanted: dict[str, tuple[int, HealthCheck, str]] = {}
        for task_id, local in view.tasks.items():
            spec = self._health_target(task_id)
            if local.process is not None and spec is not None:
                wanted[task_id] = (local.process.pid, *spec)
        for task_id in set(self._monitors) - set(wanted):
            self._monitors.pop(task_id).cancel()
        for task_id, (pid, check, address) in wanted.items():
            if task_id in self._monitors and not self._monitors[task_id].done():
                continue
            local = view.tasks[task_id]

            async def on_change(
                state: runtime.HealthState, result: runtime.ProbeResult, local: Local = local
            ) -> None:
                local.health = state
                self.metrics.health_transitions.labels(state).inc()
                log.info("health %s: %s", state, result.output.strip()[:200])
                wake()

            self._monitors[task_id] = asyncio.ensure_future(
                runtime.monitor(check, naming.task_netns(task_id), pid, address, on_change)
            )

    def _health_target(self, task_id: str) -> tuple[HealthCheck, str] | None:
        view = self._last_view
        if view is None or task_id not in view.tasks:
            return None
        task = view.tasks[task_id]
        service = view.service_of(task)
        if service is None or service.health is None or not task.addresses:
            return None
        return service.health, next(iter(task.addresses.values()))


class _Parts:
    """The time each kind of work took in one pass (a kind may run twice, as the node's), for
    the reconcile histogram: observed once per kind with its result, error if it raised or
    its `failed` was set (what it reports as failing)."""

    def __init__(self, histogram: Histogram) -> None:
        self.histogram = histogram
        self.parts: dict[str, _Part] = {}

    def __call__(self, kind: str) -> _Part:
        return self.parts.setdefault(kind, _Part())

    def observe(self) -> None:
        for kind, part in self.parts.items():
            result = "error" if part.failed else "success"
            self.histogram.labels(kind, result).observe(part.spent)


class _Part:
    def __init__(self) -> None:
        self.spent = 0.0
        self.failed: object = None

    def __enter__(self) -> _Part:
        self.started = time.perf_counter()
        return self

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        self.spent += time.perf_counter() - self.started
        self.failed = self.failed or kind is not None


def _problem(errors: dict[str, str]) -> str:
    """Why a pass did not converge, in one line for /healthz ("" when it did)."""
    return "; ".join(f"{what} fails on this node: {why}" for what, why in sorted(errors.items()))


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
