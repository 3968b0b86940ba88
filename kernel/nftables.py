"""nftables for meshctl's own table (`ip meshctl`) in a namespace: written as nf_tables netlink
batches from this process (kernel.nftables_batch), read by `nft -j list table`.

Each `apply` is one batch, which the kernel commits atomically, as it does an `nft -f` run: a
transaction it refuses changes nothing, and the error names the object it refused. A change
starts no process and reads nothing back: nft 1.0.6 read every chain of the namespace into its
cache before each transaction, so a change cost more the more services there were. The rules,
their checks and their text are kernel.nftables_rules'; their messages kernel.nftables_messages'.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Protocol

from kernel import netns
from kernel.errors import KernelError
from kernel.gcpause import gc_paused
from kernel.nftables_batch import has_table, write_batch
from kernel.nftables_messages import change_messages, delete_table_message, get_table_message
from kernel.nftables_rules import (
    FAMILY,
    TABLE,
    WHERE,
    NftChange,
    NftTable,
    parse_table,
    validate,
)
from kernel.tool import Tool

NFT = "nft"
_LOCK = threading.Lock()  # meshctl's read-then-write transactions never interleave
_HINT = "check that nftables works here (`meshctl doctor`)"


class NftablesAPI(Protocol):
    """The nftables verbs meshctl uses; kernel.fake.nftables.FakeNftables implements it."""

    def available(self, ns: netns.Namespace) -> str | None: ...

    def list_table(self, ns: netns.Namespace) -> NftTable: ...

    def apply(self, ns: netns.Namespace, change: NftChange) -> None: ...

    def delete_table(self, ns: netns.Namespace) -> None: ...


NFT_TOOL = Tool(
    package="Debian's nftables package (apt-get install nftables)",
    denied=("Operation not permitted",),
    lines="nftables rules and elements",
)


def _run(
    ns: netns.Namespace, what: str, args: list[str], stdin: Iterable[str] | None = None
) -> str:
    """Run nft inside ns (kernel.tool) and return its stdout."""
    return NFT_TOOL.run(ns, what, [NFT, *args], stdin, _HINT)


def _list(ns: netns.Namespace) -> NftTable:
    what = f"reading the nftables table {WHERE}"
    try:
        listing = _run(ns, what, ["-j", "list", "table", FAMILY, TABLE])
    except KernelError as err:
        if "No such file or directory" in str(err):
            return NftTable()  # no table yet
        raise
    with gc_paused():
        return parse_table(listing)


def _has_table(ns: netns.Namespace) -> bool:
    return has_table(ns, get_table_message())


class Nftables:
    """NftablesAPI on the real kernel through nft."""

    def available(self, ns: netns.Namespace) -> str | None:
        """None if nft can check a transaction of meshctl's shape and list tables in ns."""
        probe = [
            f"add table {WHERE}",
            f"add map {WHERE} probe {{ type ipv4_addr : verdict; }}",
            f"add chain {WHERE} probe-nat "
            "{ type nat hook prerouting priority -100; policy accept; }",
            f"add rule {WHERE} probe-nat ip daddr vmap @probe",
            f"add rule {WHERE} probe-nat numgen inc mod 2 vmap {{ 0 : accept, 1 : accept }}",
        ]
        try:
            _run(ns, "checking an nftables transaction", ["-c", "-f", "-"], probe)
            _run(ns, "listing the nftables tables", ["-j", "list", "tables"])
        except KernelError as err:
            return f"nftables does not work: {err}"
        return None

    def list_table(self, ns: netns.Namespace) -> NftTable:
        """meshctl's table in ns (empty if there is none); no other table is read."""
        return _list(ns)

    def apply(self, ns: netns.Namespace, change: NftChange) -> None:
        """One transaction on meshctl's table in ns; a refused one changes nothing."""
        validate(change)
        if change.empty:
            return
        messages = list(change_messages(change))  # a rule meshctl cannot encode: nothing sent
        with _LOCK:
            write_batch(ns, messages, f"writing the nftables table {WHERE}")

    def delete_table(self, ns: netns.Namespace) -> None:
        """Delete meshctl's table in ns, if there is one; no other table is touched."""
        with _LOCK:
            if _has_table(ns):
                write_batch(ns, [delete_table_message()], f"deleting the nftables table {WHERE}")
