"""The node's HTTP router, kept in line with the view: its namespace and HAProxy.

Each pass, after the node's networking (its namespace joins the bridges the node makes), wire
its namespace (router.net) and run HAProxy: started on a checked configuration if it does not
run (restarted with back-off after it exits, adopted after a controller restart), reloaded
when what only a reload changes (routes, backends, certificates, ports) differs from what it
loaded, and otherwise given its servers' changes through the runtime API. A configuration
`haproxy -c` refuses is reported and never loaded: the router keeps serving the last good one.
The namespace and the runtime state are observed in full on a full pass (ResyncClock) and
trusted in between. Its addresses on the networks it joins are claimed by the cluster
(cluster.claims) before the pass reaches it."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

from kernel.errors import KernelError
from kernel.system import Kernel
from meshctl import naming, runtime
from meshctl.model import MeshctlError, Task
from meshctl.node.desired import TaskNetSpec
from meshctl.overlay.vxlan import NO_UNDERLAY, Underlay
from meshctl.reconcile import PassContext
from meshctl.router import haproxy
from meshctl.router.config import RouterFiles, crt_list, fingerprint_of, render
from meshctl.router.desired import router_spec
from meshctl.router.net import (
    RouterNetPlan,
    apply_router_net,
    describe_net,
    plan_router_net,
    router_net_spec,
)
from meshctl.router.slots import plan_runtime
from meshctl.router.spec import RouterSpec
from meshctl.view import ClusterView

log = logging.getLogger("meshctl.router")

ROUTER = "router"  # the key of the router's failures in the node's status
# The router's state in a status written before the controller's first pass: the routing mesh
# of other nodes sends to this node's router only once a pass found it serving (#27).
ROUTER_STARTING = "not serving yet: the controller has not run its first pass"
BACKOFF_FIRST = 0.5  # seconds before the first restart; doubles up to BACKOFF_CAP
BACKOFF_CAP = 30.0
STABLE_RUN = 10.0  # a run this long resets the back-off
STOP_GRACE = 2.0


class _Unseen:
    """Not looked at since the last full resync."""


UNSEEN = _Unseen()


def router_files(state_dir: str) -> RouterFiles:
    return RouterFiles(os.path.join(state_dir, "router"))


@dataclass(frozen=True)
class RouterPlan:
    """The router's configuration (None: no router on this node), its namespace as desired,
    and the change to make to it (None: as last seen or made; or why it cannot be planned).
    held: why the node does not publish the router's ports (another process holds one);
    pems: each host's certificate and key, as HAProxy reads them."""

    spec: RouterSpec | None
    net: TaskNetSpec | None
    change: RouterNetPlan | None = None
    unplanned: str = ""
    held: str = ""
    pems: dict[str, str] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.change)


