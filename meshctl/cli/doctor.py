"""`meshctl doctor`'s printing: the checks of meshctl.controller.doctor as a table or JSON."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import click

from kernel import features
from kernel.features import Check
from meshctl.cli.output import dumps, table
from meshctl.controller.doctor import (
    Reading,
    lb_backend,
    lb_backend_why,
    missing_required,
    overlay_checks,
    read_sysctls,
    report_json,
    router_check,
    status,
    store_checks,
    verdict_line,
    where,
)
from meshctl.store import Store


def report_table(checks: Sequence[Check], sysctls: Sequence[Reading] = ()) -> str:
    """Aligned CHECK / STATUS / DETAIL rows; the sysctls the controller sets (NOW: `-` where
    the key is not there); then the auto backend and the verdict."""
    rows = ([c.name, status(c), c.detail] for c in checks)
    parts = [table(["CHECK", "STATUS", "DETAIL"], rows)]
    if sysctls:
        settings = (
            [r.setting.key, where(r), r.now or "-", r.setting.value, r.setting.why] for r in sysctls
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


def run_doctor(
    fmt: Literal["table", "json"], store: Store | None = None, node: str | None = None
) -> int:
    """Probe, print the report (stdout) and the reasons (stderr); 0 iff the mesh can run.
    With a store, also whether it is protected; with a node of its cluster, every overlay path
    to the node's peers."""
    if not features.privileged():
        click.echo(features.NOT_PRIVILEGED, err=True)
        return 1
    checks = [*features.probe(), router_check(), *store_checks(store), *overlay_checks(store, node)]
    out, reasons, code = render(checks, fmt, read_sysctls())
    click.echo(out)
    for reason in reasons:
        click.echo(reason, err=True)
    return code
