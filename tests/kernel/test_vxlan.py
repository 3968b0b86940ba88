"""A VXLAN overlay of static entries only, on a real kernel with real packets.

Two node namespaces on an underlay (a bridge in a third namespace, 10.98.0.0/24), each with a
network bridge and a VXLAN device (VNI 4242, learning off, proxy on, local = its underlay
address, MTU 1450) on it, and a task namespace per node on that bridge whose eth0 has the MAC
mac_for(its address). The tasks reach each other only through the neighbour and FDB entries
written with kernel.neighbours: no multicast group, no flooding, no learning, no miss handler.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import threading
from dataclasses import dataclass

import pytest

from kernel import netns
from kernel.links import Link, Links, mac_for
from kernel.neighbours import FdbEntry, Neighbour, Neighbours
from tests.conftest import NetnsFactory

pytestmark = pytest.mark.root

OVERLAY_MTU = 1450  # the underlay's 1500 less the VXLAN header
VNI, OTHER_VNI = 4242, 4243
links, neighbours = Links(), Neighbours()


@dataclass(frozen=True)
class Node:
    ns: str
    underlay_ip: str


@dataclass(frozen=True)
class Task:
    ns: str
    ip: str
    node: Node
    vni: int


def vxlan(vni: int) -> str:
    return f"meshvx{vni}"


def bridge(vni: int) -> str:
    return f"meshbr{vni}"


class Overlay:
    """The world of the module docstring; networks and tasks are added by the tests."""

    def __init__(self, make_ns: NetnsFactory) -> None:
        self.make_ns = make_ns
        underlay = make_ns("under")
        links.ensure_bridge(underlay, "ubr0")
        links.set_up(underlay, "ubr0")
        self.nodes: list[Node] = []
        for i in (1, 2):
            node = Node(make_ns(f"node{i}"), f"10.98.0.{i}")
            links.ensure_veth(underlay, f"port{i}", "eth0", node.ns)
            links.set_master(underlay, f"port{i}", "ubr0")
            links.set_up(underlay, f"port{i}")
            links.ensure_address(node.ns, "eth0", f"{node.underlay_ip}/24")
            for dev in ("lo", "eth0"):
                links.set_up(node.ns, dev)
            self.nodes.append(node)

    def network(self, vni: int) -> None:
        """The network's bridge and VXLAN device on every node, up."""
        for node in self.nodes:
            links.ensure_bridge(node.ns, bridge(vni), mtu=OVERLAY_MTU)
            links.ensure_vxlan(node.ns, vxlan(vni), vni, local=node.underlay_ip, mtu=OVERLAY_MTU)
            links.set_master(node.ns, vxlan(vni), bridge(vni))
            for dev in (bridge(vni), vxlan(vni)):
                links.set_up(node.ns, dev)

    def task(self, node: Node, ip: str, vni: int) -> Task:
        """A task namespace on the network's bridge of node, its eth0 at mac_for(ip)."""
        task = Task(self.make_ns("task"), ip, node, vni)
        leg = f"meshv{ip.rsplit('.', 1)[1]}"
        links.ensure_veth(node.ns, leg, "eth0", task.ns, peer_mac=mac_for(ip), mtu=OVERLAY_MTU)
        links.set_master(node.ns, leg, bridge(vni))
        links.set_up(node.ns, leg)
        links.ensure_address(task.ns, "eth0", f"{ip}/24")
        for dev in ("lo", "eth0"):
            links.set_up(task.ns, dev)
        return task

    def entries(self, remote: Task, vni: int | None = None) -> tuple[Neighbour, FdbEntry]:
        """The two entries another node writes for remote (on its device of vni, remote's own
        by default): its address → its MAC, its MAC → its node's underlay address."""
        dev = vxlan(remote.vni if vni is None else vni)
        mac = mac_for(remote.ip)
        return Neighbour(dev, remote.ip, mac), FdbEntry(dev, mac, remote.node.underlay_ip)

    def write(self, on: Node, *remotes: Task, vni: int | None = None) -> None:
        pairs = [self.entries(remote, vni) for remote in remotes]
        neighbours.ensure_neighbours(on.ns, [n for n, _ in pairs])
        neighbours.ensure_fdb_entries(on.ns, [f for _, f in pairs])


@pytest.fixture
def overlay(netns_factory: NetnsFactory) -> Overlay:
    return Overlay(netns_factory)


