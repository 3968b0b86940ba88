"""kernel.nftables_messages and kernel.nftables_batch without a kernel: what a rule compiles to
is checked byte for byte against nft in tests/conformance/test_nftables_netlink.py; here, that a
rule meshctl does not write is refused before anything is sent, and how a batch is framed."""

from __future__ import annotations

import struct

import pytest

from kernel.nftables_batch import frame
from kernel.nftables_messages import (
    NEWRULE,
    NEWSET,
    NEWSETELEM,
    NFNL_MSG_BATCH_BEGIN,
    NFNL_MSG_BATCH_END,
    NLM_F_ACK,
    change_messages,
)
from kernel.nftables_rules import Chain, NftChange, NftSet


@pytest.mark.parametrize(
    "rule",
    [
        "meta mark set 7",  # a statement meshctl never writes
        "ip daddr 10.0.0.1/24 accept",  # a prefix
        "dnat to 10.0.0.1:80",  # a port in the DNAT
        "numgen inc mod 2 vmap { 0 : accept }",  # a numgen map to anything but chains
        "goto 1chain",  # not a chain name
        "tcp dport 70000 accept",  # out of range
    ],
)
def test_a_rule_meshctl_does_not_write_is_refused_before_sending(rule: str) -> None:
    with pytest.raises(ValueError, match="nftables rule"):
        list(change_messages(NftChange(replace={"a": Chain((rule,))})))


@pytest.mark.parametrize(
    "declare", ["type ipv6_addr", "type ipv4_addr : ipv4_addr", "typeof ip daddr"]
)
def test_a_set_type_meshctl_does_not_write_is_refused(declare: str) -> None:
    with pytest.raises(ValueError, match="nftables set s"):
        list(change_messages(NftChange(add_sets={"s": NftSet(declare, ":" in declare)})))


def _headers(data: bytes) -> list[tuple[int, int, int]]:
    """(type, flags, seq) of each message of a buffer."""
    out, at = [], 0
    while at < len(data):
        length, kind, flags, seq = struct.unpack_from("=IHHI", data, at)
        out.append((kind, flags, seq))
        at += length
    return out


def test_a_batch_is_framed_and_only_its_last_message_asks_for_an_ack() -> None:
    sets = {"m": NftSet("type ipv4_addr : verdict", True)}
    change = NftChange(add_sets=sets, replace={"a": Chain(("ip daddr vmap @m",))})
    messages = list(change_messages(change))

    data, begin = frame(messages)

    headers = _headers(data)
    assert [kind for kind, _, _ in headers][0] == NFNL_MSG_BATCH_BEGIN
    assert headers[-1][0] == NFNL_MSG_BATCH_END
    assert [seq for _, _, seq in headers] == list(range(begin, begin + len(messages) + 2))
    acks = [kind & 0xFF for kind, flags, _ in headers if flags & NLM_F_ACK]
    assert acks == [NEWRULE]  # the last message: its ack says every answer is in
    assert [m.kind for m in messages].count(NEWSET) == 1
    assert messages[-1].what == "add rule `ip daddr vmap @m` to chain a"


def test_ten_thousand_elements_take_several_messages_none_over_an_attributes_size() -> None:
    services = {f"10.{i >> 8 & 0xFF}.{i & 0xFF}.{i >> 16 + 1}": "goto a" for i in range(10_000)}
    change = NftChange(add_elements={"services": services})

    messages = [m for m in change_messages(change) if m.kind == NEWSETELEM]

    assert len(messages) > 1
    for message in messages:  # the table, the set's name, then the element list
        at = 0
        while at < len(message.attrs):
            size, kind = struct.unpack_from("=HH", message.attrs, at)
            at += (size + 3) & ~3
        assert at == len(message.attrs), "an attribute's length overflowed its 16 bits"
    assert sum(int(m.what.split()[1]) for m in messages) == len(services)  # "add N elements"
