"""nf_tables rule expressions as netlink attributes: the rule text meshctl writes (the form
`nft list` prints, kernel.nftables_rules) compiled to the expressions `nft` 1.0.6 sends for it,
byte for byte (tests/conformance/test_nftables_netlink.py compares them with nft's own).

Hand-built because pyroute2's nftables API has no builders for maps, verdict maps or element
data; what it buys is a change written from this process in one netlink batch, with no `nft`
process and no cache of the whole ruleset per change. Only the statements meshctl writes are
known here; any other text is refused (ValueError) before anything is sent.
Pure: kernel.nftables_messages puts rules in messages, kernel.nftables sends them.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

# -- netlink attributes ---------------------------------------------------------------------------

NLA_F_NESTED = 0x8000


def attr(kind: int, payload: bytes) -> bytes:
    """One netlink attribute, padded to 4 bytes."""
    size = 4 + len(payload)
    return struct.pack("=HH", size, kind) + payload + b"\0" * (-size % 4)


def nested(kind: int, *attrs: bytes) -> bytes:
    return attr(kind | NLA_F_NESTED, b"".join(attrs))


def be32(kind: int, value: int) -> bytes:
    return attr(kind, struct.pack(">i" if value < 0 else ">I", value))


def text(kind: int, value: str) -> bytes:
    return attr(kind, value.encode() + b"\0")


# -- nf_tables uapi numbers (linux/netfilter/nf_tables.h) ---------------------------------------

NFTA_LIST_ELEM = 1
NFTA_EXPR_NAME, NFTA_EXPR_DATA = 1, 2
NFTA_DATA_VALUE, NFTA_DATA_VERDICT = 1, 2
NFTA_VERDICT_CODE, NFTA_VERDICT_CHAIN = 1, 2
VERDICTS = {"drop": 0, "accept": 1, "continue": -1, "return": -5, "jump": -3, "goto": -4}
REG_VERDICT, REG_1 = 0, 1
CMP_EQ, CMP_NEQ = 0, 1
PAYLOAD_NETWORK, PAYLOAD_TRANSPORT = 1, 2
CSUM_INET = 1
META_L4PROTO = 16
CT_STATUS = 2
NUMGEN_INC, NUMGEN_RANDOM = 0, 1
NAT_SNAT, NAT_DNAT = 0, 1
NFPROTO_IPV4 = 2
REJECT_ICMP_UNREACH, REJECT_TCP_RST = 0, 1
PROTOCOLS = {"tcp": 6, "udp": 17}
ICMP_CODES = {"host-unreachable": 1, "port-unreachable": 3, "admin-prohibited": 13}
CT_STATUS_BITS = {"snat": 0x10, "dnat": 0x20}


def data_value(kind: int, value: bytes) -> bytes:
    """An NFTA_DATA_VALUE inside attribute `kind`."""
    return nested(kind, attr(NFTA_DATA_VALUE, value))


def verdict(kind: int, code: str, chain: str | None = None) -> bytes:
    """An NFTA_DATA_VERDICT inside attribute `kind`: accept, drop, goto CHAIN..."""
    parts = [be32(NFTA_VERDICT_CODE, VERDICTS[code])]
    if chain is not None:
        parts.append(text(NFTA_VERDICT_CHAIN, chain))
    return nested(kind, nested(NFTA_DATA_VERDICT, *parts))


def expr(name: str, *attrs: bytes, data: bool = True) -> bytes:
    """One expression of a rule's NFTA_RULE_EXPRESSIONS list (nft leaves out the empty data of
    some, such as notrack)."""
    parts = [text(NFTA_EXPR_NAME, name)]
    if data:
        parts.append(nested(NFTA_EXPR_DATA, *attrs))
    return nested(NFTA_LIST_ELEM, *parts)


def payload_load(base: int, offset: int, size: int) -> bytes:
    return expr("payload", be32(1, REG_1), be32(2, base), be32(3, offset), be32(4, size))


def payload_write(base: int, offset: int, size: int, csum_offset: int) -> bytes:
    return expr(
        "payload", be32(5, REG_1), be32(2, base), be32(3, offset), be32(4, size),
        be32(6, CSUM_INET), be32(7, csum_offset),
    )  # fmt: skip


def cmp(op: int, value: bytes) -> bytes:
    return expr("cmp", be32(1, REG_1), be32(2, op), data_value(3, value))


def lookup(set_name: str, set_id: int | None, verdict_map: bool) -> bytes:
    parts = [be32(2, REG_1)]
    if verdict_map:
        parts.append(be32(3, REG_VERDICT))
    parts.append(text(1, set_name))
    if set_id is not None:
        parts.append(be32(4, set_id))
    return expr("lookup", *parts)


def immediate_verdict(code: str, chain: str | None = None) -> bytes:
    return expr("immediate", be32(1, REG_VERDICT), verdict(2, code, chain))


def immediate_value(value: bytes) -> bytes:
    return expr("immediate", be32(1, REG_1), data_value(2, value))


def meta_load(key: int) -> bytes:
    return expr("meta", be32(2, key), be32(1, REG_1))


# -- rules: text to expressions -------------------------------------------------------------------


@dataclass(frozen=True)
class AnonymousMap:
    """The `{ 0 : goto a, 1 : goto b }` of a `numgen ... vmap`: a constant map nft declares
    (`__map%d`, named by the kernel) and fills in the rule's batch, just before the rule."""

    set_id: int
    elements: tuple[tuple[int, str, str], ...]  # (key, verdict code, chain)


