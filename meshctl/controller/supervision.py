"""What watches the node's task processes beside the supervisor: a health monitor per running
task whose service has a check, a wake-up when a task process or the router exits (its pidfd
turns readable), and the count of connections a draining task still serves."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable

from kernel.errors import KernelError
from kernel.system import Kernel
from meshctl import naming, runtime
from meshctl.controller.supervisor import Local, Supervisor
from meshctl.model import HealthCheck, Task
from meshctl.router.sync import RouterSync
from meshctl.store import Store
from meshctl.view import ClusterView

log = logging.getLogger("meshctl.controller")


class Supervision:
    """The supervisor of the node's tasks and its watchers (run on the controller's loop).

    last_view: the view of the last pass (None before the first)."""

    def __init__(
        self,
        store: Store,
        node: str,
        node_id: str,
        state_dir: str,
        kernel: Kernel,
        router: RouterSync,
        last_view: Callable[[], ClusterView | None],
        on_health: Callable[[runtime.HealthState], None],
    ) -> None:
        self.supervisor = Supervisor(store, node, state_dir, open_connections=self.open_connections)
        self.node_id = node_id
        self.kernel = kernel
        self.router = router
        self.last_view = last_view
        self.on_health = on_health
        self._adopted = False
        self._monitors: dict[str, asyncio.Task[None]] = {}
        self._exit_fds: dict[int, int] = {}  # pid → our dup of its pidfd

    def wired(self, view: ClusterView) -> frozenset[str]:
        """The tasks whose namespaces must exist (after adopting, on the first pass, the
        processes an earlier controller started)."""
        if not self._adopted:
            self.supervisor.adopt(view)
            self._adopted = True
        return frozenset(self.supervisor.wired(view))

    def open_connections(self, task: Task) -> int:
        """TCP connections the task still serves: those its servers hold (whichever node's
        load balancer sent them), those through this node's load balancers still being set
        up, and requests through its router."""
        total = self.router.open_requests(task)
        with contextlib.suppress(KernelError, OSError):  # its namespace is gone: nothing more
            total += self.kernel.sockets.served_connections(naming.task_netns(task.id))
        view = self.last_view()
        for network, address in task.addresses.items():
            net = view.networks.get(network) if view else None
            if net is None:
                continue
            try:
                total += self.kernel.conntrack.count_tcp_connections(
                    naming.lb_netns(self.node_id, net.id), address
                )
            except KernelError:
                continue  # no LB namespace (yet): nothing goes through it
        return total

    def watch(self, loop: asyncio.AbstractEventLoop, wake: Callable[[], None]) -> None:
        """After each pass: watch new processes' exits, and keep the health monitors."""
        self._watch_exits(loop, wake)
        self._sync_monitors(wake)

    def stop(self) -> None:
        for monitor in self._monitors.values():
            monitor.cancel()

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
        wanted: dict[str, tuple[int, HealthCheck, str]] = {}
        for task_id, local in self.supervisor.tasks.items():
            spec = self._health_target(task_id)
            if local.process is not None and spec is not None:
                wanted[task_id] = (local.process.pid, *spec)
        for task_id in set(self._monitors) - set(wanted):
            self._monitors.pop(task_id).cancel()
        for task_id, (pid, check, address) in wanted.items():
            if task_id in self._monitors and not self._monitors[task_id].done():
                continue
            local = self.supervisor.tasks[task_id]

            async def on_change(
                state: runtime.HealthState, result: runtime.ProbeResult, local: Local = local
            ) -> None:
                local.health = state
                self.on_health(state)
                log.info("health %s: %s", state, result.output.strip()[:200])
                wake()

            self._monitors[task_id] = asyncio.ensure_future(
                runtime.monitor(check, naming.task_netns(task_id), pid, address, on_change)
            )

    def _health_target(self, task_id: str) -> tuple[HealthCheck, str] | None:
        view = self.last_view()
        if view is None or task_id not in view.tasks:
            return None
        task = view.tasks[task_id]
        service = view.service_of(task)
        if service is None or service.health is None or not task.addresses:
            return None
        return service.health, next(iter(task.addresses.values()))
