"""`meshctl doctor`: probe the kernel (kernel.features), decide whether the mesh can run, print it.

The backend `auto` would pick is decided as `controller run` decides it
(meshctl.controller.dataplane), over the same backend objects, each judged by the checks of the
kernel features it needs. Every sysctl the dataplane objects set is listed with its value now:
in this namespace for the node's, in a new namespace for the load balancers'. The verdict and
both renderings are pure functions of the checks and readings, so they are unit-tested with
made-up results; only run_doctor touches the kernel, through kernel.features.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from kernel import features
from kernel.errors import KernelError
from kernel.features import Check
from meshctl.controller.dataplane import every_setting, first_available
from meshctl.lb.backend import LbBackend
from meshctl.lb.backends import BACKENDS
from meshctl.overlay.vxlan import PeerProbe
from meshctl.router.haproxy import HAPROXY
from meshctl.store import Store
from meshctl.sysctls import Setting

Status = Literal["ok", "missing", "info"]


@dataclass(frozen=True)
class Reading:
    """A sysctl the controller sets and its value now (None: the kernel has no such key there,
    or it could not be read); by: the dataplane object that lists it (None: every node's)."""

    setting: Setting
    now: str | None
    by: str | None = None


def read_sysctls() -> list[Reading]:
    """Every sysctl of the dataplane objects, read where it will be set: the node's in this
    namespace, the others in a new one (what a new LB namespace starts with)."""
    settings = every_setting()
    elsewhere = [s.key for s, _ in settings if s.place != "node"]
    try:
        fresh = features.new_namespace_sysctls(elsewhere)
    except KernelError:  # no namespace to read them in: the netns check says why
        fresh = {}
    return [
        Reading(
            s, features.sysctl_value(None, s.key) if s.place == "node" else fresh.get(s.key), by
        )
        for s, by in settings
    ]


def where(reading: Reading) -> str:
    place = reading.setting.place
    return place if reading.by is None else f"{place} ({reading.by})"


def status(check: Check) -> Status:
    """What the STATUS column says: an informational check is never a verdict."""
    if check.info:
        return "info"
    return "ok" if check.ok else "missing"


def missing_required(checks: Sequence[Check]) -> list[Check]:
    """The checks that stop the mesh from running."""
    return [c for c in checks if c.required and not c.ok]


def lb_backend(checks: Sequence[Check]) -> str:
    """The backend `auto` would pick: the first whose needed features' checks passed."""
    return _auto(checks)[0].name


def lb_backend_why(checks: Sequence[Check]) -> str:
    """Why `auto` picks it: what the backends before it lack."""
    backend, passed_over = _auto(checks)
    if not passed_over:
        return f"{backend.name} is the first choice and works here"
    return f"{backend.name}, as " + "; ".join(f"{b.name}: {why}" for b, why in passed_over)


def _auto(checks: Sequence[Check]) -> tuple[LbBackend, list[tuple[LbBackend, str]]]:
    """`auto`'s choice among the controller's backends, each judged by the checks of the
    features it needs."""
    return first_available(BACKENDS, lambda backend: unmet(backend.needs, checks))


def unmet(needs: Sequence[str], checks: Sequence[Check]) -> str | None:
    """None if every needed feature's check passed, else the first one's detail ("not probed"
    when there is no check of it)."""
    found = {c.name: c for c in checks}
    for feature in needs:
        check = found.get(feature)
        if check is None:
            return "not probed"
        if not check.ok:
            return check.detail
    return None


def report_json(checks: Sequence[Check], sysctls: Sequence[Reading] = ()) -> dict[str, Any]:
    """The stable JSON: checks in probe order, the sysctls the controller sets, the auto
    backend, and the verdict."""
    return {
        "checks": [
            {
                "name": c.name,
                "ok": c.ok,
                "required": c.required,
                "status": status(c),
                "detail": c.detail,
            }
            for c in checks
        ],
        "sysctls": [
            {
                "namespace": r.setting.place,
                "key": r.setting.key,
                "value": r.now,
                "sets": r.setting.value,
                "backend": r.by,
                "why": r.setting.why,
            }
            for r in sysctls
        ],
        "lb_backend": lb_backend(checks),
        "lb_backend_why": lb_backend_why(checks),
        "ok": not missing_required(checks),
    }


def verdict_line(checks: Sequence[Check]) -> str:
    missing = missing_required(checks)
    if not missing:
        return "verdict: ok, the mesh can run here"
    return f"verdict: the mesh cannot run here: {', '.join(c.name for c in missing)} missing"


def overlay_check(probe: PeerProbe, answered: bool) -> Check:
    """One overlay path as a check: not required to run a node, but traffic to that peer's
    tasks on the network fails without it."""
    name = f"overlay {probe.network} to {probe.peer}"
    if answered:
        return Check(name, True, False, f"{probe.address} answers over VXLAN "
                     f"({probe.local} to {probe.remote}, UDP {probe.port})")  # fmt: skip
    return Check(
        name, False, False,
        f"{probe.address} does not answer over VXLAN: let UDP {probe.port} through between "
        f"{probe.local} and {probe.remote} (both ways), and check both controllers run",
    )  # fmt: skip


def store_checks(store: Store | None) -> list[Check]:
    """The store's protection: a warning for a plain etcd:// store, which anyone who reaches
    it can write (not required to run a node: tests use one)."""
    from meshctl.store.etcd import unprotected_warning

    warning = unprotected_warning(store)
    return [Check("store", False, False, warning)] if warning else []


def overlay_checks(store: Store | None, node: str | None) -> list[Check]:
    """The overlay paths from this node (when it is a node of the store's cluster)."""
    if store is None or node is None:
        return []
    from kernel.system import real_kernel
    from meshctl.overlay.vxlan import VXLAN_PORT, peer_probes, underlay_of
    from meshctl.view import read_view

    view = read_view(store)
    me = view.nodes.get(node)
    if me is None:
        return []
    status = view.statuses.get(node)
    port = status.vxlan_port if status is not None and status.vxlan_port else VXLAN_PORT
    kernel = real_kernel()
    probes = peer_probes(view, node, me.id, underlay_of(kernel, me.address, port))
    return [overlay_check(p, features.pings(p.netns, p.address)) for p in probes]


def router_check() -> Check:
    """HAProxy, which the HTTP router runs on every node (needed only once it is enabled)."""
    found = shutil.which(HAPROXY)
    if found is None:
        return Check(
            "haproxy", False, False,
            "not required unless the HTTP router is enabled; for it: apt-get install haproxy",
        )  # fmt: skip
    try:
        shown = subprocess.run([found, "-v"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired) as err:
        return Check("haproxy", False, False, f"{found} -v fails: {err}")
    version = shown.split("\n", 1)[0].split(" - ", 1)[0]
    return Check("haproxy", True, False, f"{version}: the HTTP router can run here")
