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
from typing import Any

from kernel.conntrack import UdpFlow
from kernel.links import Link
from meshctl.lb.backend import LbBackend, ObjectsChange, shared_part
from meshctl.lb.spec import LbSpec, addresses


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
    objects: Any = None  # what the backend owns there, in its render's shape (None: nothing)
    udp_flows: frozenset[UdpFlow] = frozenset()


@dataclass(frozen=True)
class NsChange:
    """The change that brings one LB namespace to its spec, in the order `apply` makes it."""

    spec: LbSpec
    create_netns: bool = False
    ensure_leg: bool = False
    sysctls: Mapping[str, str] = field(default_factory=dict)
    add_addresses: tuple[str, ...] = ()
    objects: ObjectsChange | None = None  # the backend's change
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
                self.objects is not None and not self.objects.empty,
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


def _stale_udp(spec: LbSpec, flows: frozenset[UdpFlow]) -> tuple[UdpFlow, ...]:
    """Balanced UDP flows whose backend is no longer one of its VIP's (draining ones stay)."""
    backends = {v.vip: {b.address for b in v.backends} for v in spec.vips}
    return tuple(
        sorted(
            (f for f in flows if f.vip != f.backend and f.backend not in backends.get(f.vip, ())),
            key=lambda f: (f.vip, f.backend),
        )
    )


def _objects_change(
    spec: LbSpec, held: LbObserved, backend: LbBackend, desired: Any, held_objects: Any
) -> NsChange:
    """The addresses, backend objects and UDP flows to change so that `held` becomes spec's.

    Only those fields of `held` are read: the namespace, its leg and sysctls are `diff`'s part.
    """
    want_addresses = addresses(spec)
    return NsChange(
        spec=spec,
        add_addresses=tuple(sorted(want_addresses - held.addresses)),
        objects=backend.change(desired, held_objects),
        delete_addresses=tuple(sorted(held.addresses - want_addresses)),
        stale_udp=_stale_udp(spec, held.udp_flows),
    )


def diff(spec: LbSpec, observed: LbObserved, backend: LbBackend) -> NsChange:
    """The smallest change from observed to spec for one LB namespace (empty when converged);
    only the clashes if its leg's name or its bridge is another's link."""
    taken = clashes(spec, observed)
    if taken:
        return NsChange(spec=spec, clashes=taken)
    want_sysctls = backend.sysctls()
    held = observed.objects
    if held is None:  # no namespace yet: nothing held
        held = backend.render(replace(spec, vips=()), None)
    return replace(
        _objects_change(spec, observed, backend, backend.render(spec, spec), held),
        create_netns=not observed.exists,
        ensure_leg=not _leg_ok(spec, observed),
        sysctls={k: v for k, v in want_sysctls.items() if observed.sysctls.get(k) != v},
    )


def held_by(spec: LbSpec, objects: Any) -> LbObserved:
    """What an LB namespace holds once spec has been applied to it: its addresses, the backend's
    objects given, and a UDP flow to every backend (the flows that may exist)."""
    return LbObserved(
        netns=spec.netns,
        exists=True,
        addresses=addresses(spec),
        objects=objects,
        udp_flows=frozenset(UdpFlow(v.vip, b.address) for v in spec.vips for b in v.backends),
    )


def _frame(spec: LbSpec) -> tuple[str, ...]:
    """What places an LB namespace: a change here needs a full observe, not a VIP change."""
    return (spec.netns, spec.network_id, spec.bridge, spec.node_end, spec.lb_address_cidr)


def vip_change(applied: LbSpec, desired: LbSpec, backend: LbBackend) -> NsChange | None:
    """The change from the kernel state `applied` left to `desired`'s, built from the VIPs that
    differ alone; None when the namespace itself changed (observe it instead).

    The change tracker, the same for every backend: a VIP whose backends changed is rendered
    as two one-VIP specs (before and after), so the cost follows that service's size. The
    objects the VIPs share are rendered from all of `applied` and `desired` only when the set
    of VIPs or their being active changed; the backend's diff then rewrites those that differ.
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
    shared_changed = sorted(map(shared_part, gone)) != sorted(map(shared_part, came))
    want = backend.render(new, desired if shared_changed else None)
    had = backend.render(gone_spec, applied if shared_changed else None)
    change = _objects_change(new, held_by(gone_spec, had), backend, want, had)
    return replace(change, spec=desired)
