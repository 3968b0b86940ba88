"""`meshctl doctor`: probe the kernel (kernel.features), decide whether the mesh can run, print it.

The verdict and both renderings are pure functions of the checks, so they are unit-tested with
made-up results; only run_doctor touches the kernel, through kernel.features.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import click

from kernel import features
from kernel.features import Check, LbBackend, pick_lb_backend
from meshctl.output import dumps, table

Status = Literal["ok", "missing", "info"]


def status(check: Check) -> Status:
    """What the STATUS column says: an informational check is never a verdict."""
    if check.info:
        return "info"
    return "ok" if check.ok else "missing"


def missing_required(checks: Sequence[Check]) -> list[Check]:
    """The checks that stop the mesh from running."""
    return [c for c in checks if c.required and not c.ok]


def lb_backend(checks: Sequence[Check]) -> LbBackend:
    """The backend `auto` would pick, from the ipvs check (absent means no IPVS)."""
    return pick_lb_backend(any(c.name == "ipvs" and c.ok for c in checks))


def report_json(checks: Sequence[Check]) -> dict[str, Any]:
    """The stable JSON: checks in probe order, the auto backend, and the verdict."""
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
        "lb_backend": lb_backend(checks),
        "ok": not missing_required(checks),
    }


def verdict_line(checks: Sequence[Check]) -> str:
    missing = missing_required(checks)
    if not missing:
        return "verdict: ok, the mesh can run here"
    return f"verdict: the mesh cannot run here: {', '.join(c.name for c in missing)} missing"


def report_table(checks: Sequence[Check]) -> str:
    """Aligned CHECK / STATUS / DETAIL rows, then the auto backend and the verdict."""
    rows = ([c.name, status(c), c.detail] for c in checks)
    return "\n".join(
        [
            table(["CHECK", "STATUS", "DETAIL"], rows),
            f"lb_backend: {lb_backend(checks)}",
            verdict_line(checks),
        ]
    )


def render(checks: Sequence[Check], fmt: Literal["table", "json"]) -> tuple[str, list[str], int]:
    """(stdout text, stderr lines, exit code): one stderr line per missing required piece."""
    out = dumps(report_json(checks)) if fmt == "json" else report_table(checks)
    reasons = [f"meshctl doctor: {c.name} missing: {c.detail}" for c in missing_required(checks)]
    return out, reasons, 1 if reasons else 0


def run_doctor(fmt: Literal["table", "json"]) -> int:
    """Probe, print the report (stdout) and the reasons (stderr); 0 iff the mesh can run."""
    if not features.privileged():
        click.echo(features.NOT_PRIVILEGED, err=True)
        return 1
    out, reasons, code = render(features.probe(), fmt)
    click.echo(out)
    for reason in reasons:
        click.echo(reason, err=True)
    return code
