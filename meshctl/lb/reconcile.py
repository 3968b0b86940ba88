"""Reconcile the load-balancer namespaces of one node: observe, diff (pure), apply.

Per network an `LbSpec` says what its LB namespace should hold; `observe` reads what it holds
(leg, addresses, sysctls, the backend's objects, UDP flows), `meshctl.lb.plan` computes the
smallest change, `apply` makes it. `sync` does it for every network of the node and deletes the
node's LB namespaces that are no longer desired, and nothing else: a namespace is known to be
meshctl's by its leg, whose node end carries the network's mark (naming.mark) as its alias; one
without a marked leg is reported and kept. A leg name or bridge held by another's link is
reported and left alone. `sync_changed` is the fast path between full syncs: it reads nothing
back and changes only the VIPs whose spec differs from the one it last applied.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

from kernel.errors import KernelError, NotFound
from kernel.netns import Namespace
from kernel.system import Kernel
from meshctl import naming
from meshctl.lb.backend import LbBackend
from meshctl.lb.desired import lb_specs
from meshctl.lb.plan import LbObserved, LbPlan, NsChange, diff, vip_change
from meshctl.lb.spec import LbSpec, lb_node_end
from meshctl.naming import LB_INTERFACE
from meshctl.overlay.vxlan import NO_UNDERLAY, Underlay
from meshctl.reconcile import PassContext
from meshctl.view import ClusterView

log = logging.getLogger("meshctl.lb")


def _cidr(cidr: str) -> str:
    return str(ipaddress.ip_interface(cidr))


class LbReconciler:
    """Drives the LB namespaces of one node with one backend (meshctl.lb.backends).

    node_ns is the namespace of the node (None: the one the controller runs in), where the
    networks' bridges and the LB legs' node ends live. `retired` is the backend the node ran
    before, if another: the first observe of each LB namespace removes its objects there.
    """

    def __init__(
        self,
        kernel: Kernel,
        backend: LbBackend,
        node_ns: Namespace = None,
        retired: LbBackend | None = None,
    ) -> None:
        self.kernel = kernel
        self.backend = backend
        self.node_ns = node_ns
        self.retired = retired if retired is not None and retired.name != backend.name else None
        self._cleared: set[str] = set()  # LB namespaces rid of the retired backend's objects
        # The spec each LB namespace is known to hold: set when a change to it was applied or a
        # full observe found it converged, dropped before a change is made (a failed apply
        # leaves it unknown, so the next pass observes it).
        self._applied: dict[str, LbSpec] = {}
        # LB namespaces whose last observe or apply failed, and why: one network that fails
        # must not stop the others (the controller reports these).
        self.failures: dict[str, str] = {}

    def observe(self, spec: LbSpec) -> LbObserved:
        """Read the LB namespace of spec's network (spec names its leg; the sysctls are the
        backend's)."""
        k, ns = self.kernel, spec.netns
        node_end = k.links.get_link(self.node_ns, spec.node_end)
        bridge = k.links.get_link(self.node_ns, spec.bridge)
        if not k.netns.exists(ns):
            return LbObserved(ns, node_end=node_end, bridge=bridge)
        if self.retired is not None and ns not in self._cleared:
            self.retired.clear(k, ns)
            self._cleared.add(ns)
        values: dict[str, str | None] = {}
        for key in self.backend.sysctls():
            try:
                values[key] = k.sysctl.get(ns, key)
            except NotFound:  # eth0's keys before the leg exists
                values[key] = None
        return LbObserved(
            netns=ns,
            exists=True,
            node_end=node_end,
            bridge=bridge,
            inside=k.links.get_link(ns, LB_INTERFACE),
            addresses=frozenset(_cidr(a.cidr) for a in k.links.list_addresses(ns, LB_INTERFACE)),
            sysctls=values,
            objects=self.backend.observe(k, ns),
            udp_flows=k.conntrack.list_udp_flows(ns),
        )

    def diff(self, spec: LbSpec, observed: LbObserved) -> NsChange:
        """Pure: see `diff`."""
        return diff(spec, observed, self.backend)

    def plan(self, desired: Sequence[LbSpec], owned_prefix: str) -> LbPlan:
        """Observe every desired LB namespace and every one of this node; the changes to make."""
        return self._plan(desired, owned_prefix, self._observed_change)

    def plan_changes(self, desired: Sequence[LbSpec], owned_prefix: str) -> LbPlan:
        """The changes to make, read from what this reconciler last applied: only namespaces
        it knows nothing of (or whose frame changed) are observed."""

        def change(spec: LbSpec) -> NsChange:
            applied = self._applied.get(spec.netns)
            known = vip_change(applied, spec, self.backend) if applied is not None else None
            return known if known is not None else self._observed_change(spec)

        return self._plan(desired, owned_prefix, change)

    def _observed_change(self, spec: LbSpec) -> NsChange:
        try:
            change = self.diff(spec, self.observe(spec))
        except KernelError as err:
            self.failures[spec.netns] = f"cannot read its load balancer: {err}"
            return NsChange(spec)
        if change.empty:
            self._applied[spec.netns] = spec
            self.failures.pop(spec.netns, None)
        return change

    def _plan(
        self,
        desired: Sequence[LbSpec],
        owned_prefix: str,
        change: Callable[[LbSpec], NsChange],
    ) -> LbPlan:
        _check_prefix(owned_prefix, desired)
        changes = tuple(c for c in map(change, desired) if not c.empty)
        wanted = {s.netns for s in desired}
        stale: list[str] = []
        unmarked: list[str] = []
        for ns in self.kernel.netns.list_namespaces(owned_prefix):
            if ns not in wanted:
                (stale if self._leg_marked(ns) else unmarked).append(ns)
        return LbPlan(changes, tuple(stale), tuple(unmarked))

    def _leg_marked(self, ns: str) -> bool:
        """Whether an LB namespace's leg is meshctl's: its node end carries the mark of the
        network the namespace is named for (its last 8 characters, as lb_netns makes them)."""
        network_part = ns.rsplit("-", 1)[1]
        end = self.kernel.links.get_link(self.node_ns, lb_node_end(network_part))
        return (
            end is not None
            and end.kind == "veth"
            and end.alias is not None
            and end.alias.startswith(naming.mark(network_part))
        )

    def apply(self, plan: LbPlan) -> None:
        """Make the plan: each namespace's change in dependency order, then the deletions."""
        for change in plan.changes:
            self._applied.pop(change.spec.netns, None)
            if change.clashes:
                texts = [naming.clash_text(name, alias) for name, alias in change.clashes]
                for text in texts:
                    log.warning("%s: %s", change.spec.netns, text)
                self.failures[change.spec.netns] = "; ".join(texts)
                continue
            try:
                self._apply_change(change)
            except KernelError as err:
                log.warning("%s: cannot apply its load balancer: %s", change.spec.netns, err)
                self.failures[change.spec.netns] = f"cannot set up its load balancer: {err}"
                continue
            self.failures.pop(change.spec.netns, None)
            self._applied[change.spec.netns] = change.spec
        for ns in plan.unmarked_netns:
            log.warning(
                "%s has this node's load-balancer name but no leg with meshctl's mark: left "
                "alone; delete it if it is a leftover",
                ns,
            )
        for ns in plan.delete_netns:
            self._applied.pop(ns, None)
            self.failures.pop(ns, None)
            # The node end goes first, explicitly: a namespace dies only when unreferenced.
            self.kernel.links.delete_link(self.node_ns, lb_node_end(ns.rsplit("-", 1)[1]))
            self.kernel.netns.delete(ns)

    def sync(self, desired: Sequence[LbSpec], owned_prefix: str) -> LbPlan:
        """One reconcile pass over the node's LB namespaces; returns what it changed.

        owned_prefix is `lb_netns_prefix(node_id)`: namespaces with it that no spec wants are
        deleted if their leg is marked; no other namespace is ever touched.
        """
        plan = self.plan(desired, owned_prefix)
        self.apply(plan)
        return plan

    def sync_changed(self, desired: Sequence[LbSpec], owned_prefix: str) -> LbPlan:
        """`sync` without reading back what it already knows: a change to one service costs
        that service's rules. What drifted behind its back waits for the next `sync`."""
        plan = self.plan_changes(desired, owned_prefix)
        self.apply(plan)
        return plan

    def _apply_change(self, change: NsChange) -> None:
        k, ns = self.kernel, change.spec.netns
        if change.create_netns:
            k.netns.create(ns)
        objects = change.objects
        if objects is None or objects.empty:
            self._plumb(change)
        elif self.backend.parallel:
            # The leg, sysctls and addresses go in beside the backend's batch: its tool parses
            # in its own process meanwhile (10,000 VIP addresses take 1.5 s of netlink).
            with _beside(partial(self._plumb, change)):
                self.backend.apply(k, ns, objects)
        else:
            self._plumb(change)
            self.backend.apply(k, ns, objects)
        if change.delete_addresses:
            k.links.delete_addresses(ns, LB_INTERFACE, change.delete_addresses)
        # Last: only now can no new flow reach a removed backend.
        for flow in change.stale_udp:
            k.conntrack.delete_udp_entries(ns, flow.vip, flow.backend)

    def _plumb(self, change: NsChange) -> None:
        """The LB namespace's leg on the bridge, its sysctls and its new addresses."""
        k, spec, ns = self.kernel, change.spec, change.spec.netns
        if change.ensure_leg:
            k.links.ensure_veth(
                self.node_ns, spec.node_end, LB_INTERFACE, ns, alias=spec.mark,
                peer_mac=spec.mac, mtu=spec.mtu,
            )  # fmt: skip
            k.links.set_master(self.node_ns, spec.node_end, spec.bridge)
            k.links.set_up(self.node_ns, spec.node_end)
            k.links.set_up(ns, LB_INTERFACE)
        for key, value in change.sysctls.items():
            k.sysctl.set(ns, key, value)
        if change.add_addresses:
            k.links.ensure_addresses(ns, LB_INTERFACE, change.add_addresses)


