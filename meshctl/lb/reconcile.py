"""Reconcile the load-balancer namespaces of one node: observe, diff (pure), apply.

Per network an `LbSpec` says what its LB namespace should hold; `observe` reads what it holds
(leg, addresses, sysctls, owned iptables tables, IPVS services in meshctl's fwmark range, UDP
flows), `diff` computes the smallest change, `apply` makes it. `sync` does it for every network
of the node and deletes the node's LB namespaces that are no longer desired, and nothing else.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from kernel.conntrack import UdpFlow
from kernel.errors import NotFound, Unsupported
from kernel.features import pick_lb_backend
from kernel.iptables import OwnedTable, TableChange
from kernel.ipvs import Destination, VirtualService
from kernel.links import Link
from kernel.netns import Namespace
from kernel.system import Kernel
from meshctl.controller import names
from meshctl.controller.tables import table_change
from meshctl.lb.spec import (
    LB_INTERFACE,
    BackendKind,
    LbSpec,
    addresses,
    iptables_tables,
    ipvs_state,
    is_owned_service,
    lb_node_end,
    sysctls,
)

TABLES = ("mangle", "nat", "filter")  # mangle first: nat's SNAT matches the mark set there

Ipvs = Mapping[VirtualService, tuple[Destination, ...]]


def choose_backend(kernel: Kernel, wanted: str, ns: Namespace = None) -> BackendKind:
    """The backend to run: "auto" picks IPVS where the kernel has it, else iptables."""
    reason = kernel.ipvs.available(ns) if wanted in ("auto", "ipvs") else None
    if wanted == "auto":
        return pick_lb_backend(reason is None)  # the rule meshctl doctor reports
    if wanted == "ipvs" and reason is not None:
        raise Unsupported(f"load-balancer backend ipvs: {reason}; choose iptables or auto")
    if wanted not in ("ipvs", "iptables"):
        raise ValueError(f"load-balancer backend {wanted!r}: use auto, ipvs or iptables")
    return "ipvs" if wanted == "ipvs" else "iptables"


@dataclass(frozen=True)
class LbObserved:
    """What one LB namespace holds, in the shapes the spec builders produce."""

    netns: str
    exists: bool = False
    node_end: Link | None = None  # the veth end on the node, enslaved to the bridge
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
    ensure_services: tuple[VirtualService, ...] = ()
    ensure_destinations: tuple[tuple[VirtualService, Destination], ...] = ()
    delete_destinations: tuple[tuple[VirtualService, Destination], ...] = ()
    delete_services: tuple[VirtualService, ...] = ()
    delete_addresses: tuple[str, ...] = ()
    stale_udp: tuple[UdpFlow, ...] = ()  # flows pinned to backends that are gone

    @property
    def empty(self) -> bool:
        return not any(
            (
                self.create_netns,
                self.ensure_leg,
                self.sysctls,
                self.add_addresses,
                self.tables,
                self.ensure_services,
                self.ensure_destinations,
                self.delete_destinations,
                self.delete_services,
                self.delete_addresses,
                self.stale_udp,
            )
        )


@dataclass(frozen=True)
class LbPlan:
    """Changes to the desired LB namespaces, and the node's LB namespaces to delete."""

    changes: tuple[NsChange, ...] = ()
    delete_netns: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.changes and not self.delete_netns


def _leg_ok(spec: LbSpec, observed: LbObserved) -> bool:
    end, inside = observed.node_end, observed.inside
    return (
        end is not None
        and end.kind == "veth"
        and end.master == spec.bridge
        and end.up
        and inside is not None
        and inside.kind == "veth"
        and inside.up
    )


Pairs = tuple[tuple[VirtualService, Destination], ...]


def _ipvs_change(
    desired: Ipvs, observed: Ipvs
) -> tuple[tuple[VirtualService, ...], Pairs, Pairs, tuple[VirtualService, ...]]:
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
    return tuple(ensure_services), tuple(ensure_dests), tuple(delete_dests), delete_services


def _stale_udp(spec: LbSpec, flows: frozenset[UdpFlow]) -> tuple[UdpFlow, ...]:
    """Balanced UDP flows whose backend is no longer one of its VIP's (draining ones stay)."""
    backends = {v.vip: {b.address for b in v.backends} for v in spec.vips}
    return tuple(
        sorted(
            (f for f in flows if f.vip != f.backend and f.backend not in backends.get(f.vip, ())),
            key=lambda f: (f.vip, f.backend),
        )
    )


def diff(spec: LbSpec, observed: LbObserved, backend: BackendKind) -> NsChange:
    """The smallest change from observed to spec for one LB namespace (empty when converged)."""
    want_sysctls = sysctls(spec, backend)
    want_addresses = addresses(spec)
    tables = {}
    for table, desired in iptables_tables(spec, backend).items():
        change = table_change(desired, observed.tables.get(table, OwnedTable()))
        if change is not None:
            tables[table] = change
    ensure_svcs, ensure_dests, delete_dests, delete_svcs = _ipvs_change(
        ipvs_state(spec) if backend == "ipvs" else {}, observed.ipvs
    )
    return NsChange(
        spec=spec,
        create_netns=not observed.exists,
        ensure_leg=not _leg_ok(spec, observed),
        sysctls={k: v for k, v in want_sysctls.items() if observed.sysctls.get(k) != v},
        add_addresses=tuple(sorted(want_addresses - observed.addresses)),
        tables=tables,
        ensure_services=ensure_svcs,
        ensure_destinations=ensure_dests,
        delete_destinations=delete_dests,
        delete_services=delete_svcs,
        delete_addresses=tuple(sorted(observed.addresses - want_addresses)),
        stale_udp=_stale_udp(spec, observed.udp_flows),
    )


