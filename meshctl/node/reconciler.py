"""The node's own networking, reconciled: bridges, task legs and the node's rules.

Desired objects are pure functions of the view (node.desired), the kernel is read and
written by node.kernel; this class keeps the small cache between passes: the node's rules,
overlay entries, links and addresses are not read back between full observes (once per
resync period, ResyncClock) unless this controller changed them, and each task namespace
known to be wired is read again within a few periods, at its own time; so a pass costs what
changed. One bridge or task that fails is reported by name and the others converge.

The task namespaces' DNS redirect rules for endpoints the DNS server opens in the same pass
(after the wiring, which they need) are a reconciler of their own, `TaskDnsRedirects`, that
runs after the DNS endpoints; the node's plan carries every other task's.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from kernel.iptables_rules import OwnedTable, table_lines
from kernel.links import NamespaceLinks
from kernel.system import Kernel
from meshctl import naming
from meshctl.node.desired import (
    NodePlan,
    NodeSpec,
    TaskNetSpec,
    container_spec,
    desired_node,
    plan_node,
    published_ports,
    task_spec,
)
from meshctl.node.kernel import (
    apply_node,
    blocked_ports,
    observe_node,
    read_node,
)
from meshctl.node.task_dns import TaskDns
from meshctl.overlay.vxlan import NO_UNDERLAY, OverlaySpec, Underlay
from meshctl.reconcile import PassContext
from meshctl.view import ClusterView

log = logging.getLogger("meshctl.node")

# A task namespace is read back within this many resync periods of its last read. Only
# meshctl changes what is in it (a user in it would need to be root there); reading every one
# each period cost a node with 300 tasks a third of a core (one thread, socket and dump each).
TASK_REREAD = 6


@dataclass(frozen=True)
class NodeWork:
    """A node plan and what the pass learnt making it: port_errors (why a published port is
    not published here, by service id), unreachable (overlays this node cannot serve, by
    network name), names (bridge → network name, for the failures)."""

    plan: NodePlan
    port_errors: dict[str, str] = field(default_factory=dict)
    unreachable: dict[str, str] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.plan)


class NodeReconciler:
    """Drives the node's networking for one controller (node: the node's name)."""

    name = "node"
    converges = True

    def __init__(
        self,
        kernel: Kernel,
        node: str,
        resync_period: float,
        underlay: Underlay = NO_UNDERLAY,
        *,
        task_dns: TaskDns,
    ) -> None:
        self.kernel = kernel
        self.node = node
        self.underlay = underlay
        self.resync_period = resync_period  # spreads the task namespaces' reads (_due)
        self.task_dns = task_dns  # how tasks reach 127.0.0.11 (the node's dataplane)
        # Task namespaces seen or made as desired, and when each is due to be read again.
        self._wired: dict[str, tuple[TaskNetSpec, float]] = {}
        # The node's rules and overlays as last seen right, until the next full observe.
        self._tables: dict[str, OwnedTable] | None = None
        self._overlays: dict[str, OverlaySpec] = {}
        # The node's links and addresses as last read, and the task namespaces there were then.
        self._node: tuple[tuple[str, ...], NamespaceLinks] | None = None
        self._port_errors: dict[str, str] = {}  # as last applied: each is logged when new

    def plan(self, view: ClusterView, ctx: PassContext) -> NodeWork:
        """The node's plan for the tasks in ctx.wired (those the supervisor runs or stops),
        with the DNS redirects of the ports in ctx.dns_ports; a full observe if ctx.full.
        What it sees as desired is trusted until it is due to be read again."""
        containers = [
            spec
            for c in view.containers.values()
            if c.node == self.node
            and (spec := container_spec(view, c, underlay=self.underlay)) is not None
        ]
        now = time.monotonic()
        if ctx.full:
            self._tables, self._overlays, self._node = None, {}, None
        known = {tid: spec for tid, (spec, due) in self._wired.items() if due > now}
        mine = {task.id for task in view.tasks_on(self.node)}
        actual, stray = observe_node(
            self.kernel,
            containers,
            known,
            mine,
            self._tables,
            self.task_dns,
            self._overlays,
            self._read_node(),
        )
        nat = actual.tables.get("nat", OwnedTable())
        blocked, port_errors = self._blocked_ports(view, nat)
        desired = desired_node(
            view, self.node, ctx.wired, ctx.dns_ports, blocked, self.underlay, self.task_dns
        )
        self._remember(desired, actual, known, now)
        return NodeWork(
            plan_node(desired, actual, stray),
            port_errors,
            self._unreachable(view),
            {naming.bridge(n.id): n.name for n in view.networks.values()},
        )

    def apply(self, work: NodeWork, ctx: PassContext) -> dict[str, str]:
        """Make the plan; tell the pass the port errors, the task namespaces there are now and
        when a task namespace is next due to be read."""
        for message in set(work.port_errors.values()) - set(self._port_errors.values()):
            log.warning("%s", message)
        self._port_errors = ctx.port_errors = work.port_errors
        failed: dict[str, str] = {}
        if work.plan:
            log.info("applying node plan %s", summary(work.plan))
            failed = apply_node(self.kernel, work.plan)
            self._forget(work.plan)
        ctx.present = frozenset(self.kernel.netns.list_namespaces(naming.TASK_NETNS_PREFIX))
        reread = max(self.next_read() - time.monotonic(), self.resync_period / 4)
        ctx.due(time.time() + min(reread, self.resync_period))
        return _by_object(work.names, failed) | work.unreachable

    def describe(self, work: NodeWork) -> Iterator[str]:
        return describe_node(work.plan)

    def plan_redirects(self, view: ClusterView, ctx: PassContext) -> NodeWork:
        """The DNS redirect rules of the tasks whose DNS ports opened in this pass
        (ctx.dns_added), against their namespaces as the node's plan left them."""
        wanted: dict[str, TaskNetSpec] = {}
        have: dict[str, TaskNetSpec] = {}
        for task_id, ports in sorted(ctx.dns_added.items()):
            seen, task = self._wired.get(task_id), view.tasks.get(task_id)
            if seen is None or task is None:
                continue  # not wired as desired: the node's next plan carries its redirect
            wanted[task_id] = task_spec(view, task, ports, self.underlay, self.task_dns)
            have[task_id] = seen[0]
        plan = plan_node(NodeSpec({}, wanted, {}), NodeSpec({}, have, {}))
        return NodeWork(plan, names={naming.bridge(n.id): n.name for n in view.networks.values()})

    def apply_redirects(self, work: NodeWork) -> dict[str, str]:
        """Set the redirect rules; the namespaces they changed are read by the next plan."""
        if not work.plan:
            return {}
        log.info("applying node plan %s", summary(work.plan))
        failed = apply_node(self.kernel, work.plan)
        self._forget_tasks(work.plan)  # the node's own links are as they were
        return _by_object(work.names, failed)

    def _remember(
        self,
        desired: NodeSpec,
        actual: NodeSpec,
        known: Mapping[str, TaskNetSpec],
        now: float,
    ) -> None:
        """Trust what is as desired until it is due to be read again."""
        self._wired = {
            task_id: (spec, self._wired[task_id][1] if task_id in known else self._due(now))
            for task_id, spec in desired.tasks.items()
            if spec.owns_netns and actual.tasks.get(task_id) == spec
        }
        self._tables = desired.tables if actual.tables == desired.tables else None
        self._overlays = {
            device: overlay
            for device, overlay in desired.overlays.items()
            if actual.overlays.get(device) == overlay
        }

    def _forget(self, plan: NodePlan) -> None:
        """After applying: what the plan changed is read again by the next plan."""
        self._forget_tasks(plan)
        if plan.tables:
            self._tables = None
        touched = {o.device for o in plan.ensure_overlays} | {p.device for p in plan.peers}
        self._overlays = {d: o for d, o in self._overlays.items() if d not in touched}
        self._node = None

    def _forget_tasks(self, plan: NodePlan) -> None:
        """The task namespaces the plan changed are read again by the next plan."""
        changed = {t.netns for t in plan.wire_tasks} | {ns for ns, _ in plan.task_dns}
        self._wired = {k: v for k, v in self._wired.items() if v[0].netns not in changed}

    def _unreachable(self, view: ClusterView) -> dict[str, str]:
        """The overlays this node takes part in but cannot serve: it advertises no address."""
        if self.underlay.address:
            return {}
        return {
            network.name: "this node advertises no address for the overlay: start its "
            "controller with --advertise-addr"
            for network in view.networks.values()
            if network.overlay and network.name in view.taking_part(self.node)
        }

    def _read_node(self) -> NamespaceLinks:
        """The node's links and addresses: as last read while no task namespace came or went
        and this controller changed nothing (a node of 300 tasks has 300-odd links: a dump of 600
        took 0.2 s here, and collecting its cyclic garbage more); else read now.
        Another's change to them is seen at the next full observe, as one to the rules is."""
        namespaces = tuple(self.kernel.netns.list_namespaces(naming.TASK_NETNS_PREFIX))
        if self._node is None or self._node[0] != namespaces:
            self._node = (namespaces, read_node(self.kernel))
        return self._node[1]

    def _due(self, now: float) -> float:
        """When a task namespace read now is read again: within TASK_REREAD resync periods, at
        a random point of the second half, so that the reads spread over the passes instead of
        all falling in one (that pass took seconds at 300 tasks, and every change arriving
        meanwhile waited for it)."""
        return now + self.resync_period * TASK_REREAD * random.uniform(0.5, 1.0)

    def next_read(self) -> float:
        """The monotonic time at which the first task namespace is due to be read again."""
        return min((due for _, due in self._wired.values()), default=float("inf"))

    def _blocked_ports(
        self, view: ClusterView, nat: OwnedTable
    ) -> tuple[set[tuple[int, str]], dict[str, str]]:
        """Published ports that another process of this node holds: left to it, and said on the
        service's tasks (by service id). A port meshctl already catches stays meshctl's."""
        wanted = published_ports(view)
        blocked = blocked_ports(self.kernel, view, nat)
        errors = {
            wanted[key]: f"published port {key[0]}/{key[1]} is in use on node {self.node} by "
            "another process; free it or publish another port"
            for key in sorted(blocked)
        }
        return blocked, errors