def two_tasks(overlay: Overlay) -> tuple[Task, Task]:
    """Network VNI on both nodes, a task on each, every node's entries for the other's task."""
    overlay.network(VNI)
    node1, node2 = overlay.nodes
    t1, t2 = overlay.task(node1, "10.77.0.1", VNI), overlay.task(node2, "10.77.0.2", VNI)
    overlay.write(node1, t2)
    overlay.write(node2, t1)
    return t1, t2


PING = ["ping", "-n", "-c", "2", "-i", "0.2", "-W", "1", "-M", "do"]  # don't fragment


def pinged(src: Task, dst: Task, size: int) -> subprocess.CompletedProcess[str]:
    """Two pings from src to dst with size bytes of payload."""
    cmd = ["ip", "netns", "exec", src.ns, *PING, "-s", str(size), dst.ip]
    return subprocess.run(cmd, capture_output=True, text=True)


def ping(src: Task, dst: Task, size: int = 56) -> bool:
    """Whether src gets an echo reply from dst."""
    return pinged(src, dst, size).returncode == 0


def refused_as_too_big(src: Task, dst: Task, size: int) -> bool:
    """Whether src's own stack refuses the ping as bigger than the overlay MTU: it knows the
    MTU. (A task left at 1500 would send it, and the bridge would drop it without a word at
    the VXLAN port: a black hole for anything but GSO'd TCP.)"""
    done = pinged(src, dst, size)
    return done.returncode != 0 and f"message too long, mtu={OVERLAY_MTU}" in done.stderr


def link(ns: str, dev: str) -> Link:
    found = links.get_link(ns, dev)
    assert found is not None, f"{dev} missing in {ns}"
    return found


def rx_packets(ns: str, dev: str) -> int:
    shown = subprocess.run(["ip", "-n", ns, "-s", "-j", "link", "show", "dev", dev],
                           capture_output=True, text=True, check=True).stdout  # fmt: skip
    packets: int = json.loads(shown)[0]["stats64"]["rx"]["packets"]
    return packets


def learnt_mac(task: Task, ip: str) -> str | None:
    """The MAC task's ARP table holds for ip, None if it holds none."""
    shown = subprocess.run(["ip", "-n", task.ns, "-j", "neigh", "show", ip, "dev", "eth0"],
                           capture_output=True, text=True, check=True).stdout  # fmt: skip
    found = [entry.get("lladdr") for entry in json.loads(shown)]
    return found[0] if found else None


def flush_arp(task: Task) -> None:
    subprocess.run(["ip", "-n", task.ns, "neigh", "flush", "dev", "eth0"], check=True)


def tcp_transfer(src: Task, dst: Task, size: int = 1 << 20, port: int = 5001) -> bool:
    """Send size random bytes from src to dst over TCP: whether dst got them all, intact."""
    payload = os.urandom(size)
    server = netns.run_in(dst.ns, socket.create_server, (dst.ip, port))
    got: list[bytes] = []

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            conn.settimeout(10)
            chunks = []
            while chunk := conn.recv(1 << 16):
                chunks.append(chunk)
            got.append(b"".join(chunks))
            conn.sendall(hashlib.sha256(got[0]).digest())

    with server:
        server.settimeout(10)
        reader = threading.Thread(target=serve, daemon=True)
        reader.start()
        client = netns.run_in(src.ns, socket.create_connection, (dst.ip, port), 10)
        with client:
            client.sendall(payload)
            client.shutdown(socket.SHUT_WR)
            digest = client.recv(64)
        reader.join(10)
    return got == [payload] and digest == hashlib.sha256(payload).digest()


def test_tasks_on_two_nodes_talk_over_static_entries(overlay: Overlay) -> None:
    t1, t2 = two_tasks(overlay)
    node1, node2 = overlay.nodes
    assert link(t1.ns, "eth0").mac == mac_for(t1.ip)
    before = rx_packets(node2.ns, vxlan(VNI))
    assert ping(t1, t2) and ping(t2, t1)
    assert rx_packets(node2.ns, vxlan(VNI)) > before  # it came over the VXLAN device
    # t1 asked for t2's address on its bridge; node1's VXLAN device answered from its
    # neighbour table (proxy): the MAC is the one derived from the address.
    assert learnt_mac(t1, t2.ip) == mac_for(t2.ip)
    assert tcp_transfer(t1, t2)
    assert tcp_transfer(t2, t1, port=5002)
    # The entries are listed as written, and only they.
    neighbour, fdb = overlay.entries(t2)
    assert neighbours.list_neighbours(node1.ns, vxlan(VNI)) == [neighbour]
    assert neighbours.list_fdb(node1.ns, vxlan(VNI)) == [fdb]


