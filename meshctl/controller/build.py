"""The one factory of a node's reconcilers, for `controller run` and for `meshctl diff`: the
same objects plan in both, so `diff` prints what the controller's next pass would change.

The pass order (`controller_pass`), as data: the store writers first — the tasks' ends and
health changes (every node's load balancers follow them), the leader's rounds, the address
claims — then the reconcilers: the DNS records (answers follow the store at once), the node
(bridges, task wiring, node rules), the router (its namespace joins the node's bridges), the
DNS endpoints (sockets inside the namespaces just wired), the redirect rules of the endpoints
opened just now, the load balancers, and the task processes last. Each reads what earlier
ones found in the PassContext, so none runs twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prometheus_client import Histogram

from kernel.system import Kernel
from meshctl.cluster.claims import AddressClaims
from meshctl.cluster.leader import Leader
from meshctl.controller.dataplane import Dataplane
from meshctl.controller.passes import PassRunner
from meshctl.controller.supervisor import Supervisor
from meshctl.dns.sync import DnsSync
from meshctl.lb.backend import LbBackend
from meshctl.lb.reconcile import LbReconciler, LoadBalancers
from meshctl.node.reconciler import NodeReconciler, TaskDnsRedirects
from meshctl.overlay.vxlan import Underlay, underlay_of
from meshctl.reconcile import Reconciler, ResyncClock
from meshctl.router.sync import RouterSync


@dataclass(frozen=True)
class NodeParts:
    """A node's kernel reconcilers and what they share (the kernel, the underlay)."""

    kernel: Kernel
    underlay: Underlay
    node: NodeReconciler
    redirects: TaskDnsRedirects
    router: RouterSync
    lb: LoadBalancers

    def compared(self) -> tuple[Reconciler[Any], ...]:
        """What `meshctl diff` plans and prints: the node, its load balancers, its router."""
        return (self.node, self.lb, self.router)


def node_parts(
    kernel: Kernel,
    dataplane: Dataplane,
    *,
    node: str,
    node_id: str,
    address: str,
    vxlan_port: int,
    state_dir: str,
    resync_period: float,
    retired: LbBackend | None = None,
) -> NodeParts:
    """The reconcilers of node `node` (its id, its underlay address and VXLAN port) on kernel,
    with the dataplane chosen for it (retired: the LB backend it ran before, if another)."""
    underlay = underlay_of(kernel, address, vxlan_port)
    reconciler = NodeReconciler(kernel, node, resync_period, underlay, task_dns=dataplane.task_dns)
    return NodeParts(
        kernel=kernel,
        underlay=underlay,
        node=reconciler,
        redirects=TaskDnsRedirects(reconciler),
        router=RouterSync(kernel, node, node_id, state_dir, underlay),
        lb=LoadBalancers(
            LbReconciler(kernel, dataplane.lb, retired=retired), node, node_id, underlay
        ),
    )


def controller_pass(
    parts: NodeParts,
    dns: DnsSync,
    supervisor: Supervisor,
    leader: Leader,
    claims: AddressClaims,
    clock: ResyncClock,
    histogram: Histogram,
) -> PassRunner:
    """The controller's pass runner, in the order the module's docstring explains."""
    writers = (supervisor, leader, claims)
    reconcilers = (
        dns.records,
        parts.node,
        parts.router,
        dns.endpoints,
        parts.redirects,
        parts.lb,
        supervisor,
    )
    return PassRunner(writers, reconcilers, clock, histogram)