@dataclass(frozen=True)
class LbWork:
    """A plan for the node's LB namespaces; full: made from a full observe; names: LB
    namespace → network name, for the failures."""

    plan: LbPlan
    full: bool
    names: dict[str, str]

    def __bool__(self) -> bool:
        return not self.plan.empty


class LoadBalancers:
    """The node's load balancers as one reconciler of the pass: a full observe when the pass
    is a full one (it repairs drift); in between, only the services whose spec changed."""

    name = "lb"
    converges = True

    def __init__(
        self, lb: LbReconciler, node: str, node_id: str, underlay: Underlay = NO_UNDERLAY
    ) -> None:
        self.lb = lb
        self.node = node
        self.node_id = node_id
        self.underlay = underlay
        self._specs: tuple[ClusterView, list[LbSpec]] | None = None  # of the last view planned

    def plan(self, view: ClusterView, ctx: PassContext) -> LbWork:
        if self._specs is None or self._specs[0] is not view:
            self._specs = (view, lb_specs(view, self.node, self.node_id, self.underlay))
        specs, prefix = self._specs[1], naming.lb_netns_prefix(self.node_id)
        plan = self.lb.plan(specs, prefix) if ctx.full else self.lb.plan_changes(specs, prefix)
        names = {naming.lb_netns(self.node_id, n.id): n.name for n in view.networks.values()}
        return LbWork(plan, ctx.full, names)

    def apply(self, work: LbWork, ctx: PassContext) -> dict[str, str]:
        """Make the plan; returns the networks whose load balancer fails, and why."""
        if not work.plan.empty:
            if work.full:
                log.info("applying load-balancer plan")
            self.lb.apply(work.plan)
            if not work.full:
                log.info("applied load-balancer changes to %d namespace(s)", len(work.plan.changes))
        return {work.names.get(ns, ns): why for ns, why in self.lb.failures.items()}

    def describe(self, work: LbWork) -> Iterator[str]:
        return describe_lb(work.plan)


