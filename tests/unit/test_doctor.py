"""`meshctl doctor` without a kernel: verdict, backend choice and both renderings from made-up
checks and sysctl readings, and the CLI's exit codes and streams with the probes replaced."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from kernel import features
from kernel.features import Check, privileged
from meshctl.cli import main
from meshctl.cli.doctor import render, report_table
from meshctl.controller.dataplane import every_setting
from meshctl.controller.doctor import (
    Reading,
    lb_backend,
    lb_backend_why,
    report_json,
    status,
)
from meshctl.lb.backends import BACKENDS
from meshctl.sysctls import node_sysctls

NO_IPVS = "the kernel has no IPVS; not required: the iptables backend balances instead"


def host_like(**broken: str) -> list[Check]:
    """This host's shape (no IPVS); each keyword turns that check into a failure with a reason."""
    checks = [
        Check("netns", True, True, "network namespace created"),
        Check("veth", True, True, "veth pair created"),
        Check("bridge", True, True, "bridge created"),
        Check("vxlan", True, False, "vxlan created"),
        Check("iptables", True, True, "legacy iptables usable"),
        Check("ipvs", False, False, NO_IPVS),
        Check("nftables", False, False, "nft not found; apt-get install nftables"),
        Check("conntrack", True, False, "connection tracking active"),
        Check("br_netfilter", False, False, "not loaded", info=True),
    ]
    return [
        Check(c.name, False, c.required, broken[c.name], c.info) if c.name in broken else c
        for c in checks
    ]


def readings() -> list[Reading]:
    """Every sysctl meshctl sets, as read on a host without IPVS."""
    fresh = {"net.ipv4.ip_forward": "0", "net.ipv4.conf.all.send_redirects": "1"}
    return [Reading(s, fresh.get(s.key), by) for s, by in every_setting()]


def with_ipvs(checks: list[Check]) -> list[Check]:
    return [Check("ipvs", True, False, "IPVS answers") if c.name == "ipvs" else c for c in checks]


def test_host_without_ipvs_can_run_and_picks_iptables() -> None:
    out, reasons, code = render(host_like(), "json")

    doc = json.loads(out)
    assert code == 0 and reasons == []
    assert doc["ok"] is True
    assert doc["lb_backend"] == "iptables"
    ipvs = next(c for c in doc["checks"] if c["name"] == "ipvs")
    assert ipvs == {
        "name": "ipvs",
        "ok": False,
        "required": False,
        "status": "missing",
        "detail": NO_IPVS,
    }


def test_json_keys() -> None:
    doc = report_json(host_like(), readings())
    assert list(doc) == ["checks", "sysctls", "lb_backend", "lb_backend_why", "ok"]
    assert all(list(c) == ["name", "ok", "required", "status", "detail"] for c in doc["checks"])
    assert [c["name"] for c in doc["checks"]] == [c.name for c in host_like()]
    keys = ["namespace", "key", "value", "sets", "backend", "why"]
    assert all(list(s) == keys for s in doc["sysctls"])


def test_every_sysctl_the_controller_sets_is_listed_with_its_value_now() -> None:
    doc = report_json(host_like(), readings())
    listed = {(s["namespace"], s["key"]): s for s in doc["sysctls"]}
    assert listed[("node", "net.ipv4.ip_forward")] == {
        "namespace": "node",
        "key": "net.ipv4.ip_forward",
        "value": "0",
        "sets": "1",
        "backend": None,
        "why": "the node routes between its bridges and out",
    }
    assert listed[("lb", "net.ipv4.vs.conntrack")]["value"] is None  # no IPVS here
    assert listed[("lb", "net.ipv4.vs.conntrack")]["backend"] == "ipvs"
    # What doctor lists is what the controller sets, and all of it: each backend object's.
    assert {k for (place, k) in listed if place == "node"} == set(node_sysctls())
    for backend in BACKENDS:
        wanted = {
            k
            for (place, k), s in listed.items()
            if place == "lb" and s["backend"] in (None, backend.name)
        }
        assert wanted == set(backend.sysctls())


def test_ipvs_present_picks_ipvs() -> None:
    checks = with_ipvs(host_like())
    assert lb_backend(checks) == "ipvs"
    assert json.loads(render(checks, "json")[0])["lb_backend"] == "ipvs"
    assert report_table(checks).splitlines()[-2] == (
        "lb_backend: ipvs (ipvs is the first choice and works here)"
    )


def test_auto_backend_policy() -> None:
    assert lb_backend([]) == "iptables"  # no ipvs or nftables check at all: neither
    nft = [Check("ipvs", False, False, NO_IPVS), Check("nftables", True, False, "works")]
    assert lb_backend(nft) == "nftables"
    assert lb_backend_why(nft) == f"nftables, as ipvs: {NO_IPVS}"
    assert lb_backend(with_ipvs(nft)) == "ipvs"


