"""The record table: what each name answers, per network, and the answers each scope serves.

Pure: a DnsView (what the controller knows) becomes per-network name indexes (build_zones);
a ScopeTable answers queries for the endpoints that share one set of networks, encoding each
known question once (dnslib) and serving it from bytes after that. Names are case-insensitive
and only names on the asking endpoint's networks exist for it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from dnslib import (
    AAAA,
    EDNS0,
    PTR,
    QTYPE,
    RR,
    SRV,
    A,
    DNSError,
    DNSHeader,
    DNSQuestion,
    DNSRecord,
)

from meshctl.dns.wire import (
    CLASS_IN,
    COUNTS_EDNS,
    COUNTS_PLAIN,
    OPCODE_MASK,
    OUR_EDNS_SIZE,
    QR,
    RCODE_FORMERR,
    RCODE_NOTIMP,
    RD,
    TCP_LIMIT,
    Answer,
    edns_size,
    error_reply,
    question_end,
    udp_limit,
)

# Answers carry TTL 0 (docs/dns.md): the server is local and answers in microseconds, while any
# caching would keep a stopped or unhealthy task in a client's answers after we drop it.
TTL = 0
# Question types whose answers are kept encoded; others for a known name are rare (NODATA).
CACHED_QTYPES = frozenset({QTYPE.A, QTYPE.AAAA, QTYPE.PTR, QTYPE.SRV, QTYPE.ANY})
# The reply for a packet that gets none (a response, a runt): dropped, not answered.
DROP = b""
_A_RR_SIZE = 16  # name pointer, type, class, TTL, rdlength, IPv4 address


@dataclass(frozen=True)
class DnsPort:
    """A port a service's tasks listen on: answered by SRV _<port>._<proto>.<service>."""

    port: int
    proto: str = "tcp"


@dataclass(frozen=True)
class DnsService:
    """A service as DNS sees it. vips and aliases are keyed by network name."""

    name: str
    mode: str = "vip"  # "vip": the name answers the VIP; "dnsrr": the healthy tasks' addresses
    vips: Mapping[str, str] = field(default_factory=dict)
    aliases: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    ports: tuple[DnsPort, ...] = ()


@dataclass(frozen=True)
class DnsTask:
    """A running task (replica) such as web.1; addresses are keyed by network name."""

    name: str
    service: str
    addresses: Mapping[str, str] = field(default_factory=dict)
    healthy: bool = True


@dataclass(frozen=True)
class DnsView:
    """Everything the DNS server answers from; the controller maps its model into this."""

    networks: frozenset[str] = frozenset()
    services: tuple[DnsService, ...] = ()
    tasks: tuple[DnsTask, ...] = ()


@dataclass(frozen=True)
class NameRecords:
    """What one name answers on a network (or merged over a scope's networks)."""

    addresses: tuple[str, ...] = ()
    rotate: bool = False  # several tasks: each reply starts one address further on
    ptr: tuple[str, ...] = ()  # PTR targets, without the trailing dot
    srv: tuple[tuple[int, str, str], ...] = ()  # (port, target name, target address)


class Zone:
    """One network's names. Records sit in insertion-ordered dicts (ordered sets: a name given
    twice, such as a shared alias, merges without duplicates in linear time) and become a
    NameRecords only when the name is first asked, so a rebuild stays cheap."""

    def __init__(self) -> None:
        self.addresses: dict[str, dict[str, None]] = {}
        self.rotate: set[str] = set()
        self.ptr: dict[str, dict[str, None]] = {}
        self.srv: dict[str, dict[tuple[int, str, str], None]] = {}

    def add_addresses(self, names: Iterable[str], addresses: list[str], rotate: bool) -> None:
        for name in names:
            self.addresses.setdefault(name.lower(), {}).update(dict.fromkeys(addresses))
            if rotate:
                self.rotate.add(name.lower())

    def add_ptr(self, address: str, target: str) -> None:
        self.ptr.setdefault(reverse_name(address), {})[target.lower()] = None

    def add_srv(self, names: Iterable[str], targets: list[tuple[int, str, str]]) -> None:
        for name in names:
            self.srv.setdefault(name.lower(), {}).update(dict.fromkeys(targets))

    def records(self, name: str) -> NameRecords | None:
        """What a lowercase name answers on this network, or None if it is not here."""
        addresses, ptr, srv = self.addresses.get(name), self.ptr.get(name), self.srv.get(name)
        if addresses is None and ptr is None and srv is None:
            return None
        return NameRecords(
            tuple(addresses or ()), name in self.rotate, tuple(ptr or ()), tuple(srv or ())
        )


