"""`meshctl doctor` in the QEMU lane's kernel (Debian's, ip_vs loaded): it reports IPVS and
`auto` picks the ipvs backend. On a host without IPVS the ipvs_kernel fixture skips, saying why.

The CLI runs in this process (click's runner): a fresh interpreter per run costs most of a
minute under the lane's emulated CPU, and the probes are the same either way.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner, Result

from kernel import features, netns
from meshctl.cli import main

pytestmark = [pytest.mark.root, pytest.mark.ipvs]


def doctor(*args: str) -> Result:
    return CliRunner().invoke(main, ["doctor", *args])


def test_doctor_reports_ipvs_and_picks_it(ipvs_kernel: None) -> None:
    done = doctor("--format", "json")

    assert done.exit_code == 0, (done.stdout, done.stderr, done.exception)
    doc = json.loads(done.stdout)
    ipvs = next(c for c in doc["checks"] if c["name"] == "ipvs")
    assert ipvs["ok"] is True and ipvs["status"] == "ok", ipvs
    assert doc["lb_backend"] == "ipvs"
    assert doc["ok"] is True
    assert netns.list_namespaces(features.DOCTOR_NS_PREFIX) == []


def test_doctor_table_names_ipvs(ipvs_kernel: None) -> None:
    done = doctor()

    assert done.exit_code == 0, (done.stdout, done.stderr, done.exception)
    lines = done.stdout.splitlines()
    # The CHECK table, up to the blank line before the SYSCTL table.
    rows = {line.split()[0]: line.split()[1] for line in lines[1 : lines.index("")]}
    assert rows["ipvs"] == "ok"
    assert lines[-2:] == [
        "lb_backend: ipvs (ipvs is the first choice and works here)",
        "verdict: ok, the mesh can run here",
    ]
