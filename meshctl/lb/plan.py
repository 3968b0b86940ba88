"""What to change in the load-balancer namespaces of one node: pure diffs, no kernel access.

`diff` compares an LB namespace's spec with what `LbReconciler.observe` read from it. The change
tracker, `vip_change`, compares the spec last applied with the desired one and builds the change
from the VIPs that differ alone, without reading the kernel: one service's change costs that
service's rules, whatever the number of services (kube-proxy's partial sync). The periodic full
resync observes everything and repairs whatever drifted meanwhile.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from kernel.conntrack import UdpFlow
from kernel.iptables_rules import OwnedTable, Rule, TableChange
from kernel.ipvs import Destination, IpvsChange, VirtualService
from kernel.links import Link
from meshctl.controller.tables import table_change
from meshctl.lb.spec import (
    BackendKind,
    LbSpec,
    VirtualIp,
    addresses,
    iptables_tables,
    ipvs_state,
    service_chains,
    shared_tables,
)
from meshctl.sysctls import lb_sysctls

Ipvs = Mapping[VirtualService, tuple[Destination, ...]]


@dataclass(frozen=True)
class LbObserved:
    """What one LB namespace holds, in the shapes the spec builders produce."""

    netns: str
    exists: bool = False
    node_end: Link | None = None  # the veth end on the node, enslaved to the bridge
    bridge: Link | None = None  # the network's bridge on the node
    inside: Link | None = None  # eth0 in the LB namespace
    addresses: frozenset[str] = frozenset()
    sysctls: Mapping[str, str | None] = field(default_factory=dict)  # None: key missing
    tables: Mapping[str, OwnedTable] = field(default_factory=dict)
    ipvs: Ipvs = field(default_factory=dict)  # meshctl's fwmark services only
    udp_flows: frozenset[UdpFlow] = frozenset()


@dataclass(frozen=True)
class NsChange:
    """The change that brings one LB namespace to its spec, in the order `apply` makes it."""

    spec: LbSpec
    create_netns: bool = False
    ensure_leg: bool = False
    sysctls: Mapping[str, str] = field(default_factory=dict)
    add_addresses: tuple[str, ...] = ()
    tables: Mapping[str, TableChange] = field(default_factory=dict)
    ipvs: IpvsChange = IpvsChange()
    delete_addresses: tuple[str, ...] = ()
    stale_udp: tuple[UdpFlow, ...] = ()  # flows pinned to backends that are gone
    # The leg's node end or the bridge held by a link without the network's mark, with its
    # alias: nothing else is planned for the namespace, and apply only reports it.
    clashes: tuple[tuple[str, str | None], ...] = ()

    @property
    def empty(self) -> bool:
        return not any(
            (
                self.clashes,
                self.create_netns,
                self.ensure_leg,
                self.sysctls,
                self.add_addresses,
                self.tables,
                self.ipvs != IpvsChange(),
                self.delete_addresses,
                self.stale_udp,
            )
        )


@dataclass(frozen=True)
class LbPlan:
    """Changes to the desired LB namespaces, the node's LB namespaces to delete, and those with
    this node's LB name whose leg lacks meshctl's mark (not known to be meshctl's: kept)."""

    changes: tuple[NsChange, ...] = ()
    delete_netns: tuple[str, ...] = ()
    unmarked_netns: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.changes and not self.delete_netns and not self.unmarked_netns


def clashes(spec: LbSpec, observed: LbObserved) -> tuple[tuple[str, str | None], ...]:
    """The leg's node end or the bridge, present without the network's mark: another's link
    that the leg must not replace or be put on."""
    return tuple(
        (link.name, link.alias)
        for link in (observed.node_end, observed.bridge)
        if link is not None and link.alias != spec.mark
    )


def _leg_ok(spec: LbSpec, observed: LbObserved) -> bool:
    end, inside = observed.node_end, observed.inside
    return (
        end is not None
        and end.kind == "veth"
        and end.alias == spec.mark
        and end.master == spec.bridge
        and end.up
        and end.mtu == spec.mtu
        and inside is not None
        and inside.kind == "veth"
        and inside.up
        and inside.mtu == spec.mtu
        and inside.mac == spec.mac
    )


def _ipvs_change(desired: Ipvs, observed: Ipvs) -> IpvsChange:
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


def _stale_udp(spec: LbSpec, flows: frozenset[UdpFlow]) -> tuple[UdpFlow, ...]:
    """Balanced UDP flows whose backend is no longer one of its VIP's (draining ones stay)."""
    backends = {v.vip: {b.address for b in v.backends} for v in spec.vips}
    return tuple(
        sorted(
            (f for f in flows if f.vip != f.backend and f.backend not in backends.get(f.vip, ())),
            key=lambda f: (f.vip, f.backend),
        )
    )


def _table_changes(
    desired: Mapping[str, OwnedTable], held: Mapping[str, OwnedTable]
) -> dict[str, TableChange]:
    """One batched change per table that differs."""
    changes = {}
    for table, rules in desired.items():
        change = table_change(rules, held.get(table, OwnedTable()))
        if change is not None:
            changes[table] = change
    return changes


def _objects_change(
    spec: LbSpec, held: LbObserved, backend: BackendKind, tables: Mapping[str, TableChange]
) -> NsChange:
    """The addresses, IPVS entries and UDP flows to change so that `held` becomes spec's, with
    the given table changes.

    Only those fields of `held` are read: the namespace, its leg and sysctls are `diff`'s part.
    """
    want_addresses = addresses(spec)
    return NsChange(
        spec=spec,
        add_addresses=tuple(sorted(want_addresses - held.addresses)),
        tables=tables,
        ipvs=_ipvs_change(ipvs_state(spec) if backend == "ipvs" else {}, held.ipvs),
        delete_addresses=tuple(sorted(held.addresses - want_addresses)),
        stale_udp=_stale_udp(spec, held.udp_flows),
    )


def diff(spec: LbSpec, observed: LbObserved, backend: BackendKind) -> NsChange:
    """The smallest change from observed to spec for one LB namespace (empty when converged);
    only the clashes if its leg's name or its bridge is another's link."""
    taken = clashes(spec, observed)
    if taken:
        return NsChange(spec=spec, clashes=taken)
    want_sysctls = lb_sysctls(backend)
    tables = _table_changes(iptables_tables(spec, backend), observed.tables)
    return replace(
        _objects_change(spec, observed, backend, tables),
        create_netns=not observed.exists,
        ensure_leg=not _leg_ok(spec, observed),
        sysctls={k: v for k, v in want_sysctls.items() if observed.sysctls.get(k) != v},
    )


def held_by(spec: LbSpec, backend: BackendKind) -> LbObserved:
    """What an LB namespace holds once spec has been applied to it: its addresses, tables and
    IPVS entries, and a UDP flow to every backend (the flows that may exist)."""
    return LbObserved(
        netns=spec.netns,
        exists=True,
        addresses=addresses(spec),
        sysctls=lb_sysctls(backend),
        tables=iptables_tables(spec, backend),
        ipvs=ipvs_state(spec) if backend == "ipvs" else {},
        udp_flows=frozenset(UdpFlow(v.vip, b.address) for v in spec.vips for b in v.backends),
    )


def _frame(spec: LbSpec) -> tuple[str, ...]:
    """What places an LB namespace: a change here needs a full observe, not a VIP change."""
    return (spec.netns, spec.network_id, spec.bridge, spec.node_end, spec.lb_address_cidr)


def _shared_part(vip: VirtualIp) -> tuple[str, str, bool]:
    """What a VIP contributes to the shared chains (its mark, service jump, refusal)."""
    return (vip.vip, vip.service_id, bool(vip.active))


def vip_change(applied: LbSpec, desired: LbSpec, backend: BackendKind) -> NsChange | None:
    """The change from the kernel state `applied` left to `desired`'s, built from the VIPs that
    differ alone; None when the namespace itself changed (observe it instead).

    A VIP whose backends changed is compared as two one-VIP specs, so the cost follows that
    service's size. The shared chains are rebuilt from all of `desired` only when the set of
    VIPs or their being active changed.
    """
    if _frame(applied) != _frame(desired):
        return None
    applied_at = {v.vip: v for v in applied.vips}
    desired_at = {v.vip: v for v in desired.vips}
    gone = tuple(v for v in applied.vips if desired_at.get(v.vip) != v)
    came = tuple(v for v in desired.vips if applied_at.get(v.vip) != v)
    if not gone and not came:
        return NsChange(spec=desired)
    gone_spec, new = replace(applied, vips=gone), replace(desired, vips=came)
    old = held_by(gone_spec, backend)
    # The changed VIPs' own chains; the chains the VIPs share (MESH-SERVICES and its blocks,
    # marks, refusals) before and after, only if they changed: the diff then rewrites those
    # that differ and deletes emptied blocks.
    shared_changed = sorted(map(_shared_part, gone)) != sorted(map(_shared_part, came))
    after = shared_tables(desired, backend) if shared_changed else {}
    before = shared_tables(applied, backend) if shared_changed else {}
    balanced = backend == "iptables"  # only its nat table holds chains of single services
    want, had = {}, {}
    for table in old.tables:
        own_new = service_chains(new) if balanced and table == "nat" else {}
        own_old = service_chains(gone_spec) if balanced and table == "nat" else {}
        want[table] = OwnedTable(chains={**own_new, **_chains(after, table)})
        had[table] = OwnedTable(chains={**own_old, **_chains(before, table)})
    change = _objects_change(new, old, backend, _table_changes(want, had))
    return replace(change, spec=desired)


def _chains(tables: Mapping[str, OwnedTable], table: str) -> dict[str, tuple[Rule, ...]]:
    return dict(tables[table].chains) if table in tables else {}
