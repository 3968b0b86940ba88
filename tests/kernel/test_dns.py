"""The embedded DNS server on real namespaces, asked with dig from inside task namespaces.

The world: a node namespace running the server (its loop thread lives there, so forwards leave
from the node), task namespaces with the server's sockets bound on 127.0.0.11:53, and an
upstream namespace behind a veth from the node where dnsmasq answers example.test and says
NXDOMAIN to everything else. 10.99.0.3 is an upstream address with nothing listening (refused)
and 10.99.0.4 one nobody has (silent: times out).
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace

import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from kernel import netns
from meshctl.dns import DnsPort, DnsServer, DnsService, DnsTask, DnsView
from meshctl.dns.thread import ServerThread
from tests.conftest import NetnsFactory, scaled

pytestmark = pytest.mark.root

UPSTREAM, REFUSING, SILENT = "10.99.0.2", "10.99.0.3", "10.99.0.4"
VIEW = DnsView(
    networks=frozenset({"front", "back"}),
    services=(
        DnsService("web", "vip", {"front": "10.0.0.2"}, {"front": ("www",)}, (DnsPort(80),)),
        DnsService("db", "dnsrr", {}, {}, (DnsPort(5432),)),
        DnsService("secret", "vip", {"back": "10.1.0.2"}),
        DnsService("replicated-backend", "dnsrr"),
    ),
    tasks=(
        DnsTask("web.1", "web", {"front": "10.0.0.3"}),
        DnsTask("db.1", "db", {"front": "10.0.0.5"}),
        DnsTask("db.2", "db", {"front": "10.0.0.6"}),
        DnsTask("db.3", "db", {"front": "10.0.0.7"}, healthy=False),
        DnsTask("secret.1", "secret", {"back": "10.1.0.3"}),
        *(
            DnsTask(f"replicated-backend.{i}", "replicated-backend", {"front": f"10.0.1.{i}"})
            for i in range(1, 31)
        ),
    ),
)


def sh(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def dig(ns: str, *args: str) -> str:
    """dig's full output, asking the embedded server from inside ns (one try, 2 s scaled)."""
    wait = f"+time={round(scaled(2))}"
    return sh("ip", "netns", "exec", ns, "dig", "@127.0.0.11", wait, "+tries=1", *args)


def short(ns: str, *args: str) -> list[str]:
    return dig(ns, "+short", *args).split()


def status(output: str) -> str:
    found = re.search(r"status: (\w+)", output)
    assert found, output
    return found.group(1)


def answer_count(output: str) -> int:
    found = re.search(r"ANSWER: (\d+)", output)
    assert found, output
    return int(found.group(1))


@dataclass
class World:
    node: str
    front: str  # a task on network front
    back: str  # a task on network back only
    thread: ServerThread


@pytest.fixture
def upstream(netns_factory: NetnsFactory, node_ns: str) -> Iterator[str]:
    """dnsmasq in its own namespace, reachable from the node at UPSTREAM."""
    up = netns_factory("up")
    sh("ip", "-n", node_ns, "link", "add", "mdns0", "type", "veth", "peer", "mdns1", "netns", up)
    sh("ip", "-n", node_ns, "addr", "add", "10.99.0.1/24", "dev", "mdns0")
    sh("ip", "-n", node_ns, "link", "set", "mdns0", "up")
    for address in (UPSTREAM, REFUSING):
        sh("ip", "-n", up, "addr", "add", f"{address}/24", "dev", "mdns1")
    sh("ip", "-n", up, "link", "set", "mdns1", "up")
    sh("ip", "-n", up, "link", "set", "lo", "up")
    # dnsmasq: example.test answered, everything else NXDOMAIN (no upstream of its own).
    dnsmasq = subprocess.Popen(
        ["ip", "netns", "exec", up, "dnsmasq", "-k", "-C", "/dev/null", "--no-resolv"]
        + ["--no-hosts", f"--listen-address={UPSTREAM}", "--bind-interfaces", "--pid-file="]
        + ["--user=root", "--address=/example.test/198.51.100.7", "--server=/#/"]
    )
    try:
        yield up
    finally:
        dnsmasq.kill()
        dnsmasq.wait()


