"""Fixtures for tests that only make sense in the QEMU lane's kernel: a small IPVS world.

The world is a client, a load-balancer namespace holding the VIP, and two backends each serving
its own name over TCP, wired by veth pairs made inside those namespaces (never in the root one).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from kernel import netns
from kernel.ipvs import Ipvs
from tests.conftest import NetnsFactory, tcp_read

VIP = "10.98.0.100"
VIP_PORT = 80
BACKEND_PORT = 8080


@dataclass(frozen=True)
class Backend:
    ns: str
    addr: str
    name: str


@dataclass(frozen=True)
class IpvsWorld:
    client: str
    lb: str
    backends: tuple[Backend, ...]


def ip(*args: str) -> None:
    """Run one iproute2 command; its stderr becomes the failure message."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise AssertionError(f"ip {' '.join(args)}: {done.stderr.strip()}")


@pytest.fixture
def ipvs_kernel() -> None:
    """Skip, saying why, where the kernel has no IPVS (the host); the lane's kernel has it."""
    reason = Ipvs().available(None)
    if reason:
        pytest.skip(f"{reason}: these tests run in the QEMU lane, tests/vm/run")


@pytest.fixture
def ipvs_world(ipvs_kernel: None, netns_factory: NetnsFactory) -> Iterator[IpvsWorld]:
    """Client 10.98.0.2 → lb (VIP 10.98.0.100, forwarding) → backends 10.97.N.2:8080."""
    client, lb = netns_factory("cli"), netns_factory("lb")
    for ns in (client, lb):
        ip("-n", ns, "link", "set", "lo", "up")
    ip("-n", lb, "link", "add", "l0", "type", "veth", "peer", "name", "c0", "netns", client)
    ip("-n", client, "addr", "add", "10.98.0.2/24", "dev", "c0")
    ip("-n", client, "link", "set", "c0", "up")
    ip("-n", client, "route", "add", "default", "via", "10.98.0.1")
    ip("-n", lb, "addr", "add", "10.98.0.1/24", "dev", "l0")
    ip("-n", lb, "addr", "add", f"{VIP}/32", "dev", "l0")
    ip("-n", lb, "link", "set", "l0", "up")
    # Replies from the backends pass the lb's FORWARD path, where IPVS undoes the masquerade.
    subprocess.run(
        ["ip", "netns", "exec", lb, "sysctl", "-qw", "net.ipv4.ip_forward=1"], check=True
    )

    backends = []
    servers: list[subprocess.Popen[bytes]] = []
    try:
        for i in (1, 2):
            ns, leg = netns_factory(f"be{i}"), f"b{i}"
            addr = f"10.97.{i}.2"
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", lb, "link", "add", leg, "type", "veth", "peer", "name", "eth0", "netns", ns)
            ip("-n", lb, "addr", "add", f"10.97.{i}.1/24", "dev", leg)
            ip("-n", lb, "link", "set", leg, "up")
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
            ip("-n", ns, "route", "add", "default", "via", f"10.97.{i}.1")
            name = f"backend{i}"
            servers.append(
                subprocess.Popen(
                    [
                        "ip",
                        "netns",
                        "exec",
                        ns,
                        "socat",
                        f"TCP-LISTEN:{BACKEND_PORT},fork,reuseaddr",
                        f"SYSTEM:echo {name}",
                    ]  # fmt: skip
                )
            )
            backends.append(Backend(ns=ns, addr=addr, name=name))
        # Ready when each backend answers directly from the lb namespace.
        deadline = time.monotonic() + 10
        for b in backends:
            while True:
                try:
                    assert netns.run_in(lb, tcp_read, b.addr, BACKEND_PORT) == b.name
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
        yield IpvsWorld(client=client, lb=lb, backends=tuple(backends))
    finally:
        for server in servers:
            server.kill()
            server.wait()
