"""Published ports on a node: the routing mesh, host mode, traffic=local, hairpin, refusal.

The client is a namespace outside the mesh with its own veth to the node (192.0.2.2 → node
192.0.2.1); every task answers with its name and the address it sees the client at.
"""

from __future__ import annotations

import collections
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kernel import netns
from meshctl.naming import task_netns
from tests.conftest import NetnsFactory, scaled, tcp_read
from tests.kernel.mesh import Mesh, ask, wait_for

pytestmark = pytest.mark.root

NODE_IP, CLIENT_IP = "198.51.100.1", "198.51.100.2"
# TCP and UDP 80 answer "<task name> <the client address it sees>". Over UDP the answer first
# reads the datagram (a child that exits before socat has written the datagram to it makes socat
# fail on EPIPE and drop the answer), and socat waits for it as long as a client does (-t: by
# default it gives up 0.5 s after the datagram, before a slow machine has forked the answer).
# The TCP client (tests.kernel.mesh.ask) sends nothing.
ANSWER = "echo $(hostname) $SOCAT_PEERADDR"
BACKEND = ["sh", "-c",
           f"socat -t{scaled(5):g} UDP-RECVFROM:80,fork 'SYSTEM:head -c1 >/dev/null; {ANSWER}' & "
           f"exec socat TCP-LISTEN:80,reuseaddr,fork 'SYSTEM:{ANSWER}'"]  # fmt: skip


@pytest.fixture
def world(node_ns: str, netns_factory: NetnsFactory, tmp_path: Path) -> Iterator[tuple[Mesh, str]]:
    client = netns_factory("client")
    ip = ["ip", "link", "add", "mtnode", "netns", node_ns, "type", "veth", "peer", "mtclient"]
    subprocess.run(["ip", "-n", client, *ip[1:]], check=True)
    for ns, dev, address in ((node_ns, "mtnode", NODE_IP), (client, "mtclient", CLIENT_IP)):
        subprocess.run(["ip", "-n", ns, "addr", "add", f"{address}/24", "dev", dev], check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", dev, "up"], check=True)
    subprocess.run(["ip", "-n", client, "link", "set", "lo", "up"], check=True)
    mesh = Mesh(node_ns, str(tmp_path / "state"))
    try:
        yield mesh, client
    finally:
        mesh.close()


def _ask(ns: str, port: int, udp: bool = False) -> str:
    return ask(ns, NODE_IP, port, udp)


def _service(mesh: Mesh, publish: str, replicas: int = 3) -> None:
    mesh.cli("network", "create", "front", "--subnet", "10.81.0.0/24")
    mesh.cli("service", "create", "--name", "web", "--replicas", str(replicas), "--network",
             "front", "--publish", publish, "--publish", publish.replace("/tcp", "") + "/udp",
             "--stop-grace-period", "2s", "--detach", "--", *BACKEND)  # fmt: skip
    mesh.start_controller()
    if replicas:
        mesh.wait_running("web", replicas)
        # Running is not listening yet (no health check here): wait for every task's socket.
        for task in mesh.running("web"):
            listening = ["socat", "-T1", "/dev/null", f"TCP:{task['addresses']['front']}:80"]
            wait_for(lambda c=listening: mesh.in_node(*c).returncode == 0, 10, "listening")
    mesh.wait_converged(15, "converged")


@pytest.mark.ipvs  # mode=ingress: the published port goes to the ingress VIP, which the LB balances
def test_routing_mesh_spreads_tcp_and_udp_and_refuses_when_scaled_to_zero(
    world: tuple[Mesh, str],
) -> None:
    mesh, client = world
    _service(mesh, "8000:80")
    # Through the ingress network's load balancer (swarm's ingress_sbox): tasks see its address.
    assert _ask(client, 8000).split()[1].startswith("10.255.")
    tcp = collections.Counter(_ask(client, 8000).split()[0] for _ in range(60))
    assert set(tcp) == {"web.1", "web.2", "web.3"} and min(tcp.values()) >= 10, tcp
    udp = collections.Counter(_ask(client, 8000, udp=True).split()[0] for _ in range(60))
    assert set(udp) == {"web.1", "web.2", "web.3"} and min(udp.values()) >= 10, udp
    # From the node itself (OUTPUT) and from a task of the service (hairpin).
    assert _ask(mesh.node_ns, 8000).startswith("web.")
    (task, *_) = mesh.running("web")
    assert _ask(task_netns(task["id"]), 8000).startswith("web.")
    shown = mesh.cli("service", "ls").stdout
    assert "*:8000->80/tcp" in shown and "*:8000->80/udp" in shown
    # Scaled to 0: refused at once, not left hanging.
    mesh.cli("service", "scale", "web=0", "--detach")
    wait_for(lambda: mesh.ps("web") == [], 20, "tasks gone")
    mesh.wait_converged(15, "converged")
    started = time.monotonic()
    with pytest.raises(ConnectionRefusedError):
        netns.run_in(client, tcp_read, NODE_IP, 8000)
    assert time.monotonic() - started < scaled(1)
    mesh.cli("service", "rm", "web")
    mesh.wait_converged(15, "converged")
    assert "8000" not in mesh.in_node("iptables-legacy-save").stdout


# Not in the QEMU lane: mode=host and traffic=local DNAT in the node namespace to the node's own
# tasks (meshctl.node.desired.ingress_rules), never through the LB.
@pytest.mark.parametrize("publish", ["mode=host,8001:80", "mode=ingress,traffic=local,8001:80"])
def test_local_publishing_keeps_the_client_address(world: tuple[Mesh, str], publish: str) -> None:
    mesh, client = world
    _service(mesh, publish, replicas=2)
    answers = [_ask(client, 8001) for _ in range(20)]
    assert {a.split()[0] for a in answers} == {"web.1", "web.2"}
    assert {a.split()[1] for a in answers} == {CLIENT_IP}, answers
    udp = _ask(client, 8001, udp=True)
    assert udp.split()[1] == CLIENT_IP


# Not in the QEMU lane: what it asserts is the node's DNAT (a held port not taken over); the
# routing mesh's path through the LB, UDP too, is the test above.
def test_a_port_held_on_the_node_is_left_to_its_process_and_reported(
    world: tuple[Mesh, str],
) -> None:
    mesh, client = world
    # Another process of the node listens on 8002 (the CLI, outside the node, cannot see it).
    holder = subprocess.Popen(["ip", "netns", "exec", mesh.node_ns, "socat",
                               "TCP-LISTEN:8002,reuseaddr,fork", "SYSTEM:echo holder"])  # fmt: skip
    try:
        wait_for(lambda: _ask(client, 8002) == "holder", 10, "the holder listening")
        _service(mesh, "8002:80", replicas=1)
        message = "published port 8002/tcp is in use on node node1"
        wait_for(lambda: message in mesh.ps("web")[0]["error"], 10, "the error in service ps")
        assert message in mesh.cli("service", "ps", "web").stdout
        assert "-m tcp --dport 8002" not in mesh.in_node("iptables-legacy-save", "-t", "nat").stdout
        assert _ask(client, 8002) == "holder"  # still the holder's port
        assert _ask(client, 8002, udp=True).startswith("web.1")  # the free UDP port works
    finally:
        holder.kill()
        holder.wait()
