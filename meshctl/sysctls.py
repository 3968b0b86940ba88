"""Every kernel parameter meshctl sets, where, to what and why: one table that the controller
applies (node and load-balancer namespaces), `meshctl doctor` shows and the README lists.

Task namespaces get none: a task sees a new namespace's defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from meshctl.naming import LB_INTERFACE

Place = Literal["node", "lb", "task"]


@dataclass(frozen=True)
class Setting:
    """One sysctl meshctl sets: in the node namespace the controller runs in, or in every
    load-balancer namespace (only where `backend` runs, if given)."""

    place: Place
    key: str
    value: str
    why: str
    backend: str | None = None  # a load-balancer backend's name


SETTINGS: tuple[Setting, ...] = (
    Setting("node", "net.ipv4.ip_forward", "1", "the node routes between its bridges and out"),
    Setting("lb", "net.ipv4.ip_forward", "1", "the LB forwards VIP traffic to the tasks"),
    # It forwards back out of the leg it received on: no redirects telling clients to bypass.
    Setting("lb", "net.ipv4.conf.all.send_redirects", "0", "no redirects past the LB"),
    Setting("lb", f"net.ipv4.conf.{LB_INTERFACE}.send_redirects", "0", "no redirects past the LB"),
    Setting("lb", "net.ipv4.vs.conntrack", "1", "netfilter tracks IPVS flows: SNAT works", "ipvs"),
    Setting("lb", "net.ipv4.vs.expire_nodest_conn", "1", "flows to removed tasks end", "ipvs"),
    Setting(
        "lb", "net.ipv4.vs.expire_quiescent_template", "1", "drained tasks get no new flows", "ipvs"
    ),
    Setting("lb", "net.ipv4.vs.conn_reuse_mode", "0", "no stall on a reused source port", "ipvs"),
)


def node_sysctls() -> dict[str, str]:
    """What the controller sets in its node namespace when it starts."""
    return {s.key: s.value for s in SETTINGS if s.place == "node"}


def lb_sysctls(backend: str) -> dict[str, str]:
    """What every load-balancer namespace holds with this backend."""
    return {s.key: s.value for s in SETTINGS if s.place == "lb" and s.backend in (None, backend)}