def test_each_missing_required_piece_fails_with_its_own_line() -> None:
    checks = host_like(veth="no veth; modprobe veth", iptables="no iptables-legacy-save; apt-get")

    out, reasons, code = render(checks, "table")

    assert code == 1
    assert reasons == [
        "meshctl doctor: veth missing: no veth; modprobe veth",
        "meshctl doctor: iptables missing: no iptables-legacy-save; apt-get",
    ]
    assert out.splitlines()[-1] == "verdict: the mesh cannot run here: veth, iptables missing"
    assert json.loads(render(checks, "json")[0])["ok"] is False


def test_optional_pieces_missing_do_not_fail() -> None:
    checks = host_like(vxlan="no vxlan", conntrack="no conntrack")
    out, reasons, code = render(checks, "table")
    assert (code, reasons) == (0, [])
    assert out.splitlines()[-1] == "verdict: ok, the mesh can run here"


def test_status_column() -> None:
    checks = {c.name: c for c in host_like(bridge="no bridge")}
    assert status(checks["netns"]) == "ok"
    assert status(checks["bridge"]) == "missing"
    assert status(checks["ipvs"]) == "missing"
    # Informational checks report a fact, whatever its value.
    assert status(checks["br_netfilter"]) == "info"
    assert status(Check("br_netfilter", True, False, "loaded", info=True)) == "info"


def test_table_is_aligned_and_ends_with_backend_and_verdict() -> None:
    lines = report_table(host_like(), readings()).splitlines()

    blank = lines.index("")
    header, rows, tail = lines[0], lines[1:blank], lines[-2:]
    assert header.split() == ["CHECK", "STATUS", "DETAIL"]
    status_col, detail_col = header.index("STATUS"), header.index("DETAIL")
    by_name = {row.split()[0]: row for row in rows}
    assert list(by_name) == [c.name for c in host_like()]
    for check in host_like():
        row = by_name[check.name]
        assert row[status_col:detail_col].strip() == status(check)
        assert row[detail_col:] == check.detail
    assert tail[0].startswith("lb_backend: iptables (iptables, as ipvs: ")
    assert tail[1] == "verdict: ok, the mesh can run here"
    # Then one row per sysctl: where, the value now ("-": not there) and what it is set to.
    sysctl_header, *sysctl_rows = lines[blank + 1 : -2]
    assert sysctl_header.split() == ["SYSCTL", "NAMESPACE", "NOW", "SETS", "WHY"]
    assert [row.split()[:2] for row in sysctl_rows] == [
        [s.key, s.place] for s, _ in every_setting()
    ]
    assert sysctl_rows[0].split()[2:4] == ["0", "1"]
    conntrack = next(row for row in sysctl_rows if row.startswith("net.ipv4.vs.conntrack "))
    assert conntrack.split()[1:5] == ["lb", "(ipvs)", "-", "1"]


def test_cli_not_privileged_is_one_line_and_exit_1(monkeypatch: pytest.MonkeyPatch) -> None:
    def never() -> list[Check]:
        raise AssertionError("probed without privilege")

    monkeypatch.setattr(features, "privileged", lambda: False)
    monkeypatch.setattr(features, "probe", never)

    result = CliRunner().invoke(main, ["doctor"])

    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr == features.NOT_PRIVILEGED + "\n"


@pytest.mark.parametrize(("broken", "code"), [({}, 0), ({"bridge": "no bridge"}, 1)])
def test_cli_prints_report_and_reasons(
    monkeypatch: pytest.MonkeyPatch, broken: dict[str, str], code: int
) -> None:
    monkeypatch.setattr(features, "privileged", lambda: True)
    monkeypatch.setattr(features, "probe", lambda: host_like(**broken))
    monkeypatch.setattr(features, "sysctl_value", lambda ns, key: "0")
    monkeypatch.setattr(features, "new_namespace_sysctls", lambda keys: dict.fromkeys(keys, "0"))

    result = CliRunner().invoke(main, ["doctor", "--format", "json"])

    assert result.exit_code == code
    doc = json.loads(result.stdout)
    assert doc["ok"] is (code == 0)
    assert [(s["key"], s["value"]) for s in doc["sysctls"]] == [
        (s.key, "0") for s, _ in every_setting()
    ]
    assert result.stderr == ("meshctl doctor: bridge missing: no bridge\n" if broken else "")


@pytest.mark.parametrize(
    ("capeff", "expected"),
    [
        ("000001ffffffffff", True),  # root
        ("0000000000000000", False),  # an ordinary user
        ("0000000000001000", False),  # NET_ADMIN alone cannot make namespaces
        ("0000000000201000", True),  # NET_ADMIN and SYS_ADMIN
    ],
)
def test_privileged_reads_effective_capabilities(
    tmp_path: Path, capeff: str, expected: bool
) -> None:
    status_file = tmp_path / "status"
    status_file.write_text(f"Name:\tmeshctl\nCapInh:\t0000000000000000\nCapEff:\t{capeff}\n")
    assert privileged(str(status_file)) is expected
