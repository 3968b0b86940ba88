"""kernel.conntrack against the fake and the real kernel, through the load balancer of every
backend: when a service's backends change, UDP flows to a draining backend (weight 0) survive,
flows to a removed one are deleted, and every other flow is untouched; a backend's open TCP
connections are counted until they close.

UDP has no end of connection, so a flow stays pinned to its backend until its conntrack entry
goes (meshctl.lb.reconcile deletes those of removed backends). The real kernel's flows are made
by a client sending datagrams through the VIPs of tests/kernel/lb_world.py's world, the fake's
are injected (`FakeConntrack.add_flow`) as that traffic leaves them; the same reconciler steps
run on both and both must list the same flows after each step. On the real kernel the packets
say it too: the draining flow is answered by its backend still, the removed one's next datagram
is balanced afresh. The real ipvs case needs IPVS and is marked `ipvs`: it skips natively, saying
why, and the QEMU lane (tests/vm/run) runs it.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from kernel.conntrack import ConntrackAPI, UdpFlow
from kernel.errors import NotFound
from kernel.fake.conntrack import FakeConntrack
from meshctl.lb.backends import backend_named
from meshctl.lb.reconcile import LbReconciler
from meshctl.lb.spec import Backend, LbSpec, VirtualIp, lb_spec
from meshctl.naming import lb_netns_prefix
from tests.conftest import NetnsFactory
from tests.kernel.lb_world import (
    LB_ADDRESS,
    TASKS,
    UDP_PORT,
    VIP,
    Conversation,
    LbWorld,
    ask_udp,
    lb_world,
)
from tests.kernel.mesh import wait_for

API_VIP = "10.77.0.101"  # another service's VIP, balanced to the task the web VIP loses
KEEP, DRAIN, GONE = "web.1", "web.2", "web.3"
BEFORE = {KEEP: 1, DRAIN: 1, GONE: 1}
AFTER = {KEEP: 1, DRAIN: 0}  # GONE removed, DRAIN draining
NODE_ID, NETWORK_ID = "c0ffee01", "c0ffee02"  # the fake's; the real world draws its own

# Every flow the client leaves: one through the web VIP to each task, one through the api VIP,
# and one to the LB's own address (not balanced: nothing answers it, an ICMP error does).
FLOWS = frozenset(
    {UdpFlow(VIP, address) for address in TASKS.values()}
    | {UdpFlow(API_VIP, TASKS[GONE]), UdpFlow(LB_ADDRESS, LB_ADDRESS)}
)
# Only the web VIP's flow to the removed task goes; the same task behind the api VIP keeps its
# flow (deletion is by VIP and backend, not by backend alone).
FLOWS_AFTER = FLOWS - {UdpFlow(VIP, TASKS[GONE])}


def with_web(spec: LbSpec, web: dict[str, int]) -> LbSpec:
    """spec with the web VIP over these tasks (name → weight) and the api VIP over GONE."""
    backends = tuple(Backend(TASKS[name], weight) for name, weight in web.items())
    return replace(
        spec,
        vips=(
            VirtualIp("svc-web", "web", VIP, backends),
            VirtualIp("svc-api", "api", API_VIP, (Backend(TASKS[GONE]),)),
        ),
    )


@dataclass
class Scene:
    """One LB namespace under a reconciler, on the fake or the real kernel, and the client's
    flows through it (on the real kernel: a socket per flow, by who answered it)."""

    reconciler: LbReconciler
    spec: LbSpec
    prefix: str  # the node's LB namespace prefix (lb_netns_prefix)
    world: LbWorld | None = None  # the real kernel's world (None: the fake)
    sockets: dict[str, socket.socket] = field(default_factory=dict)

    @property
    def conntrack(self) -> ConntrackAPI:
        return self.reconciler.kernel.conntrack

    @property
    def lb(self) -> str:
        return self.spec.netns

    def sync(self, web: dict[str, int]) -> bool:
        """Sync the LB to web's weights; whether a second plan is then empty (it must be)."""
        desired = [with_web(self.spec, web)]
        self.reconciler.sync(desired, self.prefix)
        return self.reconciler.plan(desired, self.prefix).empty

    def flows(self) -> frozenset[UdpFlow]:
        return self.conntrack.list_udp_flows(self.lb)

    def ask(self, name: str, address: str = VIP) -> str:
        """Who answers the next datagram of the flow kept under name."""
        assert self.world is not None
        return self.world.in_client(ask_udp, self.sockets[name], address)

    def open_flows(self) -> None:
        """Leave FLOWS behind: the fake is told them, the real client sends them."""
        if self.world is None:
            fake = self.conntrack
            assert isinstance(fake, FakeConntrack)
            for flow in FLOWS:
                fake.add_flow(self.lb, flow.vip, flow.backend)
            return
        world = self.world
        for _ in range(10 * len(TASKS)):  # round robin gives one each in 3; random, soon
            sock = world.in_client(socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
            name = world.in_client(ask_udp, sock)
            if name in self.sockets:
                sock.close()  # its flow is one more to a task already pinned: same UdpFlow
            else:
                self.sockets[name] = sock
            if len(self.sockets) == len(TASKS):
                break
        assert set(self.sockets) == set(TASKS), f"flows pinned to {sorted(self.sockets)} only"
        self.sockets["api"] = world.in_client(socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
        assert self.ask("api", API_VIP) == GONE
        self.sockets["lb"] = world.in_client(socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
        world.in_client(self.sockets["lb"].sendto, b"x", (LB_ADDRESS, UDP_PORT))

    def close(self) -> None:
        for sock in self.sockets.values():
            sock.close()


@contextmanager
def _fake_scene(kernel: Any, backend: str) -> Iterator[Scene]:
    node = kernel.new_ns("node")
    spec = lb_spec(NODE_ID, NETWORK_ID, f"{LB_ADDRESS}/24", ())
    kernel.links.ensure_bridge(node, spec.bridge, alias=spec.mark)
    reconciler = LbReconciler(kernel.system, backend_named(backend), node_ns=node)
    yield Scene(reconciler, spec, lb_netns_prefix(NODE_ID))


@contextmanager
def _real_scene(netns_factory: NetnsFactory, backend: str) -> Iterator[Scene]:
    with lb_world(netns_factory, backend) as world:
        scene = Scene(world.reconciler, replace(world.spec, vips=()), world.prefix, world)
        try:
            yield scene
        finally:
            scene.close()


def _long_udp_timeouts(lb: str) -> None:
    """UDP entries outlive the test however slow the machine (the QEMU lane's is): an entry
    that expired on its own would pass for one the reconciler deleted."""
    subprocess.run(
        ["ip", "netns", "exec", lb, "sysctl", "-qw", "net.netfilter.nf_conntrack_udp_timeout=600",
         "net.netfilter.nf_conntrack_udp_timeout_stream=600"],
        check=True,
    )  # fmt: skip


CASES = [
    pytest.param(
        kind,
        backend,
        id=f"{kind}-{backend}",
        marks=[pytest.mark.root] + ([pytest.mark.ipvs] if backend == "ipvs" else [])
        if kind == "real"
        else [],
    )
    for kind in ("fake", "real")
    for backend in ("iptables", "nftables", "ipvs")
]


@pytest.fixture
def scene(kernel: Any, backend: str, netns_factory: NetnsFactory) -> Iterator[Scene]:
    """The LB of tests/kernel/lb_world.py's network on this kernel, built by the reconciler
    with the web VIP over all three tasks; the real ipvs one skips where IPVS is missing."""
    made = _fake_scene(kernel, backend) if kernel.is_fake else _real_scene(netns_factory, backend)
    with made as scene:
        assert scene.sync(BEFORE)
        if scene.world is not None:
            _long_udp_timeouts(scene.lb)
        yield scene


@pytest.mark.parametrize(("kernel", "backend"), CASES, indirect=["kernel"])
def test_draining_flows_survive_removed_ones_go_others_are_untouched(scene: Scene) -> None:
    scene.open_flows()
    assert scene.flows() == FLOWS

    assert scene.sync(AFTER)

    assert scene.flows() == FLOWS_AFTER
    if scene.world is not None:
        assert scene.ask(KEEP) == KEEP
        assert scene.ask(DRAIN) == DRAIN  # its flow carries on to the draining task
        assert scene.ask("api", API_VIP) == GONE
        # The removed task's flow is balanced afresh, to the one task taking new flows.
        assert scene.ask(GONE) == KEEP
        assert scene.flows() == FLOWS_AFTER


@pytest.mark.parametrize(("kernel", "backend"), CASES, indirect=["kernel"])
def test_deleting_a_flow_says_how_many_entries_went(scene: Scene) -> None:
    scene.open_flows()

    assert scene.conntrack.delete_udp_entries(scene.lb, API_VIP, TASKS[GONE]) == 1
    assert scene.conntrack.delete_udp_entries(scene.lb, API_VIP, TASKS[GONE]) == 0
    assert scene.conntrack.delete_udp_entries(scene.lb, VIP, LB_ADDRESS) == 0  # no such flow

    assert scene.flows() == FLOWS - {UdpFlow(API_VIP, TASKS[GONE])}
    if scene.world is not None:  # the next datagram makes the flow again
        assert scene.ask("api", API_VIP) == GONE
        assert scene.flows() == FLOWS


@pytest.mark.parametrize(("kernel", "backend"), CASES, indirect=["kernel"])
def test_open_tcp_connections_count_for_their_backend_until_they_close(scene: Scene) -> None:
    """What draining waits on before it removes a backend (count_tcp_connections): the
    connections through the LB that its task answers, a closing one no longer counted."""

    def counts() -> dict[str, int]:
        count = scene.conntrack.count_tcp_connections
        return {name: count(scene.lb, address) for name, address in TASKS.items()}

    assert counts() == dict.fromkeys(TASKS, 0)
    if scene.world is None:  # the fake is told what an open connection leaves
        fake = scene.conntrack
        assert isinstance(fake, FakeConntrack)
        fake.set_tcp_connections(scene.lb, TASKS[KEEP], 1)
        assert counts() == dict.fromkeys(TASKS, 0) | {KEEP: 1}
        fake.set_tcp_connections(scene.lb, TASKS[KEEP], 0)
    else:
        conversation = scene.world.in_client(Conversation)
        try:
            answered = scene.world.in_client(conversation.ask)
            assert counts() == dict.fromkeys(TASKS, 0) | {answered: 1}
        finally:
            conversation.close()
    wait_for(lambda: counts() == dict.fromkeys(TASKS, 0), 5, "a closed connection uncounted")


@pytest.mark.parametrize("kernel", ["fake", pytest.param("real", marks=pytest.mark.root)],
                         indirect=True)  # fmt: skip
def test_a_missing_namespace_is_not_found(kernel: Any) -> None:
    with pytest.raises(NotFound):
        kernel.conntrack.list_udp_flows("meshctl-no-such-ns")
    with pytest.raises(NotFound):
        kernel.conntrack.delete_udp_entries("meshctl-no-such-ns", VIP, TASKS[KEEP])
