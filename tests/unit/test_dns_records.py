"""The record table and hot path without sockets: every name form, scoping, sizes, odd packets.

Queries are real DNS packets (dnslib) fed to ScopeTable.answer; replies are parsed back, so
these assert what a client would see. The forwarder's failover runs against upstreams on
loopback in this namespace.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dnslib import EDNS0, QTYPE, RCODE, RR, A, DNSRecord, EDNSOption

from meshctl.dns.forwarder import Forwarder, parse_upstream, read_resolv_conf
from meshctl.dns.records import (
    DROP,
    DnsPort,
    DnsService,
    DnsTask,
    DnsView,
    ScopeTable,
    build_zones,
)
from tests.conftest import scaled

VIEW = DnsView(
    networks=frozenset({"front", "back"}),
    services=(
        DnsService(
            "web",
            "vip",
            {"front": "10.0.0.2"},
            {"front": ("www",)},
            (DnsPort(80), DnsPort(53, "udp")),
        ),
        DnsService("db", "dnsrr", {}, {"back": ("database",)}, (DnsPort(5432),)),
        DnsService("cache", "vip", {"back": "10.1.0.2"}),
    ),
    tasks=(
        DnsTask("web.1", "web", {"front": "10.0.0.3"}),
        DnsTask("web.2", "web", {"front": "10.0.0.4"}, healthy=False),
        DnsTask("db.1", "db", {"back": "10.1.0.5", "front": "10.0.0.5"}),
        DnsTask("db.2", "db", {"back": "10.1.0.6", "front": "10.0.0.6"}),
        DnsTask("db.3", "db", {"back": "10.1.0.7", "front": "10.0.0.7"}, healthy=False),
        DnsTask("cache.1", "cache", {"back": "10.1.0.3"}),
    ),
)


def table(*networks: str, view: DnsView = VIEW) -> ScopeTable:
    return ScopeTable(build_zones(view), frozenset(networks))


def query(name: str, qtype: str = "A", *, rd: bool = True, edns: int | None = None) -> bytes:
    q = DNSRecord.question(name, qtype)
    q.header.rd = int(rd)
    if edns is not None:
        q.add_ar(EDNS0(udp_len=edns))
    return bytes(q.pack())


def ask(t: ScopeTable, name: str, qtype: str = "A", **kw: object) -> DNSRecord | None:
    """The parsed reply, or None when the table would forward the question."""
    tcp = bool(kw.pop("tcp", False))
    data = query(name, qtype, **kw)  # type: ignore[arg-type]
    reply = t.answer(data, tcp)
    if reply is None:
        return None
    parsed = DNSRecord.parse(reply)
    assert parsed.header.id == DNSRecord.parse(data).header.id
    return parsed


def rdatas(reply: DNSRecord | None) -> list[str]:
    assert reply is not None, "the name was not answered locally"
    assert reply.header.rcode == RCODE.NOERROR
    return [str(rr.rdata) for rr in reply.rr]


@pytest.mark.parametrize(
    ("name", "qtype", "expected"),
    [
        ("web", "A", ["10.0.0.2"]),
        ("WeB", "A", ["10.0.0.2"]),
        ("web.front", "A", ["10.0.0.2"]),
        ("www", "A", ["10.0.0.2"]),
        ("www.front", "A", ["10.0.0.2"]),
        ("tasks.web", "A", ["10.0.0.3"]),  # web.2 is unhealthy
        ("tasks.www", "A", ["10.0.0.3"]),
        ("web.1", "A", ["10.0.0.3"]),
        ("web.1.front", "A", ["10.0.0.3"]),
        ("2.0.0.10.in-addr.arpa", "PTR", ["web.front."]),
        ("3.0.0.10.in-addr.arpa", "PTR", ["web.1.front."]),
        ("_80._tcp.web", "SRV", ["0 0 80 web.front."]),
        ("_53._udp.web", "SRV", ["0 0 53 web.front."]),
        ("web", "AAAA", []),
        ("web.1", "AAAA", []),
    ],
)
def test_name_forms(name: str, qtype: str, expected: list[str]) -> None:
    assert rdatas(ask(table("front"), name, qtype)) == expected


def test_reply_echoes_the_question_as_asked() -> None:
    reply = ask(table("front"), "WeB.FrOnT")
    assert reply is not None
    assert str(reply.q.qname) == "WeB.FrOnT."
    assert rdatas(reply) == ["10.0.0.2"]


def test_dnsrr_answers_healthy_tasks_rotated_on_every_query() -> None:
    t = table("back")
    answers = [rdatas(ask(t, "db")) for _ in range(3)]
    assert answers[0] == ["10.1.0.5", "10.1.0.6"]
    assert answers[1] == ["10.1.0.6", "10.1.0.5"]
    assert answers[2] == answers[0]
    assert sorted(rdatas(ask(t, "tasks.database"))) == ["10.1.0.5", "10.1.0.6"]


def test_dnsrr_srv_names_each_healthy_task_with_its_address() -> None:
    reply = ask(table("back"), "_5432._tcp.db", "SRV")
    assert rdatas(reply) == ["0 0 5432 db.1.back.", "0 0 5432 db.2.back."]
    assert reply is not None
    assert {(str(rr.rname), str(rr.rdata)) for rr in reply.ar} == {
        ("db.1.back.", "10.1.0.5"),
        ("db.2.back.", "10.1.0.6"),
    }


def test_scope_hides_services_of_other_networks() -> None:
    front = table("front")
    for name in ["cache", "cache.1", "tasks.cache", "cache.back", "database", "db.back"]:
        assert ask(front, name) is None, f"{name} answered on a network it is not on"
    assert ask(front, "3.0.1.10.in-addr.arpa", "PTR") is None


def test_name_dot_network_restricts_to_that_network() -> None:
    both = table("front", "back")
    assert rdatas(ask(both, "db.1.back")) == ["10.1.0.5"]
    assert rdatas(ask(both, "db.1.front")) == ["10.0.0.5"]
    # Unqualified: the addresses on every shared network, networks in name order.
    assert rdatas(ask(both, "db.1")) == ["10.1.0.5", "10.0.0.5"]


def test_unknown_names_and_types_go_upstream_or_get_nodata() -> None:
    t = table("front")
    assert ask(t, "example.com") is None
    assert rdatas(ask(t, "web", "MX")) == []
    assert rdatas(ask(t, "web", "TXT")) == []


def test_health_and_scale_changes_show_in_a_rebuilt_table() -> None:
    tasks = tuple(
        DnsTask(t.name, t.service, t.addresses, healthy=True) if t.name == "web.2" else t
        for t in VIEW.tasks
    ) + (DnsTask("web.3", "web", {"front": "10.0.0.9"}),)
    new = DnsView(VIEW.networks, VIEW.services, tasks)
    assert sorted(rdatas(ask(table("front", view=new), "tasks.web"))) == [
        "10.0.0.3",
        "10.0.0.4",
        "10.0.0.9",
    ]


def test_recursion_desired_is_echoed() -> None:
    t = table("front")
    with_rd, without_rd = ask(t, "web"), ask(t, "web", rd=False)
    assert with_rd is not None and without_rd is not None
    assert with_rd.header.rd == 1 and without_rd.header.rd == 0
    assert with_rd.header.aa == 1 and with_rd.header.qr == 1


def big_view(replicas: int) -> DnsView:
    return DnsView(
        networks=frozenset({"front"}),
        services=(DnsService("replicated-backend", "dnsrr"),),
        tasks=tuple(
            DnsTask(f"replicated-backend.{i}", "replicated-backend", {"front": f"10.0.1.{i}"})
            for i in range(1, replicas + 1)
        ),
    )


def test_large_answer_truncated_over_udp_whole_over_tcp() -> None:
    t = table("front", view=big_view(30))
    udp = ask(t, "tasks.replicated-backend")
    assert udp is not None and udp.header.tc == 1 and udp.rr == []
    small_edns = ask(t, "tasks.replicated-backend", edns=512)
    assert small_edns is not None and small_edns.header.tc == 1
    tcp = ask(t, "tasks.replicated-backend", tcp=True)
    assert tcp is not None and tcp.header.tc == 0 and len(tcp.rr) == 30
    big_edns = ask(t, "tasks.replicated-backend", edns=4096)
    assert big_edns is not None and big_edns.header.tc == 0 and len(big_edns.rr) == 30
    assert big_edns.ar[0].rtype == QTYPE.OPT


def test_edns_with_options_is_answered_with_our_opt() -> None:
    q = DNSRecord.question("web")
    q.add_ar(EDNS0(udp_len=1232, opts=[EDNSOption(10, b"\x01" * 8)]))  # a client cookie
    reply = table("front").answer(bytes(q.pack()), False)
    assert reply is not None and reply
    parsed = DNSRecord.parse(reply)
    assert rdatas(parsed) == ["10.0.0.2"]
    assert [rr.rtype for rr in parsed.ar] == [QTYPE.OPT]


def test_unusual_queries_take_the_slow_path_to_the_same_answer() -> None:
    q = DNSRecord.question("web")
    q.add_ar(EDNS0(udp_len=1232))
    q.add_ar(EDNS0(udp_len=1232))  # two OPTs: not for the hot path
    reply = table("front").answer(bytes(q.pack()), False)
    assert reply
    assert rdatas(DNSRecord.parse(reply)) == ["10.0.0.2"]


def test_malformed_and_odd_packets() -> None:
    t = table("front")
    assert t.answer(b"\x12", False) == DROP
    response = bytearray(query("web"))
    response[2] |= 0x80
    assert t.answer(bytes(response), False) == DROP, "answers to responses could loop"
    garbage = b"\xab\xcd\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x05ab"
    reply = t.answer(garbage, False)
    assert reply and reply[:2] == b"\xab\xcd" and reply[3] & 0x0F == RCODE.FORMERR
    two = DNSRecord.question("web")
    two.add_question(DNSRecord.question("www").q)
    reply = t.answer(bytes(two.pack()), False)
    assert reply and DNSRecord.parse(reply).header.rcode == RCODE.FORMERR
    notify = DNSRecord.question("web")
    notify.header.opcode = 4
    reply = t.answer(bytes(notify.pack()), False)
    assert reply and DNSRecord.parse(reply).header.rcode == RCODE.NOTIMP


def test_rebuild_for_thousands_of_tasks_answers_every_name() -> None:
    """500 VIP services of 10 tasks and one dnsrr service of 2000: rebuilt and answering."""
    tasks = tuple(
        DnsTask(f"svc{s}.{r}", f"svc{s}", {"front": f"10.{s // 250}.{s % 250}.{r}"})
        for s in range(500)
        for r in range(1, 11)
    ) + tuple(
        DnsTask(f"big.{i}", "big", {"front": f"10.8.{i // 250}.{i % 250 + 1}"}) for i in range(2000)
    )
    services = tuple(
        DnsService(f"svc{s}", "vip", {"front": f"10.9.{s // 250}.{s % 250}"}, {}, (DnsPort(80),))
        for s in range(500)
    ) + (DnsService("big", "dnsrr", {}, {"front": ("huge",)}, (DnsPort(80),)),)
    view = DnsView(frozenset({"front"}), services, tasks)
    # No timing here: speed is measured by bench/dns, never by a timed test.
    t = table("front", view=view)
    assert len(rdatas(ask(t, "tasks.svc499"))) == 10
    assert rdatas(ask(t, "svc0")) == ["10.9.0.0"]
    assert len(rdatas(ask(t, "huge", tcp=True))) == 2000


def test_upstream_forms_and_resolv_conf(tmp_path: Path) -> None:
    assert parse_upstream("1.1.1.1") == ("1.1.1.1", 53)
    assert parse_upstream("10.0.0.1:5353") == ("10.0.0.1", 5353)
    assert parse_upstream("[::1]:5353") == ("::1", 5353)
    assert parse_upstream("fe80::1") == ("fe80::1", 53)
    with pytest.raises(ValueError):
        parse_upstream("dns.example")
    conf = tmp_path / "resolv.conf"
    conf.write_text("# x\nnameserver 127.0.0.11\nnameserver 10.0.0.53\nnameserver fe80::1%eth0\n")
    assert read_resolv_conf(str(conf)) == ["10.0.0.53", "fe80::1"]


class FakeUpstream:
    """A UDP upstream on 127.0.0.1 that answers every query with a fixed rcode and one A."""

    def __init__(self, rcode: int, silent: bool = False) -> None:
        self.rcode, self.silent, self.asked = rcode, silent, 0
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"

    def serve(self) -> None:
        asyncio.get_running_loop().add_reader(self.sock.fileno(), self._reply)

    def _reply(self) -> None:
        data, peer = self.sock.recvfrom(65535)
        self.asked += 1
        if self.silent:
            return
        reply = DNSRecord.parse(data).reply()
        reply.header.rcode = self.rcode
        if self.rcode == RCODE.NOERROR:
            reply.add_answer(RR(reply.q.qname, QTYPE.A, rdata=A("192.0.2.1"), ttl=60))
        self.sock.sendto(bytes(reply.pack()), peer)


@pytest.fixture
def upstreams() -> Iterator[list[FakeUpstream]]:
    made: list[FakeUpstream] = []
    yield made
    for upstream in made:
        upstream.sock.close()


def closed_port() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def test_forwarder_fails_over_past_dead_silent_servfail_and_refused(
    upstreams: list[FakeUpstream],
) -> None:
    silent, servfail, refused, good = (
        FakeUpstream(0, silent=True),
        FakeUpstream(RCODE.SERVFAIL),
        FakeUpstream(RCODE.REFUSED),
        FakeUpstream(RCODE.NOERROR),
    )
    upstreams += [silent, servfail, refused, good]

    async def run() -> bytes:
        for upstream in upstreams:
            upstream.serve()
        order = [closed_port(), silent.address, servfail.address, refused.address, good.address]
        return await Forwarder(order, timeout=scaled(0.3)).forward(query("example.com"), tcp=False)

    reply = DNSRecord.parse(asyncio.run(run()))
    assert reply.header.rcode == RCODE.NOERROR
    assert [str(rr.rdata) for rr in reply.rr] == ["192.0.2.1"]
    assert [u.asked for u in upstreams] == [1, 1, 1, 1]


def test_forwarder_answers_servfail_when_no_upstream_answers(
    upstreams: list[FakeUpstream],
) -> None:
    silent = FakeUpstream(0, silent=True)
    upstreams.append(silent)

    async def run() -> bytes:
        silent.serve()
        return await Forwarder([closed_port(), silent.address], timeout=scaled(0.3)).forward(
            query("example.com"), tcp=False
        )

    start = time.monotonic()
    reply = DNSRecord.parse(asyncio.run(run()))
    assert reply.header.rcode == RCODE.SERVFAIL
    assert str(reply.q.qname) == "example.com."
    assert time.monotonic() - start < scaled(1.5)  # one forward timeout, not a hang
