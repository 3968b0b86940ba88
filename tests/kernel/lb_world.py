"""One network's load balancer on one node with real packets, for the tests that hold a
backend to it (tests/kernel/test_lb.py, tests/conformance/test_conntrack.py).

A node namespace with the network's bridge, three task namespaces on it each running a tiny TCP
and UDP server that answers its own name and the peer address it sees, and a client task
namespace on the same bridge; the reconciler under test builds the LB namespace.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import pytest

from kernel import netns
from kernel.ipvs import Ipvs
from kernel.links import Links
from kernel.system import real_kernel
from meshctl.lb.backends import backend_named
from meshctl.lb.reconcile import LbReconciler
from meshctl.lb.spec import Backend, LbSpec, VirtualIp, lb_spec
from meshctl.naming import lb_netns_prefix
from tests.conftest import NetnsFactory, scaled

T = TypeVar("T")

SUBNET = "10.77.0"
LB_ADDRESS = f"{SUBNET}.2"
VIP = f"{SUBNET}.100"
TASKS = {"web.1": f"{SUBNET}.11", "web.2": f"{SUBNET}.12", "web.3": f"{SUBNET}.13"}
CLIENT = f"{SUBNET}.50"
TCP_PORT, UDP_PORT = 8080, 9090

# Answers every line on a TCP connection, and every UDP datagram, with "<name> <peer address>".
# Arguments: name, TCP port, UDP port.
SERVER = r"""
import socket, socketserver, sys, threading
name, tcp_port, udp_port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
class Handler(socketserver.StreamRequestHandler):
    def handle(self):
        for _ in self.rfile:
            self.wfile.write(f"{name} {self.client_address[0]}\n".encode())
class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind(("0.0.0.0", udp_port))
def echo():
    while True:
        data, peer = udp.recvfrom(2048)
        udp.sendto(f"{name} {peer[0]}".encode(), peer)
threading.Thread(target=echo, daemon=True).start()
Server(("0.0.0.0", tcp_port), Handler).serve_forever()
"""


def ask_tcp(address: str = VIP, timeout: float = 2.0) -> tuple[str, str]:
    """One new TCP connection: (backend name, the client address the backend saw)."""
    with socket.create_connection((address, TCP_PORT), timeout=scaled(timeout)) as conn:
        conn.sendall(b"who\n")
        name, peer = conn.makefile().readline().split()
    return name, peer


def ask_udp(sock: socket.socket | None = None, address: str = VIP) -> str:
    """One datagram (from a fresh socket, so a new flow, unless sock is given): who answered."""
    own = sock is None
    sock = sock or socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.settimeout(scaled(2.0))
        sock.sendto(b"who", (address, UDP_PORT))
        return sock.recvfrom(2048)[0].decode().split()[0]
    finally:
        if own:
            sock.close()


class Conversation:
    """A TCP connection kept open through the VIP, asked again and again."""

    def __init__(self) -> None:
        self.conn = socket.create_connection((VIP, TCP_PORT), timeout=scaled(2.0))
        self.lines = self.conn.makefile()

    def ask(self) -> str:
        self.conn.sendall(b"who\n")
        return self.lines.readline().split()[0]

    def close(self) -> None:
        self.lines.close()
        self.conn.close()


@dataclass
class LbWorld:
    """The test world: node, tasks, client, and the reconciler with its spec."""

    node: str
    client: str
    node_id: str
    reconciler: LbReconciler
    spec: LbSpec
    servers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def prefix(self) -> str:
        return lb_netns_prefix(self.node_id)

    def with_backends(self, backends: dict[str, int]) -> LbSpec:
        """The spec with the web service balanced over these tasks (name → weight)."""
        web = VirtualIp(
            "svc-web",
            "web",
            VIP,
            tuple(Backend(TASKS[name], weight) for name, weight in backends.items()),
        )
        return replace(self.spec, vips=(web,))

    def sync(self, spec: LbSpec | None = None) -> None:
        self.reconciler.sync([spec or self.spec], self.prefix)

    def converged(self, spec: LbSpec | None = None) -> bool:
        return self.reconciler.plan([spec or self.spec], self.prefix).empty

    def in_client(self, fn: Callable[..., T], *args: Any) -> T:
        """Call fn in the client task's namespace (sockets it opens stay there)."""
        return netns.run_in(self.client, fn, *args)

    def lb(self, *cmd: str) -> None:
        """Run a command inside the LB namespace (which this test's reconciler made)."""
        subprocess.run(["ip", "netns", "exec", self.spec.netns, *cmd], check=True)


def attach(links: Links, node: str, bridge: str, ns: str, index: int, address: str) -> None:
    end = f"mt{index}{uuid.uuid4().hex[:6]}"
    links.ensure_veth(node, end, "eth0", ns)
    links.set_master(node, end, bridge)
    links.set_up(node, end)
    links.set_up(ns, "lo")
    links.ensure_address(ns, "eth0", f"{address}/24")
    links.set_up(ns, "eth0")


def wait_serving(client: str, address: str) -> None:
    deadline = time.monotonic() + scaled(10)
    while True:
        try:
            netns.run_in(client, ask_tcp, address, 0.5)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@contextmanager
def lb_world(netns_factory: NetnsFactory, backend: str) -> Iterator[LbWorld]:
    """Build the world for one backend; the ipvs one skips, saying why, where the kernel has
    no IPVS (the QEMU lane runs it)."""
    links = Links()
    node = netns_factory("node")
    if backend == "ipvs" and (reason := Ipvs().available(node)) is not None:
        print(f"ipvs backend not tested here: {reason}")
        pytest.skip(f"ipvs backend: {reason}; runs in the QEMU lane (tests/vm/run)")
    node_id, network_id = uuid.uuid4().hex[:8], uuid.uuid4().hex[:8]
    spec = lb_spec(node_id, network_id, f"{LB_ADDRESS}/24", ())
    links.ensure_bridge(node, spec.bridge, alias=spec.mark)  # as the node reconciler makes it
    links.set_up(node, spec.bridge)
    world = LbWorld(
        node=node,
        client=netns_factory("client"),
        node_id=node_id,
        reconciler=LbReconciler(real_kernel(), backend_named(backend), node_ns=node),
        spec=spec,
    )
    attach(links, node, spec.bridge, world.client, 0, CLIENT)
    try:
        for index, (name, address) in enumerate(TASKS.items(), start=1):
            task = netns_factory("task")
            attach(links, node, spec.bridge, task, index, address)
            world.servers.append(
                subprocess.Popen(
                    ["ip", "netns", "exec", task, sys.executable, "-c", SERVER, name]
                    + [str(TCP_PORT), str(UDP_PORT)],
                    stdout=subprocess.DEVNULL,
                )
            )
        for address in TASKS.values():
            wait_serving(world.client, address)
        world.spec = world.with_backends(dict.fromkeys(TASKS, 1))
        yield world
    finally:
        for server in world.servers:
            server.kill()
            server.wait()
        for name in netns.list_namespaces(world.prefix):
            netns.delete(name)
