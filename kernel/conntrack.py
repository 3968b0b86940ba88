"""Connection tracking: the load-balanced UDP flows of a namespace, and deleting stale ones;
the open TCP connections a backend still serves, so draining knows when it may stop.

UDP has no end of connection: a flow that was balanced to a backend stays pinned to it until its
conntrack entry times out, so when a backend goes away its entries are deleted (kube-proxy's
lesson) and the client's next datagram is balanced again.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from kernel import netns
from kernel.errors import calling, deleting

T = TypeVar("T")


@dataclass(frozen=True)
class UdpFlow:
    """A UDP conntrack entry reduced to what balancing decided: sent to `vip`, answered by
    `backend` (equal when the flow was not NATed)."""

    vip: str
    backend: str


class ConntrackAPI(Protocol):
    """The conntrack verbs the load balancer uses; kernel.fake.conntrack.FakeConntrack too."""

    def list_udp_flows(self, ns: netns.Namespace) -> frozenset[UdpFlow]: ...

    def delete_udp_entries(self, ns: netns.Namespace, vip: str, backend: str) -> int: ...

    def count_tcp_connections(self, ns: netns.Namespace, backend: str) -> int: ...


def _session(ns: netns.Namespace, what: str, fn: Callable[[Any], T]) -> T:
    """Run fn(socket) with a ctnetlink socket opened inside ns, then close it."""

    def body() -> T:
        from pyroute2 import Conntrack

        with calling(what):
            sock = Conntrack()
        try:
            return fn(sock)
        finally:
            sock.close()

    return netns.run_in(ns, body)


def _udp_entries(sock: Any, vip: str | None = None) -> list[Any]:
    from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

    orig = NFCTAttrTuple(proto=socket.IPPROTO_UDP, daddr=vip)
    return list(sock.dump_entries(tuple_orig=orig))


class Conntrack:
    """ConntrackAPI on the real kernel through pyroute2's ctnetlink socket."""

    def list_udp_flows(self, ns: netns.Namespace) -> frozenset[UdpFlow]:
        """Every IPv4 UDP flow of ns as (original destination, reply source)."""

        def run(sock: Any) -> frozenset[UdpFlow]:
            with calling(f"dump UDP conntrack entries in netns {ns or '(node)'}"):
                entries = _udp_entries(sock)
            return frozenset(UdpFlow(e.tuple_orig.daddr, e.tuple_reply.saddr) for e in entries)

        return _session(ns, "open conntrack netlink socket", run)

    def delete_udp_entries(self, ns: netns.Namespace, vip: str, backend: str) -> int:
        """Delete the UDP entries sent to vip and answered by backend; returns how many."""

        def run(sock: Any) -> int:
            what = f"UDP conntrack entries {vip} → {backend} in netns {ns or '(node)'}"
            with calling(f"dump {what}"):
                stale = [e for e in _udp_entries(sock, vip) if e.tuple_reply.saddr == backend]
            for entry in stale:
                with deleting(f"delete {what}"):  # an entry may expire meanwhile: done
                    sock.delete(entry)
            return len(stale)

        return _session(ns, "open conntrack netlink socket", run)

    def count_tcp_connections(self, ns: netns.Namespace, backend: str) -> int:
        """TCP connections of ns answered by backend that are not closing (before FIN_WAIT)."""

        def run(sock: Any) -> int:
            from pyroute2.netlink.nfnetlink.nfctsocket import (
                TCP_CONNTRACK_ESTABLISHED,
                NFCTAttrTuple,
            )

            with calling(f"dump TCP conntrack entries in netns {ns or '(node)'}"):
                entries = sock.dump_entries(tuple_orig=NFCTAttrTuple(proto=socket.IPPROTO_TCP))
                return sum(
                    1
                    for e in entries
                    if e.tuple_reply.saddr == backend
                    and e.protoinfo is not None
                    and e.protoinfo.state <= TCP_CONNTRACK_ESTABLISHED
                )

        return _session(ns, "open conntrack netlink socket", run)