def task_ns(netns_factory: NetnsFactory, tag: str) -> str:
    ns = netns_factory(tag)
    sh("ip", "-n", ns, "link", "set", "lo", "up")
    return ns


def serve(node: str, upstreams: list[str], forward_timeout: float) -> ServerThread:
    """The server, its loop running in the node namespace (forwards leave from there), with
    the forward timeout scaled: on a slow machine the live upstream must not look silent."""
    server = DnsServer(upstreams, forward_timeout=scaled(forward_timeout))
    return ServerThread(server, namespace=node)


@pytest.fixture
def world(netns_factory: NetnsFactory, node_ns: str, upstream: str) -> Iterator[World]:
    front, back = task_ns(netns_factory, "front"), task_ns(netns_factory, "back")
    with serve(node_ns, [SILENT, REFUSING, UPSTREAM], forward_timeout=0.5) as thread:
        thread.update(VIEW)
        thread.add_endpoint("front", front, frozenset({"front"}), port=53)
        thread.add_endpoint("back", back, frozenset({"back"}), port=53)
        yield World(node_ns, front, back, thread)


def test_every_name_form(world: World) -> None:
    ns = world.front
    assert short(ns, "web") == ["10.0.0.2"]
    assert short(ns, "WeB.FrOnT") == ["10.0.0.2"]
    assert short(ns, "www") == ["10.0.0.2"]
    assert short(ns, "tasks.web") == ["10.0.0.3"]
    assert short(ns, "web.1") == ["10.0.0.3"]
    assert short(ns, "web.1.front") == ["10.0.0.3"]
    assert sorted(short(ns, "db")) == ["10.0.0.5", "10.0.0.6"]  # db.3 is unhealthy
    assert sorted(short(ns, "tasks.db")) == ["10.0.0.5", "10.0.0.6"]
    assert short(ns, "-x", "10.0.0.3") == ["web.1.front."]
    assert short(ns, "-x", "10.0.0.2") == ["web.front."]
    assert short(ns, "SRV", "_80._tcp.web") == ["0", "0", "80", "web.front."]
    srv = short(ns, "SRV", "_5432._tcp.db")
    assert sorted(srv[3::4]) == ["db.1.front.", "db.2.front."]
    aaaa = dig(ns, "AAAA", "web")
    # NOERROR, no answer: answered here (dnsmasq upstream would say NXDOMAIN), not forwarded.
    assert status(aaaa) == "NOERROR" and answer_count(aaaa) == 0


def test_dnsrr_order_rotates(world: World) -> None:
    firsts = {short(world.front, "db")[0] for _ in range(4)}
    assert firsts == {"10.0.0.5", "10.0.0.6"}


def test_a_task_resolves_nothing_of_a_service_on_another_network(world: World) -> None:
    assert short(world.back, "secret") == ["10.1.0.2"]
    for name in ["secret", "secret.1", "tasks.secret", "secret.back"]:
        output = dig(world.front, name)
        assert status(output) == "NXDOMAIN", f"{name} leaked to network front"
    for name in ["web", "web.1", "tasks.db", "www"]:
        assert status(dig(world.back, name)) == "NXDOMAIN", f"{name} leaked to network back"
    assert status(dig(world.back, "-x", "10.0.0.3")) == "NXDOMAIN"


def test_forwarding_fails_over_past_dead_upstreams(world: World) -> None:
    start = time.monotonic()
    assert short(world.front, "example.test") == ["198.51.100.7"]
    # The silent first upstream costs one forward timeout (0.5 s); the refusing one nothing.
    assert time.monotonic() - start < scaled(1.5)
    assert short(world.front, "+tcp", "example.test") == ["198.51.100.7"]
    assert status(dig(world.front, "nothing.example.org")) == "NXDOMAIN"


def test_servfail_not_a_hang_when_no_upstream_answers(
    netns_factory: NetnsFactory, node_ns: str, upstream: str
) -> None:
    ns = task_ns(netns_factory, "lonely")
    with serve(node_ns, [SILENT, REFUSING], forward_timeout=0.4) as thread:
        thread.add_endpoint("lonely", ns, frozenset({"front"}), port=53)
        start = time.monotonic()
        assert status(dig(ns, "example.test")) == "SERVFAIL"
        assert time.monotonic() - start < scaled(1.8)