class TaskDnsRedirects:
    """The DNS redirect rules of task namespaces whose DNS endpoints opened in this pass: they
    follow the DNS endpoints, which follow the node's wiring (the sockets need the namespace)."""

    name = "node"
    converges = True

    def __init__(self, node: NodeReconciler) -> None:
        self.node = node

    def plan(self, view: ClusterView, ctx: PassContext) -> NodeWork:
        return self.node.plan_redirects(view, ctx)

    def apply(self, work: NodeWork, ctx: PassContext) -> dict[str, str]:
        return self.node.apply_redirects(work)

    def describe(self, work: NodeWork) -> Iterator[str]:
        return describe_node(work.plan)


def describe_node(plan: NodePlan) -> Iterator[str]:
    """One line per difference: `+` to add, `-` to remove, `~` to change, `!` what meshctl
    will not change because it is not its own (a link of the name it wants, without its mark)."""
    for name, alias in plan.clashes:
        yield f"! {naming.clash_text(name, alias)}"
    for bridge in plan.ensure_bridges:
        yield f"~ bridge {bridge.name} {bridge.address} mtu {bridge.mtu}"
    for device in plan.delete_overlays:
        yield f"- vxlan {device}"
    for overlay in plan.ensure_overlays:
        yield f"~ vxlan {overlay.device} vni {overlay.vni} port {overlay.port} mtu {overlay.mtu}"
    for peers in plan.peers:
        for peer in sorted(peers.add):
            yield f"+ peer {peer.address} {peer.mac} via {peer.vtep} on {peers.device}"
        for neighbour in sorted(peers.remove_neighbours, key=lambda n: n.address):
            yield f"- neighbour {neighbour.address} {neighbour.mac} on {peers.device}"
        for entry in sorted(peers.remove_fdb, key=lambda e: e.mac):
            yield f"- fdb {entry.mac} via {entry.dst} on {peers.device}"
    for task in plan.wire_tasks:
        yield f"~ task namespace {task.netns} ({len(task.links)} legs)"
    for ns, redirect in plan.task_dns:
        yield from redirect.lines(ns)
    for ns in plan.unwire_tasks:
        yield f"- task namespace {ns}"
    for link in plan.delete_links:
        yield f"- link {link}"
    for table, change in plan.tables.items():
        yield from table_lines("node", table, change)


def _by_object(bridges: Mapping[str, str], failed: Mapping[str, str]) -> dict[str, str]:
    """Failures keyed by what users know: a bridge's network name (bridges: bridge → network
    name), a task namespace's task id."""
    return {
        bridges.get(what) or what.removeprefix(naming.TASK_NETNS_PREFIX): why
        for what, why in failed.items()
    }


def summary(plan: object) -> str:
    return " ".join(f"{k}={len(v)}" for k, v in vars(plan).items() if v)
