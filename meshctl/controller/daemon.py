"""`meshctl controller run`: the node's reconcile loop.

One asyncio loop waits for a reason to reconcile — a store change, a task process exit, a
stop finishing, a back-off or health deadline, the resync period — and runs each pass in one
worker thread, so passes never overlap. A pass: read the store once, claim and adopt tasks,
build the node's desired kernel objects, observe the kernel, apply the difference, check that
a second diff is empty, then start, restart and stop task processes and write their states.
The load balancers are observed in full once per resync period; passes in between apply only
the services whose spec changed (their cost follows the change, not the number of services).
SIGTERM ends the loop and leaves every task running; a restarted controller adopts them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from kernel.errors import KernelError
from kernel.gcpause import gc_paused
from kernel.iptables import OwnedTable
from kernel.system import Kernel
from meshctl import ipam, runtime
from meshctl.controller import names, updater
from meshctl.controller.diff import write_dns_ports
from meshctl.controller.discovery import dns_view, lb_specs
from meshctl.controller.node import (
    TaskNetSpec,
    container_spec,
    desired_node,
    plan_node,
    published_ports,
)
from meshctl.controller.node_kernel import (
    apply_node,
    blocked_ports,
    observe_node,
    set_node_sysctls,
)
from meshctl.controller.supervisor import Local, Supervisor
from meshctl.controller.view import ClusterView, read_view
from meshctl.dns import DnsServer, DnsView
from meshctl.dns.thread import ServerThread
from meshctl.lb.reconcile import LbReconciler, choose_backend
from meshctl.model import NODE, HealthCheck, Node, NodeState, Task
from meshctl.store import Compacted, Store

log = logging.getLogger("meshctl.controller")

HEARTBEAT_PERIOD = 5.0  # well inside ops.HEARTBEAT_TIMEOUT


class Controller:
    """One node's controller: the store, the kernel, and what it supervises."""

    def __init__(
        self,
        store: Store,
        kernel: Kernel,
        node: str,
        state_dir: str,
        *,
        resync_period: float = 10.0,
        lb_backend: str = "auto",
        upstreams: list[str] | None = None,
    ) -> None:
        self.store = store
        self.kernel = kernel
        self.node = node
        self.node_id = self._register()
        self.state_dir = state_dir
        self.resync_period = resync_period
        backend = choose_backend(kernel, lb_backend)
        self.lb = LbReconciler(kernel, backend)
        self.dns = ServerThread(DnsServer(upstreams or []))
        self.supervisor = Supervisor(
            store, node, state_dir, open_connections=self._open_connections
        )
        self._adopted = False
        self._last_heartbeat = 0.0
        self._last_full_lb = -float("inf")  # monotonic time of the last full LB observe
        self._last_full_node = -float("inf")  # and of the node's task namespaces
        self._wired_tasks: dict[str, TaskNetSpec] = {}  # seen or made as desired since then
        self._node_tables: dict[str, OwnedTable] | None = None  # the node's rules, likewise
        self._last_view: ClusterView | None = None
        self._dns_view: DnsView | None = None
        self._dns_ports: dict[str, tuple[int, int]] = {}  # task id → (udp, tcp) in its namespace
        self._dns_networks: dict[str, frozenset[str]] = {}
        self._monitors: dict[str, asyncio.Task[None]] = {}
        self._exit_fds: dict[int, int] = {}  # pid → our dup of its pidfd
        self._stop_watching = False
        log.info("node=%s id=%s lb_backend=%s", node, self.node_id, backend)

    def _register(self) -> str:
        """This node's record (made on first start): its id names the node's LB namespaces."""
        record = self.store.get(NODE, self.node)
        node = Node.from_dict(record.value) if record else Node(self.node, heartbeat=time.time())
        if record is None:
            self.store.put(NODE, self.node, node.to_dict(), expect=0)
        return node.id

    # -- one pass (runs in the worker thread) --------------------------------------------------

    def reconcile_once(self) -> float:
        """One full pass; returns the time by which the next one is due."""
        with gc_paused():  # a pass builds many objects that form no cycles (kernel/gcpause.py)
            return self._reconcile_once()

    def _reconcile_once(self) -> float:
        view = read_view(self.store)
        if updater.roll(self.store, view):
            view = read_view(self.store)
        if self.supervisor.claim(view) | self._claim_lb_addresses(view):
            view = read_view(self.store)
        self._last_view = view
        self._sync_dns_records(view)  # first: answers follow the store within one store poll
        if not self._adopted:
            self.supervisor.adopt(view)
            self._adopted = True
        self._sync_node(view)
        # Task namespaces after wiring; adding DNS endpoints below creates or removes none.
        present = set(self.kernel.netns.list_namespaces(names.TASK_NETNS_PREFIX))
        if self._sync_dns_endpoints(view, present):
            self._sync_node(view)  # the new endpoints' redirect rules
        self._sync_lb(view)
        unwired = {tid for tid in view.tasks if names.task_netns(tid) not in present}
        deadline = self.supervisor.step(view, unwired)
        self._heartbeat()
        return min(
            deadline, time.time() + self.resync_period, self._last_heartbeat + HEARTBEAT_PERIOD
        )

    def _claim_lb_addresses(self, view: ClusterView) -> bool:
        """A load-balancer address on every network for this node (IPAM gives one per node)."""
        missing = [
            n for n in view.networks.values() if (n.name, self.node) not in view.lb_addresses
        ]
        for network in missing:
            ipam.allocate_lb_address(self.store, network, self.node)
        return bool(missing)

    def _sync_dns_endpoints(self, view: ClusterView, present: set[str]) -> bool:
        """DNS sockets in every wired task namespace (of those present), none in the others;
        True if any was added."""
        wanted = {
            tid: frozenset(view.tasks[tid].addresses)
            for tid in self.supervisor.wired(view)
            if tid in view.tasks and names.task_netns(tid) in present
        }
        for task_id in set(self._dns_ports) - set(wanted):
            self.dns.remove_endpoint(task_id)
            del self._dns_ports[task_id]
        added = False
        for task_id, networks in wanted.items():
            if task_id in self._dns_ports and self._dns_networks.get(task_id) == networks:
                continue
            try:
                ports = self.dns.add_endpoint(task_id, names.task_netns(task_id), networks)
            except KernelError as err:
                log.warning("no DNS for task %s yet: %s", task_id, err)
                continue
            self._dns_ports[task_id] = ports
            self._dns_networks[task_id] = networks
            write_dns_ports(self.supervisor.task_dir(task_id), ports)  # for meshctl diff
            added = True
        return added

    def _sync_dns_records(self, view: ClusterView) -> None:
        records = dns_view(view)
        if records != self._dns_view:
            self.dns.update(records)
            self._dns_view = records

    def _sync_lb(self, view: ClusterView) -> None:
        """The load balancers: a full observe once per resync period (it repairs drift and
        checks convergence); in between, only the services whose spec changed."""
        specs = lb_specs(view, self.node, self.node_id)
        prefix = names.lb_netns_prefix(self.node_id)
        now = time.monotonic()
        if now - self._last_full_lb < self.resync_period:
            plan = self.lb.sync_changed(specs, prefix)
            if not plan.empty:
                log.info("applied load-balancer changes to %d namespace(s)", len(plan.changes))
            return
        self._last_full_lb = now
        plan = self.lb.plan(specs, prefix)
        if plan.empty:
            return
        log.info("applying load-balancer plan")
        self.lb.apply(plan)
        if not self.lb.plan(specs, prefix).empty:
            log.warning("load balancer not converged after apply")

    def _open_connections(self, task: Task) -> int:
        """TCP connections the task still serves through this node's load balancers."""
        total = 0
        for network, address in task.addresses.items():
            net = self._last_view.networks.get(network) if self._last_view else None
            if net is None:
                continue
            try:
                total += self.kernel.conntrack.count_tcp_connections(
                    names.lb_netns(self.node_id, net.id), address
                )
            except KernelError:
                continue  # no LB namespace (yet): nothing goes through it
        return total

    def _sync_node(self, view: ClusterView) -> None:
        """The node's bridges, task legs and rules. Tasks known to be wired and the node's rules
        known to be right are not read back between full observes (once per resync period),
        so a pass costs what changed."""
        containers = [
            spec
            for c in view.containers.values()
            if c.node == self.node and (spec := container_spec(view, c)) is not None
        ]
        full = time.monotonic() - self._last_full_node >= self.resync_period
        if full:
            self._last_full_node = time.monotonic()
            self._wired_tasks, self._node_tables = {}, None
        mine = {task.id for task in view.tasks_on(self.node)}
        actual, stray = observe_node(
            self.kernel, containers, self._wired_tasks, mine, self._node_tables
        )
        blocked = self._blocked_ports(view, actual.tables.get("nat", OwnedTable()))
        desired = desired_node(
            view, self.node, self.supervisor.wired(view), self._dns_ports, blocked
        )
        plan = plan_node(desired, actual, stray)
        if plan:
            log.info("applying node plan %s", _summary(plan))
            apply_node(self.kernel, plan)
            changed = {t.netns for t in plan.wire_tasks} | {ns for ns, _ in plan.task_rules}
            known = {k: v for k, v in self._wired_tasks.items() if v.netns not in changed}
            tables = None if plan.tables else self._node_tables
            actual, stray = observe_node(self.kernel, containers, known, mine, tables)
            residue = plan_node(desired, actual, stray)
            if residue:  # the convergence check: after applying, a second diff must be empty
                log.warning("node not converged after apply: %s", _summary(residue))
        self._wired_tasks = {
            task_id: spec
            for task_id, spec in desired.tasks.items()
            if spec.owns_netns and actual.tasks.get(task_id) == spec
        }
        self._node_tables = desired.tables if actual.tables == desired.tables else None

    def _blocked_ports(self, view: ClusterView, nat: OwnedTable) -> set[tuple[int, str]]:
        """Published ports that another process of this node holds: left to it, and said on the
        service's tasks. A port meshctl already catches stays meshctl's."""
        wanted = published_ports(view)
        blocked = blocked_ports(self.kernel, view, nat)
        errors = {
            wanted[key]: f"published port {key[0]}/{key[1]} is in use on node {self.node} by "
            "another process; free it or publish another port"
            for key in sorted(blocked)
        }
        for message in set(errors.values()) - set(self.supervisor.port_errors.values()):
            log.warning("%s", message)
        self.supervisor.port_errors = errors
        return blocked

    def _heartbeat(self, state: NodeState = "ready") -> None:
        now = time.time()
        if state == "ready" and now - self._last_heartbeat < HEARTBEAT_PERIOD:
            return
        record = self.store.get(NODE, self.node)
        node = Node.from_dict(record.value) if record else Node(self.node)
        self.store.put(NODE, self.node, replace(node, state=state, heartbeat=now).to_dict())
        self._last_heartbeat = now

    # -- the loop ------------------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        wake_event = asyncio.Event()
        stopping = asyncio.Event()

        def wake() -> None:
            loop.call_soon_threadsafe(wake_event.set)

        self.supervisor.wake = wake
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        set_node_sysctls(self.kernel)
        self.dns.__enter__()
        watcher = threading.Thread(target=self._watch_store, args=(wake,), daemon=True)
        watcher.start()
        worker = ThreadPoolExecutor(1, thread_name_prefix="reconcile")
        log.info("controller started node=%s state_dir=%s", self.node, self.state_dir)
        try:
            while not stopping.is_set():
                wake_event.clear()
                try:
                    deadline = await loop.run_in_executor(worker, self.reconcile_once)
                except Exception:
                    log.exception("reconcile pass failed; retrying")
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
            for monitor in self._monitors.values():
                monitor.cancel()
            worker.shutdown(wait=True)
            self.dns.__exit__(None, None, None)
            self._stop_watching = True
            with contextlib.suppress(Exception):
                self._heartbeat("down")
            log.info("controller stopped; tasks keep running")

    def _watch_store(self, wake: Callable[[], None]) -> None:
        """Wake the loop on every store change (the CLI's writes and our own)."""
        revision = self.store.revision()
        while not self._stop_watching:
            try:
                events = self.store.watch(revision, timeout=1.0)
            except Compacted:
                revision = self.store.revision()
                wake()
                continue
            if events:
                revision = events[-1].revision
                wake()

    def _watch_exits(self, loop: asyncio.AbstractEventLoop, wake: Callable[[], None]) -> None:
        """Wake the loop when a task process exits: its pidfd turns readable."""
        for local in self.supervisor.tasks.values():
            process = local.process
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
                log.info("health %s: %s", state, result.output.strip()[:200])
                wake()

            self._monitors[task_id] = asyncio.ensure_future(
                runtime.monitor(check, names.task_netns(task_id), pid, address, on_change)
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


def _summary(plan: object) -> str:
    return " ".join(f"{k}={len(v)}" for k, v in vars(plan).items() if v)