def reverse_name(address: str) -> str:
    """The PTR name of an address: d.c.b.a.in-addr.arpa, or the ip6.arpa nibbles."""
    if ":" in address:
        return ipaddress.ip_address(address).reverse_pointer
    # By hand for IPv4: ipaddress parses slowly and a rebuild makes thousands of these.
    return ".".join(reversed(address.split("."))) + ".in-addr.arpa"


def _qualified(base: str, network: str) -> tuple[str, str]:
    """A name and its network-restricted form <name>.<network>."""
    return base, f"{base}.{network}"


def _add_service(zone: Zone, network: str, service: DnsService, tasks: list[DnsTask]) -> None:
    """A service's names on one network: itself, its aliases, tasks.*, SRV and its VIP's PTR."""
    on_network = [t for t in tasks if network in t.addresses]
    vip = service.vips.get(network) if service.mode == "vip" else None
    if vip is None and not on_network:
        return
    healthy = [(f"{t.name}.{network}", t.addresses[network]) for t in on_network if t.healthy]
    healthy_addresses = [address for _, address in healthy]
    # A VIP service's SRV targets name the service; a dnsrr service's name each healthy task.
    targets = [(f"{service.name}.{network}", vip)] if vip is not None else healthy
    for base in [service.name, *service.aliases.get(network, ())]:
        names = _qualified(base, network)
        if vip is not None:
            zone.add_addresses(names, [vip], rotate=False)
        else:
            zone.add_addresses(names, healthy_addresses, rotate=True)
        zone.add_addresses([f"tasks.{n}" for n in names], healthy_addresses, rotate=True)
        for port in service.ports:
            zone.add_srv(
                [f"_{port.port}._{port.proto}.{n}" for n in names],
                [(port.port, target, address) for target, address in targets],
            )
    if vip is not None:
        zone.add_ptr(vip, f"{service.name}.{network}")


def build_zones(view: DnsView) -> dict[str, Zone]:
    """Each network's names: services, tasks.<service>, aliases, task names, PTR and SRV."""
    tasks_of: dict[str, list[DnsTask]] = {}
    for task in view.tasks:
        tasks_of.setdefault(task.service, []).append(task)
    zones = {network: Zone() for network in view.networks}
    for service in view.services:
        for network, zone in zones.items():
            _add_service(zone, network, service, tasks_of.get(service.name, []))
    for task in view.tasks:
        for network, address in task.addresses.items():
            if network in zones:
                zones[network].add_addresses(
                    _qualified(task.name, network), [address], rotate=False
                )
                zones[network].add_ptr(address, f"{task.name}.{network}")
    return zones


def merge(records: list[NameRecords]) -> NameRecords:
    """One name's records over several networks, in the order given (networks sorted)."""
    if len(records) == 1:
        return records[0]
    return NameRecords(
        tuple(dict.fromkeys(a for r in records for a in r.addresses)),
        any(r.rotate for r in records),
        tuple(dict.fromkeys(p for r in records for p in r.ptr)),
        tuple(dict.fromkeys(t for r in records for t in r.srv)),
    )


def resource_records(name: str, qtype: int, records: NameRecords) -> tuple[list[RR], list[RR]]:
    """The answer and additional records for a question about a known name (AAAA may be none)."""
    answers: list[RR] = []
    additional: list[RR] = []
    any_type = qtype == QTYPE.ANY
    for address in records.addresses:
        v6 = ":" in address
        if (qtype == QTYPE.AAAA and v6) or (qtype == QTYPE.A and not v6) or any_type:
            rdata = AAAA(address) if v6 else A(address)
            answers.append(RR(name, QTYPE.AAAA if v6 else QTYPE.A, rdata=rdata, ttl=TTL))
    if qtype == QTYPE.PTR or any_type:
        answers += [RR(name, QTYPE.PTR, rdata=PTR(t + "."), ttl=TTL) for t in records.ptr]
    if qtype == QTYPE.SRV or any_type:
        for port, target, address in records.srv:
            answers.append(RR(name, QTYPE.SRV, rdata=SRV(0, 0, port, target + "."), ttl=TTL))
            rtype, rdata = (QTYPE.AAAA, AAAA(address)) if ":" in address else (QTYPE.A, A(address))
            additional.append(RR(target + ".", rtype, rdata=rdata, ttl=TTL))
    return answers, additional