@dataclass
class RuleContext:
    """What a rule's expressions refer to in its batch: the ids of the sets declared in it
    (a lookup names them by id too, as nft does) and the ids for anonymous maps."""

    set_ids: dict[str, int] = field(default_factory=dict)
    next_id: int = 1

    def new_id(self) -> int:
        self.next_id += 1
        return self.next_id - 1


@dataclass(frozen=True)
class CompiledRule:
    expressions: bytes  # the NFTA_LIST_ELEMs of NFTA_RULE_EXPRESSIONS
    maps: tuple[AnonymousMap, ...] = ()


_FIELDS = {
    ("ip", "saddr"): (PAYLOAD_NETWORK, 12, 4, None),
    ("ip", "daddr"): (PAYLOAD_NETWORK, 16, 4, None),
    ("tcp", "sport"): (PAYLOAD_TRANSPORT, 0, 2, 16),
    ("tcp", "dport"): (PAYLOAD_TRANSPORT, 2, 2, 16),
    ("udp", "sport"): (PAYLOAD_TRANSPORT, 0, 2, 6),
    ("udp", "dport"): (PAYLOAD_TRANSPORT, 2, 2, 6),
}  # (base, offset, length, checksum offset of a rewrite)
_TOKEN = re.compile(r"[{},:]|[^\s{},:]+")