def test_the_overlay_carries_packets_of_its_mtu_and_no_bigger(overlay: Overlay) -> None:
    t1, t2 = two_tasks(overlay)
    node1 = overlay.nodes[0]
    built = [(node1.ns, bridge(VNI)), (node1.ns, vxlan(VNI)), (node1.ns, "meshv1"), (t1.ns, "eth0")]
    assert [link(ns, dev).mtu for ns, dev in built] == [OVERLAY_MTU] * 4
    assert ping(t1, t2, size=1400)
    assert ping(t1, t2, size=OVERLAY_MTU - 28)  # 1450 bytes of IP: 1500 on the underlay
    assert ping(t2, t1, size=OVERLAY_MTU - 28)
    assert refused_as_too_big(t1, t2, size=OVERLAY_MTU - 27)
    assert refused_as_too_big(t1, t2, size=1450)


def test_without_the_entries_nothing_crosses(overlay: Overlay) -> None:
    """No flooding: without its FDB entry a frame for a remote MAC goes nowhere. No learning:
    a node that receives a remote task's packets still cannot answer it. ARP for a remote
    address is answered from the neighbour entry alone, and without it not at all."""
    t1, t2 = two_tasks(overlay)
    node1, node2 = overlay.nodes
    assert ping(t1, t2)
    neighbour, fdb = overlay.entries(t2)
    # Only the FDB entry gone: t1 still learns t2's MAC (the proxy), but its frames are dropped.
    neighbours.delete_fdb(node1.ns, fdb)
    flush_arp(t1)
    assert not ping(t1, t2)
    assert learnt_mac(t1, t2.ip) == mac_for(t2.ip)
    # t2's requests reach node1 (node2 still has its entries), t1 answers, and node1 has no
    # FDB entry to send the answer by: it learnt none from the requests.
    before = rx_packets(node1.ns, vxlan(VNI))
    assert not ping(t2, t1)
    assert rx_packets(node1.ns, vxlan(VNI)) > before
    assert neighbours.list_fdb(node1.ns, vxlan(VNI)) == []
    learnt = subprocess.run(["bridge", "-n", node1.ns, "fdb", "show", "dev", vxlan(VNI)],
                            capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert " dst " not in learnt
    # Only the neighbour entry gone: ARP for t2 goes unanswered (and is not flooded).
    neighbours.ensure_fdb(node1.ns, fdb)
    neighbours.delete_neighbour(node1.ns, neighbour)
    flush_arp(t1)
    assert not ping(t1, t2)
    assert learnt_mac(t1, t2.ip) is None
    # Both written again: through again; both gone on both nodes: nothing.
    overlay.write(node1, t2)
    assert ping(t1, t2)
    for node, remote in ((node1, t2), (node2, t1)):
        neighbour, fdb = overlay.entries(remote)
        neighbours.delete_neighbour(node.ns, neighbour)
        neighbours.delete_fdb(node.ns, fdb)
    assert not ping(t1, t2) and not ping(t2, t1)


def test_a_task_on_another_vni_cannot_reach_them(overlay: Overlay) -> None:
    """A third task on another network (VNI 4243) of the same nodes and subnet. Even with
    entries for t2 on its own network's device, its packets reach node2 on VNI 4243 and land
    on the other network's bridge, where t2 is not."""
    t1, t2 = two_tasks(overlay)
    node1, node2 = overlay.nodes
    overlay.network(OTHER_VNI)
    t3 = overlay.task(node1, "10.77.0.3", OTHER_VNI)
    overlay.write(node1, t2, vni=OTHER_VNI)
    before = rx_packets(node2.ns, vxlan(OTHER_VNI))
    assert not ping(t3, t2)
    assert rx_packets(node2.ns, vxlan(OTHER_VNI)) > before
    assert not ping(t3, t1)  # on the same node, but another bridge
    assert ping(t1, t2)  # while the network itself works