class RouterSync:
    """One node's router: wiring, the HAProxy process and its configuration."""

    name = "router"
    converges = True

    def __init__(
        self,
        kernel: Kernel,
        node: str,
        node_id: str,
        state_dir: str,
        underlay: Underlay = NO_UNDERLAY,
    ) -> None:
        self.kernel = kernel
        self.node = node
        self.node_id = node_id
        self.files = router_files(state_dir)
        self.underlay = underlay
        self.process: runtime.TaskProcess | None = None
        self._adopted = False
        self._loaded: str | None = None  # the fingerprint of what HAProxy runs
        self._applied: RouterSpec | None = None  # the spec whose servers HAProxy has
        # The namespace as last seen or made (None: none), if seen since the last full resync.
        self._wired: TaskNetSpec | None | _Unseen = UNSEEN
        self._started_at = 0.0
        self._failures = 0
        self._not_before = 0.0
        self._pems: dict[str, str] = {}  # host → certificate and key, as HAProxy reads them

    # -- the pass ------------------------------------------------------------------------------

    def plan(self, view: ClusterView, ctx: PassContext) -> RouterPlan:
        """The router's configuration and the change its namespace needs (read from the
        kernel unless it is as last seen or made, and the pass is not a full one)."""
        if ctx.full:
            self._wired, self._applied = UNSEEN, None
        spec = router_spec(view, self.node)
        held = (ctx.port_errors.get(view.router.id) or "") if view.router else ""
        pems = {
            c.host: f"{c.cert.rstrip()}\n{c.key.rstrip()}\n" for c in view.certificates.values()
        }
        desired = router_net_spec(view, self.node, self.node_id, self.underlay) if spec else None
        plan = RouterPlan(spec, desired, held=held, pems=pems if spec else {})
        if desired == self._wired:
            return plan
        try:
            return replace(plan, change=plan_router_net(self.kernel, desired, self.node_id))
        except KernelError as err:
            return replace(plan, unplanned=str(err))

    def apply(self, plan: RouterPlan, ctx: PassContext) -> dict[str, str]:
        """Wire the namespace, run HAProxy as the plan's configuration says; returns what
        failed and tells the pass when it is next due."""
        now = time.time()
        if not self._adopted:
            self._adopt()
        if plan.spec is None:
            self._stop()
            ctx.due(now + 3600)
            return self._wire(plan)
        self._pems = plan.pems
        errors = self._wire(plan)
        if errors:
            ctx.due(now + 1.0)
            return errors
        # HAProxy's alerts and server changes, kept bounded as a task's output is.
        runtime.rotate_log(self.files.log, runtime.LOG_MAX_BYTES, runtime.LOG_KEEP)
        try:
            ctx.due(self._run(plan.spec, now))
        except (MeshctlError, KernelError, OSError) as err:
            log.warning("router: %s", err)
            ctx.due(now + 1.0)
            return {ROUTER: str(err)}
        return {ROUTER: plan.held} if plan.held else {}

    def describe(self, plan: RouterPlan) -> Iterator[str]:
        """The namespace's differences, then whether HAProxy runs the configuration the store
        asks for (read from its files: a reload is due if not) and the server changes the
        runtime API would make."""
        if plan.unplanned:
            yield f"! router: cannot read its namespace: {plan.unplanned}"
        if plan.change is not None:
            yield from describe_net(plan.change)
        yield from describe_haproxy(self.files, plan.spec)

    def _wire(self, plan: RouterPlan) -> dict[str, str]:
        if plan.change is None and not plan.unplanned:
            return {}  # as last seen or made
        try:
            if plan.unplanned:
                raise KernelError(plan.unplanned)
            assert plan.change is not None
            if plan.change:
                log.info("router namespace: %s", "; ".join(describe_net(plan.change)))
                apply_router_net(self.kernel, plan.change, plan.net)
        except KernelError as err:
            self._wired = UNSEEN
            return {ROUTER: f"cannot set up the router's namespace: {err}"}
        if plan.change.clashes:
            self._wired = UNSEEN
            name, alias = plan.change.clashes[0]
            return {ROUTER: naming.clash_text(name, alias)}
        self._wired = plan.net
        return {}

    def _run(self, spec: RouterSpec, now: float) -> float:
        process = self.process
        if process is not None and process.exited():
            process.close()
            self.process = process = None
            self._loaded = self._applied = None
            if now - self._started_at < STABLE_RUN:
                self._failures += 1
            else:
                self._failures = 1
            delay = min(BACKOFF_FIRST * 2 ** (self._failures - 1), BACKOFF_CAP)
            self._not_before = now + delay
            log.warning(
                "router: haproxy exited; restarting in %.1fs (see %s)", delay, self.files.log
            )
        if process is None:
            if now < self._not_before:
                return self._not_before
            self._install(spec)
            self.process = haproxy.start(self.files, naming.router_netns(self.node_id))
            self._started_at = now
            self._loaded, self._applied = spec.fingerprint(), spec
            log.info("router: haproxy started pid=%d", self.process.pid)
            return now + 3600
        if spec.fingerprint() != self._loaded:
            try:
                self._reload(spec)
            except haproxy.RouterError:
                # It keeps the configuration it runs, whose servers still follow their tasks.
                self._apply(plan_runtime(spec, haproxy.servers(self.files), partial=True) or [])
                raise
            return now + 3600
        if spec != self._applied:
            commands = plan_runtime(spec, haproxy.servers(self.files))
            if commands is None:
                self._reload(spec)  # new servers do not fit the slots
            else:
                self._apply(commands)
            self._applied = spec
        return now + 3600

    def _apply(self, commands: list[str]) -> None:
        haproxy.apply(self.files, commands)
        if commands:
            log.info("router: through the runtime API: %s", "; ".join(commands))

    def _install(self, spec: RouterSpec) -> None:
        """Certificates and configuration on disk, the configuration checked first."""
        haproxy.check_paths(self.files)
        os.makedirs(self.files.directory, mode=0o700, exist_ok=True)
        pems = {host: self._pems[host] for host in spec.certificates}
        haproxy.write_certificates(self.files, pems, crt_list(spec, self.files))
        haproxy.install(self.files, render(spec, self.files))

    def _reload(self, spec: RouterSpec) -> None:
        assert self.process is not None
        started = time.monotonic()
        self._install(spec)
        installed = time.monotonic()
        haproxy.reload(self.process, self.files)
        self._loaded, self._applied = spec.fingerprint(), spec
        log.info(
            "router: haproxy reloaded (%d routes): configuration written and checked in %.0f ms, "
            "the new worker serving %.0f ms later", len(spec.routes) + len(spec.sni_routes),
            (installed - started) * 1000, (time.monotonic() - installed) * 1000,
        )  # fmt: skip

    def _adopt(self) -> None:
        self._adopted = True
        process = haproxy.adopt(self.files)
        if process is None:
            return
        self.process = process
        self._started_at = time.time() - STABLE_RUN
        self._loaded = fingerprint_of(haproxy.read_config(self.files) or "")
        log.info("router: adopted haproxy pid=%d", process.pid)

    def _stop(self) -> None:
        if self.process is not None:
            self.process.stop(STOP_GRACE)
            self.process.close()
            self.process = None
            haproxy.forget(self.files)
            log.info("router: haproxy stopped")
        self._loaded = self._applied = None

    # -- what others ask -----------------------------------------------------------------------

    def open_requests(self, task: Task) -> int:
        """Requests (and tunnels) the router still has in progress with the task."""
        if self.process is None:
            return 0
        try:
            sessions = haproxy.sessions(self.files)
        except haproxy.RouterError:
            return 0
        return sum(sessions.get(address, 0) for address in set(task.addresses.values()))


def describe_haproxy(files: RouterFiles, spec: RouterSpec | None) -> Iterator[str]:
    """Whether HAProxy runs (adopted from its files), and whether it runs the configuration
    spec asks for: a reload is due if not; otherwise the server changes the runtime API would
    make."""
    process = haproxy.adopt(files)
    if process is not None:
        process.close()
    if spec is None:
        if process is not None:
            yield f"- router haproxy pid {process.pid}"
        return
    if process is None:
        yield "+ router haproxy (not running)"
        return
    if fingerprint_of(haproxy.read_config(files) or "") != spec.fingerprint():
        yield "~ router configuration: routes, certificates or ports changed (reload due)"
        return
    try:
        commands = plan_runtime(spec, haproxy.servers(files))
    except haproxy.RouterError as err:
        yield f"! router: {err}"
        return
    if commands is None:
        yield "~ router servers: more than the slots hold (reload due)"
        return
    yield from (f"~ router: {command}" for command in commands)