class _Rule:
    """One rule's tokens, compiled left to right as nft 1.0.6 does."""

    def __init__(self, rule: str, ctx: RuleContext) -> None:
        self.rule = rule
        self.tokens = _TOKEN.findall(rule)
        self.at = 0
        self.ctx = ctx
        self.out: list[bytes] = []
        self.maps: list[AnonymousMap] = []
        self.l4: str | None = None  # the protocol a `meta l4proto` match has fixed

    def refuse(self, why: str) -> ValueError:
        return ValueError(f"nftables rule {self.rule!r}: {why}; meshctl writes only its own forms")

    def peek(self) -> str | None:
        return self.tokens[self.at] if self.at < len(self.tokens) else None

    def take(self, *expected: str) -> str:
        token = self.peek()
        if token is None or (expected and token not in expected):
            raise self.refuse(f"expected {' or '.join(expected) or 'more'} at {token!r}")
        self.at += 1
        return token

    def compile(self) -> CompiledRule:
        while self.peek() is not None:
            self.statement()
        return CompiledRule(b"".join(self.out), tuple(self.maps))

    def statement(self) -> None:
        token = self.take()
        simple: dict[str, Callable[[], None]] = {
            "counter": lambda: self.out.append(expr("counter")),
            "masquerade": lambda: self.out.append(expr("masq")),
            "notrack": lambda: self.out.append(expr("notrack", data=False)),
            "dnat": lambda: self.nat(NAT_DNAT),
            "snat": lambda: self.nat(NAT_SNAT),
            "reject": self.reject,
            "ip": lambda: self.match(*self.payload_field("ip")),
            "tcp": lambda: self.match(*self.payload_field("tcp")),
            "udp": lambda: self.match(*self.payload_field("udp")),
            "ct": self.ct_status,
            "numgen": self.numgen,
        }
        if token in VERDICTS and token not in ("goto", "jump"):
            self.out.append(immediate_verdict(token))
        elif token in ("goto", "jump"):
            self.out.append(immediate_verdict(token, _name(self, self.take())))
        elif token in simple:
            simple[token]()
        else:
            raise self.refuse(f"unknown statement {token!r}")

    def payload_field(self, proto: str) -> tuple[tuple[int, int, int, int | None], str]:
        key = (proto, self.take())
        if key not in _FIELDS:
            raise self.refuse(f"unknown field {' '.join(key)!r}")
        if proto in PROTOCOLS and self.l4 != proto:
            self.out += [meta_load(META_L4PROTO), cmp(CMP_EQ, bytes([PROTOCOLS[proto]]))]
            self.l4 = proto
        return _FIELDS[key], proto

    def match(self, spec: tuple[int, int, int, int | None], proto: str) -> None:
        base, offset, size, csum = spec
        token = self.take()
        if token == "set" and csum is not None:  # a rewrite: `udp dport set 40001`
            self.out += [
                immediate_value(_value(self, proto, self.take())),
                payload_write(base, offset, size, csum),
            ]
            return
        self.out.append(payload_load(base, offset, size))
        if token == "vmap":
            self.set_lookup(self.take(), verdict_map=True)
        elif token.startswith("@"):
            self.set_lookup(token, verdict_map=False)
        else:
            self.out.append(cmp(CMP_EQ, _value(self, proto, token)))

    def set_lookup(self, token: str, verdict_map: bool) -> None:
        if not token.startswith("@"):
            raise self.refuse(f"expected @set at {token!r}")
        name = _name(self, token[1:])
        self.out.append(lookup(name, self.ctx.set_ids.get(name), verdict_map))

    def ct_status(self) -> None:
        self.take("status")
        bit = CT_STATUS_BITS.get(self.take())
        if bit is None:
            raise self.refuse(f"ct status other than {', '.join(CT_STATUS_BITS)}")
        zero = struct.pack("=I", 0)
        self.out += [
            expr("ct", be32(2, CT_STATUS), be32(1, REG_1)),
            expr(
                "bitwise", be32(1, REG_1), be32(2, REG_1), be32(3, 4),
                data_value(4, struct.pack("=I", bit)), data_value(5, zero),
            ),
            cmp(CMP_NEQ, zero),
        ]  # fmt: skip

    def numgen(self) -> None:
        mode = {"inc": NUMGEN_INC, "random": NUMGEN_RANDOM}.get(self.take())
        if mode is None:
            raise self.refuse("numgen other than inc or random")
        self.take("mod")
        modulus = _int(self, self.take())
        self.out.append(expr("numgen", be32(1, REG_1), be32(2, modulus), be32(3, mode), be32(4, 0)))
        self.take("vmap")
        self.take("{")
        elements = []
        while True:
            key = _int(self, self.take())
            self.take(":")
            code = self.take("goto", "jump")
            elements.append((key, code, _name(self, self.take())))
            if self.take(",", "}") == "}":
                break
        anonymous = AnonymousMap(self.ctx.new_id(), tuple(elements))
        self.maps.append(anonymous)
        self.out.append(lookup("__map%d", anonymous.set_id, verdict_map=True))

    def nat(self, kind: int) -> None:
        self.take("to")
        self.out += [immediate_value(_address(self, self.take())), _nat(kind)]

    def reject(self) -> None:
        self.take("with")
        how = self.take("tcp", "icmp")
        if how == "tcp":
            self.take("reset")
            if self.l4 != "tcp":
                self.out.insert(0, cmp(CMP_EQ, bytes([PROTOCOLS["tcp"]])))
                self.out.insert(0, meta_load(META_L4PROTO))
            self.out.append(expr("reject", be32(1, REJECT_TCP_RST), attr(2, b"\x00")))
            return
        code = ICMP_CODES.get(self.take())
        if code is None:
            raise self.refuse(f"icmp code other than {', '.join(ICMP_CODES)}")
        self.out.append(expr("reject", be32(1, REJECT_ICMP_UNREACH), attr(2, bytes([code]))))


@functools.cache
def _nat(kind: int) -> bytes:
    """The nat expression of `dnat to ADDR` (its address in register 1): the same every time."""
    return expr("nat", be32(1, kind), be32(2, NFPROTO_IPV4), be32(3, REG_1))


def _int(rule: _Rule, token: str) -> int:
    if not token.isdigit():
        raise rule.refuse(f"expected a number at {token!r}")
    return int(token)


def _name(rule: _Rule, token: str) -> str:
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_.-]{0,127}", token):
        raise rule.refuse(f"{token!r} is not a chain or set name")
    return token


def _address(rule: _Rule, token: str) -> bytes:
    try:
        return ipaddress.IPv4Address(token).packed
    except ValueError:
        raise rule.refuse(f"{token!r} is not an IPv4 address") from None


def _value(rule: _Rule, proto: str, token: str) -> bytes:
    """A match's or rewrite's operand: an address for `ip`, a port for tcp and udp."""
    if proto == "ip":
        return _address(rule, token)
    port = _int(rule, token)
    if port > 0xFFFF:
        raise rule.refuse(f"port {port} is out of range")
    return struct.pack(">H", port)


def compile_rule(rule: str, ctx: RuleContext) -> CompiledRule:
    """A rule's expressions as nft sends them, and the anonymous maps it declares first."""
    return _Rule(rule, ctx).compile()


def anonymous_map_element(element: tuple[int, str, str]) -> bytes:
    """The attributes of one element of an anonymous `numgen` verdict map: its host-order
    integer key and its verdict."""
    key, code, chain = element
    return data_value(1, struct.pack("=I", key)) + verdict(2, code, chain)
