"""Fuzz: random and mutated packets are dropped or answered, and never stop the server.

Half the packets are random bytes, half are valid queries with bits flipped, bytes replaced,
counts changed, compression pointers planted, cut short or padded. The first test feeds the
record table directly (every reply checked); the second sends them over UDP and TCP to a
running server on loopback and then checks it still answers.
"""

from __future__ import annotations

import random
import socket
from collections.abc import Iterator

from dnslib import EDNS0, RCODE, DNSRecord

from meshctl.dns.records import DROP, DnsService, DnsTask, DnsView, ScopeTable, build_zones
from meshctl.dns.server import DnsServer
from meshctl.dns.thread import ServerThread
from meshctl.dns.wire import QR, question_end
from tests.conftest import scaled

PACKETS = 100_000
VIEW = DnsView(
    networks=frozenset({"front"}),
    services=(DnsService("web", "vip", {"front": "10.0.0.2"}), DnsService("db", "dnsrr")),
    tasks=tuple(DnsTask(f"db.{i}", "db", {"front": f"10.0.0.{10 + i}"}) for i in range(40)),
)


def seeds() -> list[bytes]:
    """Valid queries to mutate: every name form, a few types, with and without EDNS."""
    out = []
    for name in ["web", "db", "tasks.db", "db.3", "web.front", "2.0.0.10.in-addr.arpa", "x.org"]:
        for qtype in ["A", "AAAA", "PTR", "SRV", "ANY", "TXT"]:
            q = DNSRecord.question(name, qtype)
            out.append(bytes(q.pack()))
            q.add_ar(EDNS0(udp_len=4096))
            out.append(bytes(q.pack()))
    return out


def mutate(rng: random.Random, packet: bytes) -> bytes:
    data = bytearray(packet)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(7)
        at = rng.randrange(len(data)) if data else 0
        if op == 0 and data:
            data[at] ^= 1 << rng.randrange(8)
        elif op == 1 and data:
            data[at] = rng.randrange(256)
        elif op == 2:
            del data[rng.randrange(len(data) + 1) :]
        elif op == 3:
            data += rng.randbytes(rng.randint(1, 40))
        elif op == 4 and len(data) >= 12:
            data[4:12] = rng.randbytes(8)
        elif op == 5 and len(data) > 14:
            # A compression pointer, possibly to itself or past the end.
            data[at : at + 2] = bytes((0xC0 | rng.randrange(4), rng.randrange(256)))
        elif op == 6 and len(data) > 2:
            data[2] = rng.randrange(256)
    return bytes(data)


def packets(count: int, seed: int) -> Iterator[bytes]:
    rng = random.Random(seed)
    valid = seeds()
    for i in range(count):
        if i % 2:
            yield rng.randbytes(rng.randint(0, 120))
        else:
            yield mutate(rng, rng.choice(valid))


def test_table_survives_random_and_mutated_packets() -> None:
    table = ScopeTable(build_zones(VIEW), frozenset({"front"}))
    counts = {"drop": 0, "reply": 0, "forward": 0}
    for i, data in enumerate(packets(PACKETS, seed=1)):
        reply = table.answer(data, tcp=bool(i % 3 == 0))
        if reply is None:
            counts["forward"] += 1
            # Only queries with one well-formed question may leave for an upstream (dnslib
            # rejects labels that are not UTF-8, which DNS allows: those take the hot path).
            assert data[2] & QR == 0 and data[4:6] == b"\x00\x01"
            assert question_end(data) is not None or DNSRecord.parse(data)
        elif reply == DROP:
            counts["drop"] += 1
        else:
            counts["reply"] += 1
            assert reply[:2] == data[:2] and reply[2] & QR, f"bad reply to {data.hex()}"
            assert len(reply) >= 12
    assert all(counts.values()), counts
    good = table.answer(bytes(DNSRecord.question("web").pack()), False)
    assert good and [str(rr.rdata) for rr in DNSRecord.parse(good).rr] == ["10.0.0.2"]


def test_server_survives_a_flood_of_bad_packets_over_udp_and_tcp() -> None:
    with ServerThread(DnsServer([], forward_timeout=0.2)) as thread:
        thread.update(VIEW)
        udp_port, tcp_port = thread.add_endpoint(
            "fuzz", None, frozenset({"front"}), address="127.0.0.1", port=0
        )
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.connect(("127.0.0.1", udp_port))
            for data in packets(PACKETS, seed=2):
                try:
                    client.send(data)
                except OSError:  # an ICMP error from an earlier datagram: keep sending
                    continue
        for data in packets(2_000, seed=3):
            with socket.create_connection(("127.0.0.1", tcp_port), timeout=scaled(5)) as conn:
                conn.sendall(len(data).to_bytes(2, "big") + data)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(scaled(5))
            client.connect(("127.0.0.1", udp_port))
            query = DNSRecord.question("web")
            client.send(bytes(query.pack()))
            while True:  # skip late replies to flood packets that reached this port number
                reply = DNSRecord.parse(client.recv(65535))
                if reply.header.id == query.header.id:
                    break
        assert reply.header.rcode == RCODE.NOERROR
        assert [str(rr.rdata) for rr in reply.rr] == ["10.0.0.2"]