def _cidr(cidr: str) -> str:
    return str(ipaddress.ip_interface(cidr))


class LbReconciler:
    """Drives the LB namespaces of one node with one backend ("ipvs" or "iptables").

    node_ns is the namespace of the node (None: the one the controller runs in), where the
    networks' bridges and the LB legs' node ends live.
    """

    def __init__(self, kernel: Kernel, backend: BackendKind, node_ns: Namespace = None) -> None:
        if backend not in ("ipvs", "iptables"):
            raise ValueError(f"load-balancer backend {backend!r}: use 'ipvs' or 'iptables'")
        self.kernel = kernel
        self.backend = backend
        self.node_ns = node_ns

    def observe(self, spec: LbSpec) -> LbObserved:
        """Read the LB namespace of spec's network (spec names its leg and sysctls)."""
        k, ns = self.kernel, spec.netns
        node_end = k.links.get_link(self.node_ns, spec.node_end)
        if not k.netns.exists(ns):
            return LbObserved(ns, node_end=node_end)
        values: dict[str, str | None] = {}
        for key in sysctls(spec, self.backend):
            try:
                values[key] = k.sysctl.get(ns, key)
            except NotFound:  # eth0's keys before the leg exists
                values[key] = None
        ipvs: Ipvs = {}
        if self.backend == "ipvs":
            snapshot = k.ipvs.snapshot(ns)
            ipvs = {s: tuple(d) for s, d in snapshot.items() if is_owned_service(s)}
        return LbObserved(
            netns=ns,
            exists=True,
            node_end=node_end,
            inside=k.links.get_link(ns, LB_INTERFACE),
            addresses=frozenset(_cidr(a.cidr) for a in k.links.list_addresses(ns, LB_INTERFACE)),
            sysctls=values,
            tables={t: k.iptables.list_owned(ns, t) for t in TABLES},
            ipvs=ipvs,
            udp_flows=k.conntrack.list_udp_flows(ns),
        )

    def diff(self, spec: LbSpec, observed: LbObserved) -> NsChange:
        """Pure: see `diff`."""
        return diff(spec, observed, self.backend)

    def plan(self, desired: Sequence[LbSpec], owned_prefix: str) -> LbPlan:
        """Observe every desired LB namespace and every one of this node; the changes to make."""
        _check_prefix(owned_prefix, desired)
        changes = tuple(c for c in (self.diff(s, self.observe(s)) for s in desired) if not c.empty)
        wanted = {s.netns for s in desired}
        stale = tuple(n for n in self.kernel.netns.list_namespaces(owned_prefix) if n not in wanted)
        return LbPlan(changes, stale)

    def apply(self, plan: LbPlan) -> None:
        """Make the plan: each namespace's change in dependency order, then the deletions."""
        for change in plan.changes:
            self._apply_change(change)
        for ns in plan.delete_netns:
            # The node end goes first, explicitly: a namespace dies only when unreferenced.
            self.kernel.links.delete_link(self.node_ns, lb_node_end(ns.rsplit("-", 1)[1]))
            self.kernel.netns.delete(ns)

    def sync(self, desired: Sequence[LbSpec], owned_prefix: str) -> LbPlan:
        """One reconcile pass over the node's LB namespaces; returns what it changed.

        owned_prefix is `lb_netns_prefix(node_id)`: namespaces with it that no spec wants are
        deleted; no other namespace is ever touched.
        """
        plan = self.plan(desired, owned_prefix)
        self.apply(plan)
        return plan

    def _apply_change(self, change: NsChange) -> None:
        k, spec, ns = self.kernel, change.spec, change.spec.netns
        if change.create_netns:
            k.netns.create(ns)
        if change.ensure_leg:
            k.links.ensure_veth(self.node_ns, spec.node_end, LB_INTERFACE, ns)
            k.links.set_master(self.node_ns, spec.node_end, spec.bridge)
            k.links.set_up(self.node_ns, spec.node_end)
            k.links.set_up(ns, LB_INTERFACE)
        for key, value in change.sysctls.items():
            k.sysctl.set(ns, key, value)
        for cidr in change.add_addresses:
            k.links.ensure_address(ns, LB_INTERFACE, cidr)
        for table in TABLES:
            if table in change.tables:
                k.iptables.apply(ns, table, change.tables[table])
        for svc in change.ensure_services:
            k.ipvs.ensure_service(ns, svc)
        for svc, dest in change.ensure_destinations:
            k.ipvs.ensure_destination(ns, svc, dest)
        for svc, dest in change.delete_destinations:
            k.ipvs.delete_destination(ns, svc, dest)
        for svc in change.delete_services:
            k.ipvs.delete_service(ns, svc)
        for cidr in change.delete_addresses:
            k.links.delete_address(ns, LB_INTERFACE, cidr)
        # Last: only now can no new flow reach a removed backend.
        for flow in change.stale_udp:
            k.conntrack.delete_udp_entries(ns, flow.vip, flow.backend)


def _check_prefix(owned_prefix: str, desired: Sequence[LbSpec]) -> None:
    """Refuse a prefix that could reach beyond this node's LB namespaces."""
    node_part = owned_prefix.removeprefix(names.LB_NETNS_PREFIX)
    if node_part == owned_prefix or len(node_part) < 2 or not node_part.endswith("-"):
        raise ValueError(
            f"owned prefix {owned_prefix!r} is not a node's LB namespace prefix; "
            "pass lb_netns_prefix(node_id)"
        )
    for spec in desired:
        if not spec.netns.startswith(owned_prefix):
            raise ValueError(
                f"LB namespace {spec.netns} is not under {owned_prefix}; build specs with lb_spec()"
            )
