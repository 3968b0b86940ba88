"""kernel.nftables_messages against nft itself: every message meshctl sends for a transaction is
the one `nft -f` 1.0.6 sends for the transaction's text, byte for byte.

nft stays the reference, not the path: each test runs `nft --debug=mnl --check` on the text
(kernel.nftables_rules.transaction_lines) in a scratch namespace, reads the batch nft prints
(libmnl's dump: every byte of each message but the header flags beyond request/ack/echo, and
the sequence numbers), and compares it with kernel.nftables_messages' messages for the same
change. The differences allowed are two: nft declares the table and the chains that get rules
a second time, which meshctl's batch leaves out; nft names by id too the sets of its cache it
adds elements to, which the kernel finds by name, and meshctl keeps no cache.
"""

from __future__ import annotations

import re
import struct
import subprocess
import sys
from dataclasses import dataclass, field

import pytest

from kernel.errors import NotFound
from kernel.nftables import Nftables
from kernel.nftables_messages import (
    NEWCHAIN,
    NEWSET,
    NEWSETELEM,
    NEWTABLE,
    NFNL_MSG_BATCH_BEGIN,
    change_messages,
    delete_table_message,
)
from kernel.nftables_rules import (
    WHERE,
    Chain,
    NftChange,
    NftSet,
    NftTable,
    table_change,
    transaction_lines,
)
from tests.conformance.test_nftables import TABLE
from tests.conftest import NetnsFactory

pytestmark = pytest.mark.root

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_MNL_FLAGS = 0xF  # what libmnl's dump shows of nlmsg_flags: request, multi, ack, echo
NFTA_SET_ID = 10
NFTA_SET_ELEM_LIST_SET_ID = 4


def _normal(message: bytes) -> bytes:
    """A message with its sequence number and port id zeroed and only the flags libmnl shows."""
    out = bytearray(message)
    flags = struct.unpack_from("=H", out, 6)[0] & _MNL_FLAGS
    struct.pack_into("=HII", out, 6, flags, 0, 0)
    return bytes(out)


@dataclass
class _Dumped:
    length: int
    kind: int = 0
    flags: int = 0
    body: bytearray = field(default_factory=bytearray)


def _parse_mnl(dump: str) -> list[bytes]:
    """The messages of libmnl's dump (mnl_nlmsg_fprintf), rebuilt byte by byte."""
    messages: list[_Dumped] = []
    for raw in dump.splitlines():
        line = _ANSI.sub("", raw)
        cells = [cell.strip() for cell in line.split("|")]
        if "message length" in line:
            messages.append(_Dumped(int(cells[1])))
        elif "type | flags" in line:
            messages[-1].kind = int(cells[1])
            messages[-1].flags = sum(
                bit for c, bit in zip("RMAE", (1, 2, 4, 8), strict=True) if c in cells[2]
            )
        elif "extra header" in line or "|      data      |" in line:
            messages[-1].body += bytes.fromhex(cells[1])
        elif "|len |flags| type|" in line:
            kind = int(cells[3]) | (0x8000 if "N" in cells[2] else 0)
            kind |= 0x4000 if "B" in cells[2] else 0
            messages[-1].body += struct.pack("=HH", int(cells[1]), kind)
    out = []
    for m in messages:
        data = struct.pack("=IHHII", m.length, m.kind, m.flags, 0, 0) + bytes(m.body)
        assert len(data) == m.length, "a message of libmnl's dump did not rebuild whole"
        out.append(data)
    return out


