"""`meshctl doctor` on the real kernel, run as a user runs it: exit code, JSON, the backend it
picks, privilege handling, and that probing leaves the host as it was."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kernel import features, netns
from kernel.ipvs import Ipvs
from kernel.sysctl import Sysctl
from meshctl.controller.dataplane import every_setting
from tests.conftest import NetnsFactory, root_namespace_snapshot
from tests.etcd import EtcdServer

pytestmark = pytest.mark.root

REPO = Path(__file__).parents[2]
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
REQUIRED = {"netns", "veth", "bridge", "iptables"}


def meshctl(
    *args: str, prefix: tuple[str, ...] = (), env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the CLI in a process of its own, as a user would."""
    return subprocess.run(
        [*prefix, sys.executable, "-m", "meshctl", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=60,
        check=False,
    )


def host_state() -> dict[str, str]:
    """The root namespace's links, addresses, routes and firewall (the netns list is left out:
    other test runs on this machine add and remove their own namespaces meanwhile)."""
    return {k: v for k, v in root_namespace_snapshot().items() if k != "netns"}


def doctor_json() -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    done = meshctl("doctor", "--format", "json")
    return done, json.loads(done.stdout)


def test_json_on_this_host_exits_0_and_names_the_backend() -> None:
    ipvs_reason = Ipvs().available(None)

    done, doc = doctor_json()

    assert done.returncode == 0, (done.stdout, done.stderr)
    assert done.stderr == ""
    assert doc["ok"] is True
    checks = {c["name"]: c for c in doc["checks"]}
    optional = {"vxlan", "ipvs", "nftables", "conntrack", "br_netfilter", "haproxy"}
    assert set(checks) == REQUIRED | optional
    assert checks["haproxy"]["ok"] and checks["haproxy"]["detail"].startswith("HAProxy version")
    assert all(checks[name]["ok"] and checks[name]["required"] for name in REQUIRED)
    assert "iptables-legacy-save/-restore" in checks["iptables"]["detail"]
    if ipvs_reason:  # this host: no IPVS, so nftables balances (bootstrap installs nft)
        assert checks["ipvs"]["ok"] is False
        assert checks["ipvs"]["status"] == "missing"
        assert ipvs_reason in checks["ipvs"]["detail"]
        assert "nftables or iptables balances instead" in checks["ipvs"]["detail"]
        assert checks["nftables"]["ok"] is True, checks["nftables"]
        assert doc["lb_backend"] == "nftables"
        assert doc["lb_backend_why"].startswith("nftables, as ipvs: ")
    else:
        assert checks["ipvs"]["ok"] is True
        assert doc["lb_backend"] == "ipvs"


def test_a_plain_etcd_store_is_warned_of_without_node(etcd_server: EtcdServer) -> None:
    """`doctor --store etcd://...` warns that anyone who reaches the store controls every node,
    as `controller run` does; the warning does not fail the verdict."""
    done = meshctl("--store", etcd_server.url("/doctor"), "doctor", "--format", "json")
    assert done.returncode == 0, (done.stdout, done.stderr)
    checks = {c["name"]: c for c in json.loads(done.stdout)["checks"]}
    assert not checks["store"]["ok"] and not checks["store"]["required"]
    assert (
        "is unauthenticated: anyone who reaches it controls every node" in checks["store"]["detail"]
    )


def test_sysctls_report_this_namespace_for_the_node_and_a_new_one_for_the_lb(
    netns_factory: NetnsFactory,
) -> None:
    here = Path("/proc/sys/net/ipv4/ip_forward").read_text().strip()
    fresh = Sysctl().get(netns_factory("fresh"), "net.ipv4.ip_forward")

    done, doc = doctor_json()

    assert done.returncode == 0, done.stderr
    listed = {(s["namespace"], s["key"]): s for s in doc["sysctls"]}
    assert set(listed) == {(s.place, s.key) for s, _ in every_setting()}
    assert listed[("node", "net.ipv4.ip_forward")]["value"] == here
    assert listed[("lb", "net.ipv4.ip_forward")]["value"] == fresh
    assert listed[("lb", "net.ipv4.conf.eth0.send_redirects")]["value"] is None  # no eth0 yet
    assert netns.list_namespaces(features.DOCTOR_NS_PREFIX) == []


def test_table_ends_with_backend_and_verdict() -> None:
    done = meshctl("doctor")

    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["CHECK", "STATUS", "DETAIL"]
    # Without IPVS (as here) auto picks nftables, and says why it passed IPVS over.
    expected = "nftables" if Ipvs().available(None) else "ipvs"
    assert lines[-2].startswith(f"lb_backend: {expected} ("), lines[-2]
    assert lines[-1] == "verdict: ok, the mesh can run here"


def test_without_the_iptables_tools_says_which_package_to_install() -> None:
    # A PATH without iptables-legacy-save/-restore, as on a host without the iptables package.
    done = meshctl("doctor", "--format", "json", env={**os.environ, "PATH": "/var/empty"})

    assert done.returncode == 1, (done.stdout, done.stderr)
    (line,) = done.stderr.splitlines()
    assert line.startswith("meshctl doctor: iptables missing: ")
    assert "iptables-legacy-save not found" in line
    assert "install Debian's iptables package" in line
    checks = {c["name"]: c for c in json.loads(done.stdout)["checks"]}
    assert checks["iptables"]["ok"] is False and checks["veth"]["ok"] is True
    assert netns.list_namespaces(features.DOCTOR_NS_PREFIX) == []


def test_probing_leaves_the_host_unchanged() -> None:
    before = host_state()

    done, _ = doctor_json()

    assert done.returncode == 0
    assert host_state() == before
    assert netns.list_namespaces(features.DOCTOR_NS_PREFIX) == []


def test_probe_namespace_is_removed_when_a_probe_crashes(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []

    def crash(ns: str) -> list[features.Check]:
        seen.append(netns.list_namespaces(features.DOCTOR_NS_PREFIX))
        raise RuntimeError("probe crashed")

    monkeypatch.setattr(features, "_in_namespace_checks", crash)

    with pytest.raises(RuntimeError):
        features.probe()

    assert seen == [[f"{features.DOCTOR_NS_PREFIX}{os.getpid()}"]]
    assert netns.list_namespaces(features.DOCTOR_NS_PREFIX) == []


def test_unprivileged_user_gets_one_line_and_exit_1() -> None:
    done = meshctl("doctor", "--format", "json", prefix=tuple(NOBODY))

    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr == features.NOT_PRIVILEGED + "\n"


def test_help_works_without_root() -> None:
    done = meshctl("--help", prefix=tuple(NOBODY))

    assert done.returncode == 0, done.stderr
    assert "doctor" in done.stdout
