"""`meshctl doctor`: probe the kernel (kernel.features), decide whether the mesh can run, print it.

It also lists every sysctl the controller sets (meshctl.sysctls) with its value now: in this
namespace for the node's, in a new namespace for the load balancers'. The verdict and both
renderings are pure functions of the checks and readings, so they are unit-tested with made-up
results; only run_doctor touches the kernel, through kernel.features.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import click

from kernel import features
from kernel.errors import KernelError
from kernel.features import Check
from meshctl.cli.output import dumps, table
from meshctl.lb.backends import NAMES
from meshctl.overlay.vxlan import PeerProbe
from meshctl.router.haproxy import HAPROXY
from meshctl.sysctls import SETTINGS, Setting

Status = Literal["ok", "missing", "info"]


@dataclass(frozen=True)
class Reading:
    """A sysctl the controller sets and its value now (None: the kernel has no such key there,
    or it could not be read)."""

    setting: Setting
    now: str | None


def read_sysctls() -> list[Reading]:
    """Every sysctl of meshctl.sysctls, read where it will be set: the node's in this
    namespace, the load balancers' in a new one (what a new LB namespace starts with)."""
    elsewhere = [s.key for s in SETTINGS if s.place != "node"]
    try:
        fresh = features.new_namespace_sysctls(elsewhere)
    except KernelError:  # no namespace to read them in: the netns check says why
        fresh = {}
    return [
        Reading(s, features.sysctl_value(None, s.key) if s.place == "node" else fresh.get(s.key))
        for s in SETTINGS
    ]


def _where(setting: Setting) -> str:
    return setting.place if setting.backend is None else f"{setting.place} ({setting.backend})"


def status(check: Check) -> Status:
    """What the STATUS column says: an informational check is never a verdict."""
    if check.info:
        return "info"
    return "ok" if check.ok else "missing"


def missing_required(checks: Sequence[Check]) -> list[Check]:
    """The checks that stop the mesh from running."""
    return [c for c in checks if c.required and not c.ok]


def lb_backend(checks: Sequence[Check]) -> str:
    """The backend `auto` would pick: the first whose check passed (absent: not there)."""
    return _pick(checks)[0]


def lb_backend_why(checks: Sequence[Check]) -> str:
    """Why `auto` picks it: what the backends before it lack."""
    name, passed_over = _pick(checks)
    if not passed_over:
        return f"{name} is the first choice and works here"
    return f"{name}, as " + "; ".join(passed_over)


def _pick(checks: Sequence[Check]) -> tuple[str, list[str]]:
    """meshctl.lb.backends' order, each backend probed by the check of its name; the last is
    the fallback (required anyway)."""
    found = {c.name: c for c in checks}
    passed_over: list[str] = []
    for name in NAMES[:-1]:
        check = found.get(name)
        if check is not None and check.ok:
            return name, passed_over
        passed_over.append(f"{name}: {check.detail if check else 'not probed'}")
    return NAMES[-1], passed_over


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
                "backend": r.setting.backend,
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


def report_table(checks: Sequence[Check], sysctls: Sequence[Reading] = ()) -> str:
    """Aligned CHECK / STATUS / DETAIL rows; the sysctls the controller sets (NOW: `-` where
    the key is not there); then the auto backend and the verdict."""
    rows = ([c.name, status(c), c.detail] for c in checks)
    parts = [table(["CHECK", "STATUS", "DETAIL"], rows)]
    if sysctls:
        settings = (
            [r.setting.key, _where(r.setting), r.now or "-", r.setting.value, r.setting.why]
            for r in sysctls
        )
        parts += ["", table(["SYSCTL", "NAMESPACE", "NOW", "SETS", "WHY"], settings)]
    backend = f"lb_backend: {lb_backend(checks)} ({lb_backend_why(checks)})"
    return "\n".join([*parts, backend, verdict_line(checks)])


def render(
    checks: Sequence[Check], fmt: Literal["table", "json"], sysctls: Sequence[Reading] = ()
) -> tuple[str, list[str], int]:
    """(stdout text, stderr lines, exit code): one stderr line per missing required piece."""
    out = dumps(report_json(checks, sysctls)) if fmt == "json" else report_table(checks, sysctls)
    reasons = [f"meshctl doctor: {c.name} missing: {c.detail}" for c in missing_required(checks)]
    return out, reasons, 1 if reasons else 0


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


def overlay_checks(store_url: str | None, node: str | None) -> list[Check]:
    """The overlay paths from this node (when it is a node of the store's cluster)."""
    if store_url is None or node is None:
        return []
    from kernel.system import real_kernel
    from meshctl.overlay.vxlan import VXLAN_PORT, peer_probes, underlay_of
    from meshctl.store import open_store
    from meshctl.view import read_view

    with open_store(store_url) as store:
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


def run_doctor(
    fmt: Literal["table", "json"], store_url: str | None = None, node: str | None = None
) -> int:
    """Probe, print the report (stdout) and the reasons (stderr); 0 iff the mesh can run.
    With a store and a node of its cluster, also every overlay path to the node's peers."""
    if not features.privileged():
        click.echo(features.NOT_PRIVILEGED, err=True)
        return 1
    checks = [*features.probe(), router_check(), *overlay_checks(store_url, node)]
    out, reasons, code = render(checks, fmt, read_sysctls())
    click.echo(out)
    for reason in reasons:
        click.echo(reason, err=True)
    return code