def encode(name: str, qtype: int, records: NameRecords) -> Answer:
    """Encode the reply to (name, qtype) once: header variants and the records after it."""
    reply = DNSRecord(DNSHeader(qr=1, aa=1, ra=1), q=DNSQuestion(name, qtype))
    answers, additional = resource_records(name, qtype, records)
    for rr in answers:
        reply.add_answer(rr)
    for rr in additional:
        reply.add_ar(rr)
    packed = bytes(reply.pack())
    body = packed[question_end(packed) or len(packed) :]
    rotating = records.rotate and qtype == QTYPE.A and len(answers) > 1
    step = _A_RR_SIZE if rotating and len(body) == _A_RR_SIZE * len(answers) else 0
    return Answer(len(answers), len(additional), body, step)


def wire_name(key: bytes) -> str | None:
    """The dotted lowercase name of a question key (wire name + type + class), None if odd."""
    labels = []
    i = 0
    while key[i]:
        label = key[i + 1 : i + 1 + key[i]]
        if b"." in label:
            return None
        labels.append(label.decode("latin-1"))
        i += key[i] + 1
    return ".".join(labels)


class ScopeTable:
    """Answers for endpoints on one set of networks: a name exists only if on one of them."""

    def __init__(self, zones: Mapping[str, Zone], scope: frozenset[str]) -> None:
        self.zones = [zones[n] for n in sorted(scope) if n in zones]
        self.cache: dict[bytes, Answer] = {}

    def lookup(self, name: str) -> NameRecords | None:
        """The records of a lowercase dotted name (no trailing dot) in this scope, or None."""
        found = [r for zone in self.zones if (r := zone.records(name)) is not None]
        return merge(found) if found else None

    def answer(self, data: bytes, tcp: bool) -> bytes | None:
        """The reply to one query; DROP to send nothing; None when the name is not ours: forward.

        The hot path slices the question out of the packet and serves cached bytes; a plain
        question not yet cached is encoded and cached; anything else goes through dnslib.
        """
        if len(data) < 12 or data[2] & QR:
            return DROP
        qend = question_end(data)
        if qend is None or data[2] & OPCODE_MASK:
            return self._slow(data, tcp)
        counts = data[4:12]
        if counts == COUNTS_PLAIN and qend == len(data):
            size = None
        elif counts == COUNTS_EDNS:
            size = edns_size(data, qend)
            if size is None:
                return self._slow(data, tcp)
        else:
            return self._slow(data, tcp)
        key = data[12:qend].lower()
        answer = self.cache.get(key)
        if answer is None:
            answer = self._encode_key(key)
            if answer is None:
                return None
        limit = TCP_LIMIT if tcp else udp_limit(size)
        return answer.render(data[:2], data[2] & RD, data[12:qend], size, limit)

    def _encode_key(self, key: bytes) -> Answer | None:
        """Encode (and cache, for common types) the answer to a plain question key, if ours."""
        if key[-2:] != CLASS_IN:
            return None
        name = wire_name(key)
        records = None if name is None else self.lookup(name)
        if name is None or records is None:
            return None
        qtype = int.from_bytes(key[-4:-2], "big")
        answer = encode(name, qtype, records)
        if qtype in CACHED_QTYPES:
            self.cache[key] = answer
        return answer

    def _slow(self, data: bytes, tcp: bool) -> bytes | None:
        """The dnslib path for unusual queries: FORMERR, NOTIMP, a local answer or None."""
        try:
            query = DNSRecord.parse(data)
        except (DNSError, ValueError, IndexError, KeyError, UnicodeError):
            return error_reply(data, RCODE_FORMERR)
        if query.header.opcode != 0:
            return error_reply(data, RCODE_NOTIMP)
        if len(query.questions) != 1 or query.rr or query.auth:
            return error_reply(data, RCODE_FORMERR)
        question = query.q
        name = str(question.qname).rstrip(".").lower()
        records = self.lookup(name) if question.qclass == 1 else None
        if records is None:
            return None
        reply = query.reply(ra=1, aa=1)
        answers, additional = resource_records(str(question.qname), question.qtype, records)
        reply.rr, reply.ar = answers, additional
        opts = [rr for rr in query.ar if rr.rtype == QTYPE.OPT]
        if opts:
            reply.add_ar(EDNS0(udp_len=OUR_EDNS_SIZE))
        packed = reply.pack()
        limit = TCP_LIMIT if tcp else udp_limit(opts[0].rclass if opts else None)
        if len(packed) > limit:
            reply.header.tc = 1
            reply.rr, reply.ar = [], reply.ar[len(additional) :]
            packed = reply.pack()
        return packed
