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
import subprocess
from collections.abc import Callable, Iterator

import pytest

from tests.etcd import EtcdServer

IS_ROOT = os.geteuid() == 0
TEST_NETNS_PREFIX = f"mt{os.getpid()}-"
_counter = itertools.count()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip root tests without root (saying why) and run the root-namespace guard last."""
    skip_root = pytest.mark.skip(reason="needs root: real network namespaces and netfilter")
    for item in items:
        if "root" in item.keywords and not IS_ROOT:
            item.add_marker(skip_root)
    items.sort(key=lambda item: "test_zz_root_unchanged" in item.nodeid)


def root_namespace_snapshot() -> dict[str, str]:
    """What the root namespace holds that no test may change: links, routes, rules, netns list."""

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
