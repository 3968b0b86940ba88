"""Every kernel parameter meshctl sets, where, to what and why: the tables that the controller
applies (node and load-balancer namespaces), `meshctl doctor` shows and the README lists. Those
of one dataplane object (a load-balancer backend, a task DNS redirect) are listed by it, as its
`settings`, from here.

Task namespaces get none: a task sees a new namespace's defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from meshctl.naming import LB_INTERFACE

Place = Literal["node", "lb", "task"]


@dataclass(frozen=True)
class Setting:
    """One sysctl meshctl sets, where (the node namespace the controller runs in, every
    load-balancer namespace or every task namespace), to what and why."""

    place: Place
    key: str
    value: str
    why: str


NODE: tuple[Setting, ...] = (
    Setting("node", "net.ipv4.ip_forward", "1", "the node routes between its bridges and out"),
)
# Every load-balancer namespace, whatever its backend.
LB: tuple[Setting, ...] = (
    Setting("lb", "net.ipv4.ip_forward", "1", "the LB forwards VIP traffic to the tasks"),
    # It forwards back out of the leg it received on: no redirects telling clients to bypass.
    Setting("lb", "net.ipv4.conf.all.send_redirects", "0", "no redirects past the LB"),
    Setting("lb", f"net.ipv4.conf.{LB_INTERFACE}.send_redirects", "0", "no redirects past the LB"),
)
# The ipvs backend's besides (meshctl.lb.ipvs lists them as its own).
IPVS: tuple[Setting, ...] = (
    Setting("lb", "net.ipv4.vs.conntrack", "1", "netfilter tracks IPVS flows: SNAT works"),
    Setting("lb", "net.ipv4.vs.expire_nodest_conn", "1", "flows to removed tasks end"),
    Setting("lb", "net.ipv4.vs.expire_quiescent_template", "1", "drained tasks get no new flows"),
    Setting("lb", "net.ipv4.vs.conn_reuse_mode", "0", "no stall on a reused source port"),
)


def node_sysctls() -> dict[str, str]:
    """What the controller sets in its node namespace when it starts."""
    return {s.key: s.value for s in NODE}


def lb_sysctls(own: tuple[Setting, ...]) -> dict[str, str]:
    """What every load-balancer namespace holds with a backend whose own settings are `own`."""
    return {s.key: s.value for s in (*LB, *own)}