def describe_lb(plan: LbPlan) -> Iterator[str]:
    """One line per difference in the LB namespaces, as `meshctl diff` prints them."""
    for ns_change in plan.changes:
        ns = ns_change.spec.netns
        for name, alias in ns_change.clashes:
            yield f"! {ns}: {naming.clash_text(name, alias)}"
        if ns_change.create_netns:
            yield f"+ load-balancer namespace {ns}"
        if ns_change.ensure_leg:
            yield f"~ {ns}: leg {ns_change.spec.node_end} on {ns_change.spec.bridge}"
        for key, value in ns_change.sysctls.items():
            yield f"~ {ns}: sysctl {key}={value}"
        for address in ns_change.add_addresses:
            yield f"+ {ns}: address {address}"
        for address in ns_change.delete_addresses:
            yield f"- {ns}: address {address}"
        if ns_change.objects is not None:
            yield from ns_change.objects.lines(ns)
        for flow in ns_change.stale_udp:
            yield f"- {ns}: udp conntrack {flow.vip} -> {flow.backend}"
    for ns in plan.delete_netns:
        yield f"- load-balancer namespace {ns}"
    for ns in plan.unmarked_netns:
        yield f"! load-balancer namespace {ns} has no leg with meshctl's mark: left alone"


@contextmanager
def _beside(work: Callable[[], None]) -> Iterator[None]:
    """Run work in a thread while the block runs; wait for it however the block ends, then
    raise its error if the block raised none."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        done = pool.submit(work)
        try:
            yield
        finally:
            wait([done])
        done.result()


def _check_prefix(owned_prefix: str, desired: Sequence[LbSpec]) -> None:
    """Refuse a prefix that could reach beyond this node's LB namespaces."""
    node_part = owned_prefix.removeprefix(naming.LB_NETNS_PREFIX)
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
