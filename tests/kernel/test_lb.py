"""The load balancer of one network on one node, with real packets, for every backend.

Each test builds the world of tests/kernel/lb_world.py: a node namespace with the network's
bridge, three task namespaces on it each answering its own name and the peer address it sees,
and a client task namespace on the same bridge; the reconciler under test builds the LB namespace.
"""

from __future__ import annotations

import socket
import subprocess
import threading
import uuid
from collections import Counter
from collections.abc import Iterator

import pytest

from kernel import netns
from kernel.links import Links
from meshctl.lb.iptables import sep_chain, svc_chain
from meshctl.lb.ipvs import fwmark
from meshctl.lb.nftables import endpoint_chain
from meshctl.naming import lb_netns_prefix
from tests.conftest import NetnsFactory
from tests.kernel.lb_world import (
    LB_ADDRESS,
    TASKS,
    VIP,
    Conversation,
    LbWorld,
    ask_tcp,
    ask_udp,
    lb_world,
)
from tests.kernel.mesh import wait_for

pytestmark = pytest.mark.root


@pytest.fixture(params=["iptables", "nftables", pytest.param("ipvs", marks=pytest.mark.ipvs)])
def mesh(request: pytest.FixtureRequest, netns_factory: NetnsFactory) -> Iterator[LbWorld]:
    with lb_world(netns_factory, request.param) as world:
        yield world


def test_tcp_connections_spread_over_every_backend_with_replies_through_the_lb(
    mesh: LbWorld,
) -> None:
    mesh.sync()

    answers = [mesh.in_client(ask_tcp) for _ in range(60)]

    counts = Counter(name for name, _ in answers)
    assert set(counts) == set(TASKS), counts
    assert all(10 <= n <= 30 for n in counts.values()), counts
    # Client and backend share the bridge: the backend sees the LB address, so replies return
    # through the LB namespace.
    assert {peer for _, peer in answers} == {LB_ADDRESS}


def test_udp_flows_spread_over_every_backend(mesh: LbWorld) -> None:
    mesh.sync()

    counts = Counter(mesh.in_client(ask_udp) for _ in range(60))

    assert set(counts) == set(TASKS), counts
    assert all(10 <= n <= 30 for n in counts.values()), counts


def test_a_second_sync_changes_nothing(mesh: LbWorld) -> None:
    mesh.sync()
    spec = mesh.spec
    before = mesh.reconciler.observe(spec)

    assert mesh.converged()
    plan = mesh.reconciler.sync([spec], mesh.prefix)

    assert plan.empty
    assert mesh.reconciler.observe(spec) == before


def test_draining_backend_takes_no_new_connections_and_keeps_established_ones(
    mesh: LbWorld,
) -> None:
    mesh.sync()
    conversation = mesh.in_client(Conversation)
    try:
        drained = mesh.in_client(conversation.ask)
        weights = dict.fromkeys(TASKS, 1) | {drained: 0}

        mesh.sync(mesh.with_backends(weights))

        new = Counter(name for name, _ in (mesh.in_client(ask_tcp) for _ in range(30)))
        assert drained not in new and set(new) == set(TASKS) - {drained}, new
        assert mesh.in_client(conversation.ask) == drained
        assert mesh.converged(mesh.with_backends(weights))

        # Removal comes later (the controller waits for connections to end or a timeout).
        remaining = {name: 1 for name in TASKS if name != drained}
        mesh.sync(mesh.with_backends(remaining))
        if mesh.reconciler.backend.name != "ipvs":
            # conntrack keeps DNATing an established connection to its backend.
            assert mesh.in_client(conversation.ask) == drained
        else:
            # expire_nodest_conn=1: IPVS ends connections to a removed destination at once.
            with pytest.raises(OSError):
                mesh.in_client(conversation.ask)
    finally:
        conversation.close()


def test_scaling_three_to_one_during_steady_requests_loses_none(mesh: LbWorld) -> None:
    mesh.sync()
    answers: list[str] = []
    failures: list[BaseException] = []
    stop = threading.Event()

    def steady() -> None:
        while not stop.is_set():
            try:
                answers.append(ask_tcp()[0])
            except OSError as err:
                failures.append(err)

    loop = threading.Thread(target=mesh.in_client, args=(steady,))
    loop.start()
    try:
        wait_for(lambda: len(answers) >= 20, 20, "20 answers through the VIP")
        # As the controller scales down: drain first, remove when connections have ended.
        mesh.sync(mesh.with_backends({"web.1": 1, "web.2": 0, "web.3": 0}))
        scaled_at = len(answers)
        wait_for(lambda: len(answers) >= scaled_at + 20, 20, "20 answers while two drain")
        mesh.sync(mesh.with_backends({"web.1": 1}))
        removed_at = len(answers)
        wait_for(lambda: len(answers) >= removed_at + 20, 20, "20 answers after the removal")
    finally:
        stop.set()
        loop.join()

    assert failures == []
    assert set(answers[:scaled_at]) == set(TASKS)
    assert set(answers[scaled_at + 1 :]) == {"web.1"}  # one may have been in flight


