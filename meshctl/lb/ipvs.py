"""The ipvs backend: one IPVS fwmark service per VIP (every port), round robin, masquerading to
backend:same-port, where the kernel has IPVS.

mangle marks each VIP's new connections with the VIP's fwmark (through its /24's MESH-MARKS-*
chain), which IPVS balances on; nat SNATs marked traffic to the LB address. Draining backends
stay as weight-0 destinations so their connections carry on.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from kernel.iptables_rules import Match, OwnedTable, Rule, opts
from kernel.ipvs import Destination, IpvsChange, VirtualService
from kernel.netns import Namespace
from kernel.system import Kernel
from meshctl.lb.netfilter import (
    TablesChange,
    apply_tables,
    by_block,
    clear_tables,
    observe_tables,
    snat_and_refuse,
    tables_change,
)
from meshctl.lb.spec import LbSpec, VirtualIp, as_int
from meshctl.sysctls import IPVS, Setting, lb_sysctls

# meshctl's fwmark range: 'M' in the top byte, the VIP's offset in its subnet below.
FWMARK_BASE = 0x4D000000
FWMARK_MASK = 0xFF000000

MARK_CHAIN = "MESH-MARK"
MARK_BLOCK_PREFIX = "MESH-MARKS-"

Ipvs = Mapping[VirtualService, tuple[Destination, ...]]


def fwmark(spec: LbSpec, vip: VirtualIp) -> int:
    """The VIP's mark: stable, unique within the network, inside meshctl's fwmark range."""
    return FWMARK_BASE | (as_int(vip.vip) - int(spec.subnet.network_address))


def _mark_table(spec: LbSpec) -> OwnedTable:
    """mangle: each VIP's connections get the VIP's fwmark.

    MESH-MARK's blocks hold one rule per VIP and mangle sees every packet, but only a
    connection's first packet needs the mark: IPVS schedules on it once, then finds the
    connection by its addresses, and nat reads it once, for the SNAT. So only new connections
    walk it (at 10,000 VIPs, every packet walking it cost 5/6 of a VIP's requests/s).
    """

    def mark(chain: str, vip: VirtualIp) -> Rule:
        set_mark = opts(set_mark=f"{fwmark(spec, vip):#x}")
        return Rule(chain, "MARK", vip.comment, destination=vip.vip, target_args=set_mark)

    new_only = (Match("conntrack", opts(ctstate="NEW")),)
    return OwnedTable(
        chains=by_block(spec, MARK_CHAIN, MARK_BLOCK_PREFIX, spec.vips, mark),
        jumps=(Rule("PREROUTING", MARK_CHAIN, spec.comment, matches=new_only),),
    )


def ipvs_tables(spec: LbSpec) -> dict[str, OwnedTable]:
    """The backend's iptables tables, all shared by the VIPs: mangle's marks, nat's SNAT of
    marked traffic, filter's refusals."""
    balanced = Match("mark", opts(mark=f"{FWMARK_BASE:#x}/{FWMARK_MASK:#x}"))
    nat, refusals = snat_and_refuse(spec, balanced)
    return {"mangle": _mark_table(spec), "nat": nat, "filter": refusals}


def ipvs_state(spec: LbSpec) -> dict[VirtualService, tuple[Destination, ...]]:
    """One fwmark service per VIP, round robin, masquerading; draining backends at weight 0."""
    return {
        VirtualService(fwmark=fwmark(spec, vip), scheduler="rr"): tuple(
            Destination(b.address, 0, weight=b.weight, forward="masq") for b in vip.backends
        )
        for vip in spec.vips
    }


def is_owned_service(svc: VirtualService) -> bool:
    """An IPVS service in meshctl's fwmark range (the only ones it may change or delete)."""
    return svc.fwmark is not None and svc.fwmark & FWMARK_MASK == FWMARK_BASE


def ipvs_change(desired: Ipvs, observed: Ipvs) -> IpvsChange:
    """IPVS services to ensure, destinations to ensure and delete, services to delete,
    compared by the kernel's keys."""
    have = {svc.key: (svc, dests) for svc, dests in observed.items()}
    ensure_services: list[VirtualService] = []
    ensure_dests: list[tuple[VirtualService, Destination]] = []
    delete_dests: list[tuple[VirtualService, Destination]] = []
    for svc, dests in desired.items():
        old_svc, old_dests = have.get(svc.key, (None, ()))
        if old_svc != svc:
            ensure_services.append(svc)
        old = {d.key: d for d in old_dests}
        ensure_dests += [(svc, d) for d in dests if old.get(d.key) != d]
        wanted = {d.key for d in dests}
        delete_dests += [(svc, d) for d in old_dests if d.key not in wanted]
    wanted_keys = {svc.key for svc in desired}
    delete_services = tuple(svc for svc in observed if svc.key not in wanted_keys)
    return IpvsChange(
        tuple(ensure_services), tuple(ensure_dests), tuple(delete_dests), delete_services
    )


@dataclass(frozen=True)
class IpvsObjects:
    """What the backend holds in an LB namespace: its iptables tables and IPVS services."""

    tables: Mapping[str, OwnedTable] = field(default_factory=dict)
    ipvs: Ipvs = field(default_factory=dict)  # meshctl's fwmark services only


@dataclass(frozen=True)
class IpvsObjectsChange:
    tables: TablesChange = TablesChange()
    ipvs: IpvsChange = IpvsChange()

    @property
    def empty(self) -> bool:
        return self.tables.empty and self.ipvs == IpvsChange()

    def lines(self, where: str) -> Iterator[str]:
        yield from self.tables.lines(where)
        for svc in self.ipvs.ensure_services:
            yield f"~ {where}: ipvs service fwmark {svc.fwmark} {svc.scheduler}"
        for svc, dest in self.ipvs.ensure_destinations:
            yield f"~ {where}: ipvs fwmark {svc.fwmark} -> {dest.address} weight {dest.weight}"
        for svc, dest in self.ipvs.delete_destinations:
            yield f"- {where}: ipvs fwmark {svc.fwmark} -> {dest.address}"
        for svc in self.ipvs.delete_services:
            yield f"- {where}: ipvs service fwmark {svc.fwmark}"


@dataclass(frozen=True)
class IpvsBackend:
    name: str = "ipvs"
    needs: tuple[str, ...] = ("ipvs",)
    settings: tuple[Setting, ...] = IPVS
    # IPVS destinations need the LB address's subnet route: the leg and addresses come first.
    parallel: bool = False

    def sysctls(self) -> dict[str, str]:
        return lb_sysctls(self.settings)

    def available(self, kernel: Kernel, ns: Namespace = None) -> str | None:
        return kernel.ipvs.available(ns)

    def render(self, services: LbSpec, shared: LbSpec | None) -> IpvsObjects:
        tables = ipvs_tables(shared) if shared is not None else {}
        return IpvsObjects(
            {t: tables.get(t, OwnedTable()) for t in ("mangle", "nat", "filter")},
            ipvs_state(services),
        )

    def observe(self, kernel: Kernel, ns: str) -> IpvsObjects:
        snapshot = kernel.ipvs.snapshot(ns)
        owned = {s: tuple(d) for s, d in snapshot.items() if is_owned_service(s)}
        return IpvsObjects(observe_tables(kernel, ns), owned)

    def change(self, desired: IpvsObjects, held: IpvsObjects) -> IpvsObjectsChange:
        return IpvsObjectsChange(
            tables_change(desired.tables, held.tables), ipvs_change(desired.ipvs, held.ipvs)
        )

    def apply(self, kernel: Kernel, ns: str, change: IpvsObjectsChange) -> None:
        apply_tables(kernel, ns, change.tables)
        if change.ipvs != IpvsChange():
            kernel.ipvs.apply(ns, change.ipvs)

    def clear(self, kernel: Kernel, ns: str) -> None:
        if kernel.ipvs.available(ns) is None:
            owned = tuple(s for s in kernel.ipvs.list_services(ns) if is_owned_service(s))
            kernel.ipvs.apply(ns, IpvsChange(delete_services=owned))
        clear_tables(kernel, ns)
