"""The node's HTTP router, kept in line with the view: its addresses, namespace and HAProxy.

Each pass: claim (or release) the router's address on each network it joins (with the LB
addresses); then, right after the DNS records (a route change is a reload away from
serving), wire its namespace (controller.router_net) and run HAProxy: started on a checked
configuration if it does not run (restarted with back-off after it exits, adopted after a
controller restart), reloaded when what only a reload changes (routes, backends,
certificates, ports) differs from what it loaded, and otherwise given its servers' changes
through the runtime API. When the namespace needs a bridge the node's networking has not
made yet, the controller runs it again after that. A configuration `haproxy -c` refuses is
reported and never loaded: the router keeps serving the last good one. The namespace and
the runtime state are observed in full once per resync period and trusted in between."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping

from kernel.errors import KernelError
from kernel.system import Kernel
from meshctl import ipam, naming, runtime
from meshctl.model import MeshctlError, Task
from meshctl.node.desired import TaskNetSpec
from meshctl.overlay.vxlan import NO_UNDERLAY, Underlay
from meshctl.router import haproxy
from meshctl.router.config import RouterFiles, crt_list, fingerprint_of, render
from meshctl.router.desired import router_spec
from meshctl.router.net import (
    apply_router_net,
    describe_net,
    plan_router_net,
    router_net_spec,
)
from meshctl.router.slots import plan_runtime
from meshctl.router.spec import RouterSpec
from meshctl.store import Store
from meshctl.view import ClusterView

log = logging.getLogger("meshctl.router")

ROUTER = "router"  # the key of the router's failures in the node's status
BACKOFF_FIRST = 0.5  # seconds before the first restart; doubles up to BACKOFF_CAP
BACKOFF_CAP = 30.0
STABLE_RUN = 10.0  # a run this long resets the back-off
STOP_GRACE = 2.0


class _Unseen:
    """Not looked at since the last full resync."""


UNSEEN = _Unseen()


def router_files(state_dir: str) -> RouterFiles:
    return RouterFiles(os.path.join(state_dir, "router"))


class RouterSync:
    """One node's router: claims, wiring, the HAProxy process and its configuration."""

    def __init__(
        self,
        store: Store,
        kernel: Kernel,
        node: str,
        node_id: str,
        state_dir: str,
        resync_period: float,
        underlay: Underlay = NO_UNDERLAY,
    ) -> None:
        self.store = store
        self.kernel = kernel
        self.node = node
        self.node_id = node_id
        self.files = router_files(state_dir)
        self.resync_period = resync_period
        self.underlay = underlay
        self.process: runtime.TaskProcess | None = None
        self._adopted = False
        self._loaded: str | None = None  # the fingerprint of what HAProxy runs
        self._applied: RouterSpec | None = None  # the spec whose servers HAProxy has
        # The namespace as last seen or made (None: none), if seen since the last full resync.
        self._wired: TaskNetSpec | None | _Unseen = UNSEEN
        self._last_full = -float("inf")
        self._started_at = 0.0
        self._failures = 0
        self._not_before = 0.0
        self._pems: dict[str, str] = {}  # host → certificate and key, as HAProxy reads them
        # The namespace could not be wired (a bridge it joins is not made yet, say): the
        # controller runs this again after the node's networking.
        self.needs_node = False

    # -- addresses -----------------------------------------------------------------------------

    def claim_addresses(self, view: ClusterView, errors: dict[str, str]) -> bool:
        """An address on every network the router joins, none on the others; True if the
        store changed."""
        wanted = view.router_networks()
        have = {net for (net, owner) in view.router_addresses if owner == self.node}
        owner = ipam.router_owner(self.node)
        changed = False
        for name in sorted(wanted ^ have):
            network = view.networks.get(name)
            if network is None:
                continue
            try:
                if name in wanted:
                    ipam.allocate_node_address(
                        self.store, network, owner, f"the router of node {self.node}"
                    )
                else:
                    ipam.release_node_address(self.store, network, owner)
                changed = True
            except MeshctlError as err:
                errors[ROUTER] = f"network {name}: {err}"
        return changed

    # -- the pass ------------------------------------------------------------------------------

    def sync(
        self, view: ClusterView, port_errors: Mapping[str, str] | None = None
    ) -> tuple[dict[str, str], float]:
        """Bring the router in line with the view: (what failed, the next deadline).
        port_errors: why the node does not publish a port, by publisher (the node's
        reconciler finds ports another process holds)."""
        now = time.time()
        held = (port_errors or {}).get(view.router.id) if view.router else None
        if not self._adopted:
            self._adopt()
        full = time.monotonic() - self._last_full >= self.resync_period
        if full:
            self._last_full = time.monotonic()
            self._wired, self._applied = UNSEEN, None
        spec = router_spec(view, self.node)
        if spec is None:
            self._stop()
            return self._wire(None), now + 3600
        self._pems = {
            c.host: f"{c.cert.rstrip()}\n{c.key.rstrip()}\n" for c in view.certificates.values()
        }
        errors = self._wire(router_net_spec(view, self.node, self.node_id, self.underlay))
        if errors:
            return errors, now + 1.0
        # HAProxy's alerts and server changes, kept bounded as a task's output is.
        runtime.rotate_log(self.files.log, runtime.LOG_MAX_BYTES, runtime.LOG_KEEP)
        try:
            deadline = self._run(spec, now)
        except (MeshctlError, KernelError, OSError) as err:
            log.warning("router: %s", err)
            return {ROUTER: str(err)}, now + 1.0
        return ({ROUTER: held} if held else {}), deadline

    def _wire(self, desired: TaskNetSpec | None) -> dict[str, str]:
        self.needs_node = False
        if desired == self._wired:
            return {}
        try:
            plan = plan_router_net(self.kernel, desired, self.node_id)
            if plan:
                log.info("router namespace: %s", "; ".join(describe_net(plan)))
                apply_router_net(self.kernel, plan, desired)
        except KernelError as err:
            self._wired = UNSEEN
            self.needs_node = True
            return {ROUTER: f"cannot set up the router's namespace: {err}"}
        if plan.clashes:
            self._wired = UNSEEN
            name, alias = plan.clashes[0]
            return {ROUTER: naming.clash_text(name, alias)}
        self._wired = desired
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