def test_removed_udp_backend_loses_its_pinned_flows(mesh: LbWorld) -> None:
    mesh.sync()
    sock = mesh.in_client(socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
    try:
        pinned = mesh.in_client(ask_udp, sock)
        assert {mesh.in_client(ask_udp, sock) for _ in range(5)} == {pinned}  # one flow

        mesh.sync(mesh.with_backends({n: 1 for n in TASKS if n != pinned}))

        # The same client socket (same flow) is balanced again, not sent to the gone task.
        assert mesh.in_client(ask_udp, sock) != pinned
    finally:
        sock.close()


def test_drift_is_repaired_by_the_next_sync(mesh: LbWorld) -> None:
    mesh.sync()
    web = mesh.spec.vips[0]
    mesh.lb("ip", "addr", "del", f"{VIP}/32", "dev", "eth0")
    if mesh.reconciler.backend.name == "nftables":
        mesh.lb("nft", "delete", "element", "ip", "meshctl", "services", f"{{ {VIP} }}")
        mesh.lb("nft", "flush", "chain", "ip", "meshctl", endpoint_chain(web, web.backends[0]))
    elif mesh.reconciler.backend.name == "iptables":
        mesh.lb("iptables-legacy", "-t", "nat", "-F", svc_chain(web))
        sep = sep_chain(web, web.backends[0])
        mesh.lb("iptables-legacy", "-t", "nat", "-F", sep)
        mesh.lb("iptables-legacy", "-t", "nat", "-X", sep)
    else:
        mesh.lb("iptables-legacy", "-t", "mangle", "-D", "PREROUTING", "1")  # the mark jump
        mark = str(fwmark(mesh.spec, web))  # ipvsadm reads a decimal mark
        mesh.lb("ipvsadm", "-d", "-f", mark, "-r", web.backends[0].address)
    assert not mesh.converged()

    mesh.sync()

    assert mesh.converged()
    counts = Counter(name for name, _ in (mesh.in_client(ask_tcp) for _ in range(60)))
    assert set(counts) == set(TASKS), counts


def test_lb_namespaces_no_longer_desired_are_deleted_and_no_other(
    mesh: LbWorld, netns_factory: NetnsFactory
) -> None:
    mesh.sync()
    other_node = lb_netns_prefix(uuid.uuid4().hex[:8]) + "abcdef01"
    netns.create(other_node)  # another node's LB namespace: not this reconciler's
    try:
        assert netns.exists(mesh.spec.netns)

        plan = mesh.reconciler.sync([], mesh.prefix)

        assert plan.delete_netns == (mesh.spec.netns,)
        assert not netns.exists(mesh.spec.netns)
        assert Links().get_link(mesh.node, mesh.spec.node_end) is None
        assert netns.exists(other_node)
        with pytest.raises(OSError):
            mesh.in_client(ask_tcp)
    finally:
        netns.delete(other_node)


def tcp_counters(ns: str) -> dict[str, int]:
    """The namespace's TCP counters (/proc/net/snmp's Tcp: lines), by name."""
    snmp = subprocess.run(["ip", "netns", "exec", ns, "cat", "/proc/net/snmp"],
                          capture_output=True, text=True, check=True).stdout  # fmt: skip
    names, values = (line.split()[1:] for line in snmp.splitlines() if line.startswith("Tcp:"))
    return dict(zip(names, map(int, values), strict=True))


def test_a_vip_with_no_backend_refuses_at_once(mesh: LbWorld) -> None:
    """Scaled to 0 (or all draining): a new connection is refused at its first SYN, never left
    hanging: the client sends no SYN again (its first retry would come after a second)."""
    mesh.spec = mesh.with_backends(dict.fromkeys(TASKS, 0))
    mesh.sync()
    before = tcp_counters(mesh.client)
    with pytest.raises(ConnectionRefusedError):
        mesh.in_client(ask_tcp, VIP, 5.0)
    after = tcp_counters(mesh.client)
    assert after["ActiveOpens"] - before["ActiveOpens"] == 1
    assert after["RetransSegs"] == before["RetransSegs"]
