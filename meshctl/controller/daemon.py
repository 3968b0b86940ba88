"""`meshctl controller run`: the node's reconcile loop.

One asyncio loop waits for a reason to reconcile — a store change (the informer's copy moved),
a task process exit, a stop finishing, a back-off or health deadline, the resync period — and
runs each pass in one worker thread, so passes never overlap. A pass works from one snapshot
of the store: the leader places tasks and rolls updates, every node takes its load-balancer
addresses, then the DNS records, the node's networking, the router, the DNS endpoints and their
redirects, the load balancers and the task processes follow the view, in the order
controller.build declares and controller.passes runs. Each of these fails alone: a network
that cannot be set up is reported (node status, `service ps`, `meshctl diff`, the log) and
the others converge. The load balancers and the node's own rules are observed in full once per
resync period (one ResyncClock for all), each task namespace within a few periods at a time of
its own; passes in between apply only what changed. A pass writes its tasks' ends first: every
node's load balancers follow them. While the store is out of reach no pass runs: the kernel
keeps its last state. SIGTERM ends the loop and leaves every task running; a restarted
controller adopts them.

Operating it: every part of a pass is timed and every kernel call counted
(controller.metrics, served with /healthz and /readyz by controller.endpoints); the store
changes the informer brings are turned into the event log (meshctl.events), which the leader
writes and prunes.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from concurrent.futures import ThreadPoolExecutor

from kernel.gcpause import gc_paused
from kernel.system import Kernel
from meshctl.cluster.claims import AddressClaims
from meshctl.cluster.leader import Leader
from meshctl.cluster.membership import Membership
from meshctl.controller.build import NodeParts, controller_pass, node_parts
from meshctl.controller.counted import counted
from meshctl.controller.dataplane import choose_dataplane
from meshctl.controller.endpoints import Endpoints
from meshctl.controller.liveness import Liveness
from meshctl.controller.metrics import Metrics, Sources
from meshctl.controller.passes import PassResult
from meshctl.controller.supervision import Supervision
from meshctl.dns.sync import DnsSync
from meshctl.events import DEFAULT_LIMIT, DEFAULT_WINDOW, EVENT, EventLog
from meshctl.lb.backends import backend_named
from meshctl.lb.endpoints import programmed_revision
from meshctl.model import Node
from meshctl.node.kernel import set_node_sysctls
from meshctl.overlay.vxlan import VXLAN_PORT
from meshctl.reconcile import PassContext, ResyncClock
from meshctl.store import Event, Store
from meshctl.store.etcd import unprotected_warning
from meshctl.store.informer import Informer
from meshctl.view import ClusterView, Decoded, view_of

log = logging.getLogger("meshctl.controller")

STORE_WAIT = 5.0  # how long a pass waits for the copy to hold its own writes
LOG_NOTE_PERIOD = 0.25  # seconds between notes of the task logs' growth (their timestamps)


class Views:
    """The store as the passes see it: views of the informer's copy, the objects of records
    that did not move reused, and the last pass's view (for /metrics and the watchers)."""

    def __init__(self, informer: Informer) -> None:
        self.informer = informer
        self.last: ClusterView | None = None
        self._decoded = Decoded()

    def read(self, wait: bool = False) -> ClusterView:
        """The view from the informer's copy (after our own writes reached it, if wait)."""
        if wait:
            self.informer.sync(STORE_WAIT)
        return view_of(self.informer.snapshot(), self._decoded)

    def fresh(self) -> ClusterView:
        return self.read(wait=True)


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
        may_lead: bool = True,
    ) -> None:
        self.metrics = Metrics()
        self.liveness = Liveness(2 * resync_period)
        kernel = counted(kernel, self.metrics.kernel_operation)
        dataplane = choose_dataplane(kernel, lb_backend)
        self.membership = Membership(store, node, ttl=node_ttl, may_lead=may_lead)
        name = self.membership.join(lb_backend=dataplane.lb.name, vxlan_port=vxlan_port).name
        self.endpoints = None
        if metrics_addr:  # after joining: a second controller of the node is told that first
            self.endpoints = Endpoints(metrics_addr, self.metrics, self.liveness)
            self.endpoints.start()
            log.info("metrics, /healthz and /readyz on %s", metrics_addr)
        node_id = self.membership.node.id
        events = EventLog(
            store, window=events_window, limit=events_limit, keep=max(60.0, 3 * node_ttl)
        )
        self.views = Views(
            Informer(store, self._store_changed, ignore=(EVENT,), on_changes=events.observe)
        )
        retired = self.membership.retired_lb_backend  # its objects go from the LB namespaces
        self.parts: NodeParts = node_parts(
            kernel, dataplane, node=name, node_id=node_id,
            address=self.membership.node.address, vxlan_port=vxlan_port,
            state_dir=state_dir, resync_period=resync_period,
            retired=backend_named(retired) if retired else None,
        )  # fmt: skip
        self.dns = DnsSync(upstreams or [], name, state_dir)
        self.supervision = Supervision(
            store, name, node_id, state_dir, kernel, self.parts.router, lambda: self.views.last,
            lambda state: self.metrics.health_transitions.labels(state).inc(),
        )  # fmt: skip
        self.leader = Leader(store, self.membership, events, self.views.fresh)
        self.runner = controller_pass(
            self.parts, self.dns, self.supervision.supervisor, self.leader,
            AddressClaims(store, name), ResyncClock(resync_period), self.metrics.reconcile,
        )  # fmt: skip
        supervisor = self.supervision.supervisor
        self.metrics.sources = Sources(
            dns=self.dns.server.server.stats,
            forwarder=self.dns.server.server.forwarder,
            informer=self.views.informer,
            liveness=self.liveness,
            tasks=self._task_states,
            restarts=lambda: supervisor.restarts,
            leader=lambda: self.leader.leading,
        )
        log.info("node=%s id=%s lb_backend=%s", name, node_id, dataplane.lb.name)
        if (warning := unprotected_warning(store)) is not None:
            log.warning("%s", warning)

    # -- one pass (runs in the worker thread) --------------------------------------------------

    def reconcile_once(self) -> float:
        """One full pass; returns the time by which the next one is due."""
        with gc_paused():  # a pass builds many objects that form no cycles (kernel/gcpause.py)
            if not self.views.informer.connected:
                return time.time() + 1.0  # the kernel keeps its last state meanwhile
            covered = self.liveness.begin()

            def finish(result: PassResult) -> str:
                self.views.last = result.view
                node = self.membership.node
                programmed = programmed_revision(result.view, node.name, node.id, result.failures)
                self.membership.report_pass(result.failures, programmed=programmed)
                self.leader.flush_events()
                problem = _problem(result.failures)
                for wait in self.liveness.end(covered, problem):
                    self.metrics.programming.observe(wait)
                return problem

            return self.runner.run(self.views.read, self._context, finish).deadline

    def _context(self, view: ClusterView, full: bool) -> PassContext:
        """A pass's context: what the supervisor wires, the DNS ports opened so far."""
        self.views.last = view
        node = self.membership.node
        return PassContext(
            node.name,
            node.id,
            full,
            wired=self.supervision.wired(view),
            dns_ports=dict(self.dns.endpoints.ports),
        )

    def _store_changed(self, events: list[Event]) -> None:
        """The informer applied a batch: it waits for a pass (/healthz), which it wakes."""
        if events:
            self.liveness.changed()
        self.supervision.supervisor.wake()

    def _task_states(self) -> dict[str, int]:
        """This node's tasks by state, as the last pass saw them (for /metrics)."""
        counts: dict[str, int] = {}
        view = self.views.last
        for task in view.tasks_on(self.membership.node.name) if view is not None else []:
            counts[task.state] = counts.get(task.state, 0) + 1
        return counts

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

        self.supervision.supervisor.wake = wake
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        set_node_sysctls(self.parts.kernel)
        self.dns.start()
        self.views.informer.start()
        self.membership.start(lost)
        worker = ThreadPoolExecutor(1, thread_name_prefix="reconcile")
        noting = asyncio.ensure_future(self._note_logs())
        log.info(
            "controller started node=%s state_dir=%s",
            self.membership.node.name,
            self.supervision.supervisor.state_dir,
        )
        try:
            while not stopping.is_set():
                wake_event.clear()
                try:
                    deadline = await loop.run_in_executor(worker, self.reconcile_once)
                except Exception as err:
                    log.exception("reconcile pass failed; retrying")
                    self.liveness.failed(_one_line(err))
                    await loop.run_in_executor(
                        worker,
                        self.membership.report_pass,
                        self.membership.failures,
                        f"degraded: {_one_line(err)}",
                    )
                    deadline = time.time() + 1.0
                self.supervision.watch(loop, wake)
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
            self.supervision.stop()
            worker.shutdown(wait=True)
            self.dns.stop()
            self.views.informer.stop()
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
            await loop.run_in_executor(None, self.supervision.supervisor.note_logs)
            await asyncio.sleep(LOG_NOTE_PERIOD)


def _problem(errors: dict[str, str]) -> str:
    """Why a pass did not converge, in one line for /healthz ("" when it did)."""
    return "; ".join(f"{what} fails on this node: {why}" for what, why in sorted(errors.items()))


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