def nft_batch(ns: str, lines: list[str]) -> list[bytes]:
    """The messages of the batch `nft --check` sends for lines in ns (begin left out)."""
    done = subprocess.run(
        ["ip", "netns", "exec", ns, "nft", "--debug=mnl", "--check", "-f", "-"],
        input="\n".join(lines) + "\n", capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    messages = _parse_mnl(done.stdout + done.stderr)
    kinds = [struct.unpack_from("=H", m, 4)[0] for m in messages]
    return [_normal(m) for m in messages[kinds.index(NFNL_MSG_BATCH_BEGIN) + 1 :]]


def without_second_declarations(messages: list[bytes]) -> list[bytes]:
    """nft's batch without the table and chains its second `table { chain { rules } }` block
    declares again."""
    kinds = [struct.unpack_from("=H", m, 4)[0] & 0xFF for m in messages]
    tables = [i for i, kind in enumerate(kinds) if kind == NEWTABLE]
    if len(tables) < 2:
        return messages
    end = tables[1] + 1
    while end < len(kinds) and kinds[end] == NEWCHAIN:
        end += 1
    return messages[: tables[1]] + messages[end:]


def _attrs(message: bytes) -> list[tuple[int, bytes]]:
    """A message's top-level attributes: (type, the attribute's bytes with padding)."""
    out, at = [], 20
    while at < len(message):
        size, kind = struct.unpack_from("=HH", message, at)
        out.append((kind, message[at : at + ((size + 3) & ~3)]))
        at += (size + 3) & ~3
    return out


def _kind(message: bytes) -> int:
    return int(struct.unpack_from("=H", message, 4)[0]) & 0xFF


def without_cache_ids(theirs: bytes, mine: bytes) -> bytes:
    """nft's element message without the set id it gives a set of its cache (the kernel finds
    that set by name), where meshctl's, which keeps no cache, has none."""
    if _kind(theirs) != NEWSETELEM or _kind(mine) != NEWSETELEM:
        return theirs
    if any(kind == NFTA_SET_ELEM_LIST_SET_ID for kind, _ in _attrs(mine)):
        return theirs
    kept = b"".join(a for kind, a in _attrs(theirs) if kind != NFTA_SET_ELEM_LIST_SET_ID)
    return struct.pack("=I", 20 + len(kept)) + theirs[4:20] + kept


def first_set_id(messages: list[bytes]) -> int:
    """The NFTA_SET_ID of the first set a batch declares (nft numbers the sets of its batch on
    from those of its cache), 1 if it declares none."""
    for message in messages:
        if _kind(message) == NEWSET:
            for kind, value in _attrs(message):
                if kind == NFTA_SET_ID:
                    return int(struct.unpack_from(">I", value, 4)[0])
    return 1


def same_as_nft(ns: str, change: NftChange) -> None:
    theirs = without_second_declarations(nft_batch(ns, list(transaction_lines(change))))
    mine = [_normal(m.encode(0)) for m in change_messages(change, first_set_id(theirs))]
    assert len(mine) == len(theirs)
    for index, (a, b) in enumerate(zip(mine, theirs, strict=True)):
        b = without_cache_ids(b, a)
        assert a.hex(" ", 4) == b.hex(" ", 4), f"message {index} differs from nft's"


def test_every_form_meshctl_writes_is_the_batch_nft_sends(netns_factory: NetnsFactory) -> None:
    """Base chains, chains, rules of each form (vmap lookups, numgen verdict maps, DNAT,
    masquerade, rejects, stateless port rewrites), a map, a set and their elements."""
    same_as_nft(netns_factory("nftnl"), table_change(TABLE, NftTable()))


def test_flushes_and_deletions_are_the_batch_nft_sends(netns_factory: NetnsFactory) -> None:
    ns = netns_factory("nftnl")
    held = NftTable(
        chains={**TABLE.chains, "gone": Chain(("goto endpoint-b1",))},
        sets={**TABLE.sets, "gone-set": NftSet("type ipv4_addr", False, {"10.0.2.1": ""})},
    )
    Nftables().apply(ns, table_change(held, NftTable()))
    chains = dict(TABLE.chains)
    chains["service-b"] = Chain(("numgen inc mod 2 vmap { 0 : goto endpoint-b1, 1 : goto a }",))
    chains["a"] = Chain(("dnat to 10.0.0.14",))
    services = {"10.0.1.101": "goto service-b", "10.0.1.103": "goto a"}
    desired = NftTable(chains, {**TABLE.sets, "services": NftSet("", True, services)})

    change = table_change(desired, held)

    assert change.delete_elements and change.delete and change.delete_sets
    same_as_nft(ns, change)


def test_concatenated_keys_are_the_batch_nft_sends(netns_factory: NetnsFactory) -> None:
    key = "type ipv4_addr . inet_proto . inet_service"
    desired = NftTable(
        chains={"a": Chain(("accept",)), "b": Chain(("counter", "goto a"))},
        sets={
            "ports": NftSet(f"{key} : verdict", True, {"10.9.0.1 . tcp . 80": "goto a",
                                                      "10.9.0.2 . udp . 53": "goto b"}),
            "seen": NftSet(key, False, {"10.9.0.1 . tcp . 80": ""}),
        },
    )  # fmt: skip
    same_as_nft(netns_factory("nftnl"), table_change(desired, NftTable()))


def test_deleting_the_table_is_the_message_nft_sends(netns_factory: NetnsFactory) -> None:
    ns = netns_factory("nftnl")
    Nftables().apply(ns, table_change(TABLE, NftTable()))
    assert nft_batch(ns, [f"delete table {WHERE}"]) == [_normal(delete_table_message().encode(0))]


def test_a_refusal_names_the_object_the_kernel_refused(netns_factory: NetnsFactory) -> None:
    ns = netns_factory("nftnl")
    nft = Nftables()
    nft.apply(ns, table_change(TABLE, NftTable()))
    # The refused message is not the last one, the only one that asks for an ack.
    broken = NftChange(replace={"b": Chain(("goto nowhere",)), "a": Chain(("accept",))})

    with pytest.raises(NotFound, match="refused to add rule `goto nowhere` to chain b"):
        nft.apply(ns, broken)

    assert table_change(TABLE, nft.list_table(ns)).empty


def test_a_change_starts_no_process(netns_factory: NetnsFactory) -> None:
    """Writes are netlink batches from this process: no `nft` (nor any other tool) per change."""
    ns = netns_factory("nftnl")
    nft = Nftables()
    started: list[str] = []
    counting = [True]

    def count(event: str, args: tuple[object, ...]) -> None:
        if counting[0] and event in ("subprocess.Popen", "os.posix_spawn", "os.fork", "os.exec"):
            started.append(event)

    sys.addaudithook(count)  # stays for the session; counts only while this test runs
    try:
        nft.apply(ns, table_change(TABLE, NftTable()))
        chains = {**TABLE.chains, "endpoint-b2": Chain(("dnat to 10.0.0.14",))}
        chains["service-b"] = Chain(
            ("numgen inc mod 2 vmap { 0 : goto endpoint-b1, 1 : goto endpoint-b2 }",)
        )
        desired = NftTable(chains, TABLE.sets)
        nft.apply(ns, table_change(desired, TABLE))
        nft.apply(ns, table_change(TABLE, desired))
        nft.delete_table(ns)
    finally:
        counting[0] = False
    assert started == []


def test_thousands_of_elements_split_where_nft_splits_them(netns_factory: NetnsFactory) -> None:
    """A netlink attribute holds 64 KiB: the elements of a full sync take several messages."""
    services = {f"10.{i >> 8}.{i & 0xFF}.1": "goto a" for i in range(5000)}
    desired = NftTable(
        chains={"a": Chain(("accept",))},
        sets={
            "services": NftSet("type ipv4_addr : verdict", True, services),
            "no-endpoints": NftSet("type ipv4_addr", False, dict.fromkeys(services, "")),
        },
    )
    change = table_change(desired, NftTable())
    kinds = [m.kind for m in change_messages(change)]
    assert kinds.count(NEWSETELEM) > 2
    same_as_nft(netns_factory("nftnl"), change)