def test_large_dnsrr_answer_truncated_over_udp_complete_over_tcp(world: World) -> None:
    name = "tasks.replicated-backend"
    udp = dig(world.front, "+noedns", "+ignore", name)  # +ignore: show the TC reply as is
    assert re.search(r"flags:[a-z ]* tc", udp), udp
    assert answer_count(udp) == 0
    assert len(short(world.front, "+tcp", name)) == 30
    # Without +ignore dig itself retries over TCP on TC, as resolvers do.
    assert len(short(world.front, "+noedns", name)) == 30


def test_records_follow_scale_and_health_within_100ms(world: World) -> None:
    tasks = tuple(replace(t, healthy=True) if t.name == "db.3" else t for t in VIEW.tasks) + (
        DnsTask("web.2", "web", {"front": "10.0.0.4"}),
    )
    start = time.monotonic()
    world.thread.update(replace(VIEW, tasks=tasks))
    query = dns.message.make_query("tasks.db", dns.rdatatype.A)
    reply = netns.run_in(world.front, dns.query.udp, query, "127.0.0.11", timeout=scaled(1))
    elapsed = time.monotonic() - start
    assert sorted(rr.address for rr in reply.answer[0]) == ["10.0.0.5", "10.0.0.6", "10.0.0.7"]
    assert elapsed < scaled(0.1), f"took {elapsed * 1000:.0f} ms"
    assert sorted(short(world.front, "tasks.web")) == ["10.0.0.3", "10.0.0.4"]
    gone = replace(VIEW, tasks=tuple(t for t in VIEW.tasks if t.service != "web"))
    world.thread.update(gone)
    assert short(world.front, "tasks.web") == []
    assert short(world.front, "web") == ["10.0.0.2"]  # the VIP stays while the service exists


def test_a_flooding_task_does_not_starve_others(world: World) -> None:
    flood = subprocess.Popen(
        ["ip", "netns", "exec", world.back, sys.executable, "-c", FLOOD, str(scaled(5))],
        stdout=subprocess.DEVNULL,
    )
    try:
        time.sleep(scaled(0.5))  # the flood is under way
        latencies = []
        for _ in range(20):
            query = dns.message.make_query("web", dns.rdatatype.A)
            start = time.monotonic()
            reply = netns.run_in(world.front, dns.query.udp, query, "127.0.0.11", timeout=scaled(1))
            latencies.append(time.monotonic() - start)
            assert reply.rcode() == dns.rcode.NOERROR
            assert [rr.address for rr in reply.answer[0]] == ["10.0.0.2"]
        assert flood.poll() is None, "the flood stopped early: the test proved nothing"
        assert sorted(latencies)[10] < scaled(0.05), latencies
    finally:
        flood.kill()
        flood.wait()


# Send known-name queries as fast as one core allows for argv[1] seconds, never reading replies.
FLOOD = """
import socket, sys, time
q = bytes.fromhex("abcd01000001000000000000067365637265740000010001")  # secret A
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect(("127.0.0.11", 53))
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    for _ in range(1000):
        try:
            s.send(q)
        except OSError:
            pass
"""


def test_random_ports_are_served_and_removal_closes_them(world: World) -> None:
    udp_port, tcp_port = world.thread.add_endpoint("spare", world.front, frozenset({"front"}))
    assert udp_port != 53 and tcp_port != 53
    assert short(world.front, "-p", str(udp_port), "web") == ["10.0.0.2"]
    assert short(world.front, "+tcp", "-p", str(tcp_port), "web") == ["10.0.0.2"]

    async def remove() -> None:
        world.thread.server.remove_endpoint("spare")

    world.thread.run(remove())
    gone = subprocess.run(
        ["ip", "netns", "exec", world.front, "dig", "@127.0.0.11", "-p", str(udp_port)]
        + [f"+time={round(scaled(1))}", "+tries=1", "web"],
        capture_output=True,
        text=True,
    )
    assert gone.returncode != 0 and "10.0.0.2" not in gone.stdout
    assert short(world.front, "web") == ["10.0.0.2"]  # the other endpoint is untouched
