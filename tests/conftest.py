"""Shared fixtures: namespaces that a test makes and always removes, and the root-namespace guard.

Every kernel test builds its world inside namespaces it creates here; nothing touches the root
namespace's links, routes or firewall. The guard snapshots the root namespace at the start of
the session and tests/kernel/test_zz_root_unchanged.py compares at the end.
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator

import pytest

from tests.etcd import EtcdServer

IS_ROOT = os.geteuid() == 0
TEST_NETNS_PREFIX = f"mt{os.getpid()}-"
_counter = itertools.count()


def _time_scale() -> float:
    text = os.environ.get("MESHCTL_TIME_SCALE", "1")
    try:
        scale = float(text)
    except ValueError:
        scale = 0.0
    if not 1 <= scale <= 1000:
        raise ValueError(f"MESHCTL_TIME_SCALE={text!r}: give a factor from 1 to 1000, like 10")
    return scale


# How much slower than a native host this machine runs the tests: 1 natively; tests/vm/guest
# sets it in the QEMU lane, whose emulated CPU (TCG) runs everything several times slower.
TIME_SCALE = _time_scale()


def scaled(seconds: float) -> float:
    """A test's timing on this machine: health-check intervals and timeouts, the controller's
    resync period, every wait and time bound. The one place timings follow the machine, so a
    test is never loosened for a slow host and stays as strict as written on a native one."""
    return seconds * TIME_SCALE


def scaled_duration(seconds: float) -> str:
    """scaled(seconds) as a meshctl duration option (`--health-interval 10s`)."""
    return f"{scaled(seconds):g}s"


def tcp_read(addr: str, port: int, timeout: float = 5.0) -> str:
    """Connect, read until the server closes, return the text: what a client would see."""
    with socket.create_connection((addr, port), timeout=scaled(timeout)) as sock:
        chunks = []
        while chunk := sock.recv(4096):
            chunks.append(chunk)
    return b"".join(chunks).decode().strip()


def udp_read(addr: str, port: int, timeout: float = 2.0) -> str:
    """Send one datagram from a fresh socket (a new flow), return the answer's text."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(scaled(timeout))
        sock.sendto(b"x\n", (addr, port))
        return sock.recv(4096).decode().strip()


def pytest_report_header() -> str | None:
    return f"time scale: {TIME_SCALE:g} (MESHCTL_TIME_SCALE)" if TIME_SCALE != 1 else None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip root tests without root (saying why), give each test its time limit on this
    machine (pytest-timeout's, scaled) and run the root-namespace guard last."""
    skip_root = pytest.mark.skip(reason="needs root: real network namespaces and netfilter")
    limit = pytest.mark.timeout(scaled(float(config.getini("timeout"))))
    for item in items:
        if "root" in item.keywords and not IS_ROOT:
            item.add_marker(skip_root)
        if TIME_SCALE != 1:
            item.add_marker(limit)
    items.sort(key=lambda item: "test_zz_root_unchanged" in item.nodeid)


def root_namespace_snapshot() -> dict[str, str]:
    """What the root namespace holds that no test may change: links, routes, firewall rules
    (iptables legacy and nft, nftables), the netns list, ip_forward."""

    def run(*cmd: str) -> str:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, check=False).stdout
        except FileNotFoundError:
            return ""
        # Comments carry times and counters move on their own; compare chains and rules only.
        lines = (line for line in out.splitlines() if not line.startswith("#"))
        return "\n".join(re.sub(r" \[\d+:\d+\]$", "", line) for line in lines)

    return {
        "links": run("ip", "-o", "link", "show"),
        "addresses": run("ip", "-o", "addr", "show"),
        "routes": run("ip", "route", "show", "table", "all"),
        "iptables-legacy": run("iptables-legacy-save"),
        "iptables-nft": run("iptables-nft-save"),
        # nftables is the default LB backend: every table, chain, set and rule (-s: no counters).
        "nftables": run("nft", "-s", "list", "ruleset"),
        "netns": "\n".join(n for n in _list_netns() if not n.startswith(TEST_NETNS_PREFIX)),
        # New namespaces inherit it: a controller run in the root namespace by mistake shows here.
        "ip_forward": run("sysctl", "-n", "net.ipv4.ip_forward"),
    }


def _list_netns() -> list[str]:
    try:
        return sorted(os.listdir("/var/run/netns"))
    except FileNotFoundError:
        return []


@pytest.fixture(scope="session")
def root_snapshot_at_start() -> dict[str, str]:
    return root_namespace_snapshot()


@pytest.fixture(scope="session", autouse=True)
def _take_root_snapshot(request: pytest.FixtureRequest) -> None:
    if IS_ROOT:
        request.getfixturevalue("root_snapshot_at_start")


def kill_processes_in(ns_path: str) -> None:
    """SIGKILL every process whose network namespace is the one at ns_path."""
    try:
        target = os.stat(ns_path).st_ino
    except FileNotFoundError:
        return
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.stat(f"/proc/{pid}/ns/net").st_ino == target:
                os.kill(int(pid), signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue


NetnsFactory = Callable[[str], str]


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[EtcdServer]:
    """One etcd on a loopback port for the whole run; each test keeps to a key prefix of its own."""
    with EtcdServer() as server:
        yield server


@pytest.fixture
def netns_factory() -> Iterator[NetnsFactory]:
    """Make named namespaces for one test; all are removed afterwards, processes inside killed."""
    from kernel import netns

    made: list[str] = []

    def make(tag: str = "ns") -> str:
        name = f"{TEST_NETNS_PREFIX}{tag}{next(_counter)}"
        netns.create(name)
        made.append(name)
        return name

    try:
        yield make
    finally:
        for name in reversed(made):
            kill_processes_in(netns.path(name))
            netns.delete(name)


@pytest.fixture
def node_ns(netns_factory: NetnsFactory) -> str:
    """One fresh namespace standing in for a host ("node"), loopback up."""
    name = netns_factory("node")
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    return name
