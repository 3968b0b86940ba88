"""The iptables side of the ipvs and iptables backends: the rules both write in an LB namespace
(source NAT of balanced traffic, refusal of VIPs without a backend, per-/24 dispatch), and their
tables as one backend change.

Both SNAT VIP traffic to the LB address (client and backend share the bridge) and refuse a new
connection to a VIP with no active backend at once (IPVS would drop it silently and leave the
client hanging).
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from kernel.iptables_rules import (
    Match,
    OwnedTable,
    Rule,
    TableChange,
    opts,
    table_change,
    table_lines,
)
from kernel.system import Kernel
from meshctl.lb.spec import LbSpec, VirtualIp, as_int

TABLES = ("mangle", "nat", "filter")  # mangle first: nat's SNAT matches the mark set there
Tables = Mapping[str, OwnedTable]

REFUSE_CHAIN = "MESH-REFUSE"
POSTROUTING_CHAIN = "MESH-POSTROUTING"
BLOCK_PREFIXLEN = 24


@functools.lru_cache(maxsize=256)
def take_turns(left: int) -> tuple[Match, ...]:
    """The match of a service chain's rule with `left` backends from it to the last: it takes
    every left-th of the new connections the earlier rules left (the last takes the rest), so
    the backends take turns, as IPVS's round robin does (a random pick, kube-proxy's, spreads
    as evenly only on average)."""
    return (Match("statistic", opts(mode="nth", every=str(left), packet="0")),) if left > 1 else ()


def by_block(
    spec: LbSpec,
    top: str,
    block_prefix: str,
    vips: Iterable[VirtualIp],
    rule: Callable[[str, VirtualIp], Rule],
) -> dict[str, tuple[Rule, ...]]:
    """`top` with one rule per /24 of the VIPs, jumping to that block's chain, which holds
    rule(block chain, vip) for each of its VIPs (vips in address order).

    A connection's first packet walks the blocks and then one block's VIPs, not every VIP: one
    rule per VIP in `top` (kube-proxy's iptables mode) made a connect through the 10,000th VIP
    4x slower than a direct one.
    """
    blocks: dict[str, list[Rule]] = {}
    jumps: list[Rule] = []
    for vip in vips:
        network = as_int(vip.vip) >> (32 - BLOCK_PREFIXLEN) << (32 - BLOCK_PREFIXLEN)
        chain = f"{block_prefix}{network:08X}"
        if chain not in blocks:
            blocks[chain] = []
            block = f"{ipaddress.IPv4Address(network)}/{BLOCK_PREFIXLEN}"
            jumps.append(Rule(top, chain, spec.comment, destination=block))
        blocks[chain].append(rule(chain, vip))
    return {top: tuple(jumps), **{chain: tuple(rules) for chain, rules in blocks.items()}}


def snat_and_refuse(spec: LbSpec, balanced: Match) -> tuple[OwnedTable, OwnedTable]:
    """nat's MESH-POSTROUTING (SNAT of what `balanced` matches to the LB address) with its jump,
    and filter's MESH-REFUSE (a TCP reset or port unreachable for VIPs with no active backend)."""
    snat = Rule(
        POSTROUTING_CHAIN,
        "SNAT",
        spec.comment,
        matches=(balanced,),
        target_args=opts(to_source=spec.lb_address),
    )
    refuse = tuple(
        rule
        for vip in spec.vips
        if not vip.active
        for rule in (
            Rule(REFUSE_CHAIN, "REJECT", vip.comment, destination=vip.vip, protocol="tcp",
                 target_args=opts(reject_with="tcp-reset")),
            Rule(REFUSE_CHAIN, "REJECT", vip.comment, destination=vip.vip),
        )
    )  # fmt: skip
    nat = OwnedTable(
        chains={POSTROUTING_CHAIN: (snat,)},
        jumps=(Rule("POSTROUTING", POSTROUTING_CHAIN, spec.comment),),
    )
    refusals = OwnedTable(
        chains={REFUSE_CHAIN: refuse}, jumps=(Rule("INPUT", REFUSE_CHAIN, spec.comment),)
    )
    return nat, refusals


@dataclass(frozen=True)
class TablesChange:
    """One batched change per iptables table that differs."""

    tables: Mapping[str, TableChange] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not self.tables

    def lines(self, where: str) -> Iterator[str]:
        for table, change in self.tables.items():
            yield from table_lines(where, table, change)


def tables_change(desired: Tables, held: Tables) -> TablesChange:
    """The tables of desired that differ from held's, each as one batch."""
    changes = {}
    for table in TABLES:
        if table in desired:
            change = table_change(desired[table], held.get(table, OwnedTable()))
            if not change.empty:
                changes[table] = change
    return TablesChange(changes)


def observe_tables(kernel: Kernel, ns: str) -> dict[str, OwnedTable]:
    return {table: kernel.iptables.list_owned(ns, table) for table in TABLES}


def apply_tables(kernel: Kernel, ns: str, change: TablesChange) -> None:
    if change.tables:
        kernel.iptables.apply_tables(ns, change.tables)


def clear_tables(kernel: Kernel, ns: str) -> None:
    for table in TABLES:
        kernel.iptables.flush_owned(ns, table)
