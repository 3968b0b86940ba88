"""`meshctl diff`: what this node's kernel lacks or has too much of, compared to the store.

It builds the node's reconcilers with the controller's own factory (controller.build) and
prints `describe(plan)` of each, planned from a full observe, without applying anything: the
lines say what the controller's next full pass would change. What only a running controller
knows is read from where it leaves it: which task processes run (their pid and start time in
the store) and the DNS ports of each task (`dns-ports` in the task's directory). The failures
the controller last reported for the node follow.
"""

from __future__ import annotations

from kernel.system import Kernel
from meshctl.cluster import nodes
from meshctl.controller.build import NodeParts, node_parts
from meshctl.controller.dataplane import choose_dataplane
from meshctl.dns.sync import read_dns_ports
from meshctl.model import NODE, MeshctlError, Node, from_record
from meshctl.overlay.vxlan import VXLAN_PORT
from meshctl.reconcile import PassContext
from meshctl.runtime import read_start_time
from meshctl.store import Store
from meshctl.view import ClusterView, read_view


def running_here(view: ClusterView, node: str) -> set[str]:
    """The tasks of this node that should be wired: wanted running, or their process lives."""
    return {
        t.id
        for t in view.tasks_on(node)
        if t.desired_state == "running"
        or (t.pid is not None and read_start_time(t.pid) == t.start_time)
    }


def diff_context(view: ClusterView, node: Node, state_dir: str) -> PassContext:
    """A full pass's context as a stopped controller of `node` left it."""
    wired = running_here(view, node.name)
    dns_ports = read_dns_ports(state_dir, sorted(wired))
    return PassContext(node.name, node.id, True, frozenset(wired), dns_ports)


def describe_plans(parts: NodeParts, view: ClusterView, ctx: PassContext) -> list[str]:
    """The lines of every compared reconciler's plan, in the pass's order."""
    return [line for r in parts.compared() for line in r.describe(r.plan(view, ctx))]


def diff_lines(
    store: Store, kernel: Kernel, name: str, lb_backend: str, state_dir: str
) -> list[str]:
    """One line per difference between node `name`'s kernel and the store, then the failures
    its controller reported. lb_backend: "auto" for the one recorded for the node."""
    record = store.get(NODE, name)
    if record is None:
        raise MeshctlError(f"no controller has run as node {name}; give its name with --node")
    status = nodes.statuses(store).get(name)
    node = from_record(Node, record)
    if lb_backend == "auto" and node.lb_backend:
        lb_backend = node.lb_backend  # the one recorded when its controller started
    dataplane = choose_dataplane(kernel, lb_backend)
    port = status.vxlan_port if status is not None and status.vxlan_port else VXLAN_PORT
    parts = node_parts(
        kernel, dataplane, node=name, node_id=node.id, address=node.address, vxlan_port=port,
        state_dir=state_dir, resync_period=1.0,  # it spreads rereads over passes: diff plans once
    )  # fmt: skip
    view = read_view(store)
    lines = describe_plans(parts, view, diff_context(view, node, state_dir))
    if status is not None:
        lines += [f"! {'' if net == 'router' else 'network '}{net} fails on node {name}: {why}"
                  for net, why in sorted(status.errors.items())]  # fmt: skip
    return lines
