"""The node's own networking, reconciled: bridges, task legs and the node's rules.

Desired objects are pure functions of the view (node.desired), the kernel is read and
written by controller.node_kernel; this class keeps the small cache between passes: the node's
rules, overlay entries, links and addresses are not read back between full observes (once per
resync period) unless this controller changed them, and each task namespace known to be wired
is read again within a few periods, at its own time; so a pass costs what changed. One bridge
or task that fails is reported by name and the others converge.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Collection, Mapping

from kernel.iptables_rules import OwnedTable
from kernel.links import NamespaceLinks
from kernel.system import Kernel
from meshctl import naming
from meshctl.node.desired import (
    TaskNetSpec,
    container_spec,
    desired_node,
    plan_node,
    published_ports,
)
from meshctl.node.kernel import (
    apply_node,
    blocked_ports,
    observe_node,
    read_node,
)
from meshctl.node.task_dns import TaskDns
from meshctl.overlay.vxlan import NO_UNDERLAY, OverlaySpec, Underlay
from meshctl.view import ClusterView

log = logging.getLogger("meshctl.node")

# A task namespace is read back within this many resync periods of its last read. Only
# meshctl changes what is in it (a user in it would need to be root there); reading every one
# each period cost a node with 300 tasks a third of a core (one thread, socket and dump each).
TASK_REREAD = 6


class NodeReconciler:
    """Drives the node's networking for one controller (node: the node's name)."""

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
        self.resync_period = resync_period
        self.task_dns = task_dns  # how tasks reach 127.0.0.11 (the node's dataplane)
        self._last_full = -float("inf")  # monotonic time of the last full observe
        # Task namespaces seen or made as desired, and when each is due to be read again.
        self._wired: dict[str, tuple[TaskNetSpec, float]] = {}
        # The node's rules and overlays as last seen right, until the next full observe.
        self._tables: dict[str, OwnedTable] | None = None
        self._overlays: dict[str, OverlaySpec] = {}
        # The node's links and addresses as last read, and the task namespaces there were then.
        self._node: tuple[tuple[str, ...], NamespaceLinks] | None = None
        # service id → why one of its published ports is not published on this node
        self.port_errors: dict[str, str] = {}

    def sync(
        self,
        view: ClusterView,
        wired: Collection[str],
        dns_ports: Mapping[str, tuple[int, int]],
    ) -> dict[str, str]:
        """Bring the node in line with the view for the tasks in `wired` (those the supervisor
        runs or stops); returns what failed: network name or task id → why."""
        containers = [
            spec
            for c in view.containers.values()
            if c.node == self.node
            and (spec := container_spec(view, c, underlay=self.underlay)) is not None
        ]
        now = time.monotonic()
        if now - self._last_full >= self.resync_period:
            self._last_full = now
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
        blocked = self._blocked_ports(view, actual.tables.get("nat", OwnedTable()))
        desired = desired_node(
            view, self.node, wired, dns_ports, blocked, self.underlay, self.task_dns
        )
        plan = plan_node(desired, actual, stray)
        failed: dict[str, str] = {}
        if plan:
            log.info("applying node plan %s", summary(plan))
            failed = apply_node(self.kernel, plan)
            changed = {t.netns for t in plan.wire_tasks} | {ns for ns, _ in plan.task_dns}
            known = {k: v for k, v in known.items() if v.netns not in changed}
            tables = None if plan.tables else self._tables
            touched = {o.device for o in plan.ensure_overlays} | {p.device for p in plan.peers}
            overlays = {d: o for d, o in self._overlays.items() if d not in touched}
            self._node = None
            actual, stray = observe_node(
                self.kernel,
                containers,
                known,
                mine,
                tables,
                self.task_dns,
                overlays,
                self._read_node(),
            )
            residue = plan_node(desired, actual, stray)
            if residue and not failed:  # a second diff must be empty after applying
                log.warning("node not converged after apply: %s", summary(residue))
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
        failures = _by_object(view, failed)
        if not self.underlay.address:
            for network in view.networks.values():
                if network.overlay and network.name in view.taking_part(self.node):
                    failures[network.name] = (
                        "this node advertises no address for the overlay: start its "
                        "controller with --advertise-addr"
                    )
        return failures

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

    def _blocked_ports(self, view: ClusterView, nat: OwnedTable) -> set[tuple[int, str]]:
        """Published ports that another process of this node holds: left to it, and said on the
        service's tasks. A port meshctl already catches stays meshctl's."""
        wanted = published_ports(view)
        blocked = blocked_ports(self.kernel, view, nat)
        errors = {
            wanted[key]: f"published port {key[0]}/{key[1]} is in use on node {self.node} by "
            "another process; free it or publish another port"
            for key in sorted(blocked)
        }
        for message in set(errors.values()) - set(self.port_errors.values()):
            log.warning("%s", message)
        self.port_errors = errors
        return blocked


def _by_object(view: ClusterView, failed: Mapping[str, str]) -> dict[str, str]:
    """Failures keyed by what users know: a bridge's network name, a task namespace's task id."""
    bridges = {naming.bridge(n.id): n.name for n in view.networks.values()}
    return {
        bridges.get(what) or what.removeprefix(naming.TASK_NETNS_PREFIX): why
        for what, why in failed.items()
    }


def summary(plan: object) -> str:
    return " ".join(f"{k}={len(v)}" for k, v in vars(plan).items() if v)
