"""kernel.conntrack in memory: UDP flows per fake namespace, which tests inject with `add_flow`."""

from __future__ import annotations

from kernel import netns
from kernel.conntrack import UdpFlow
from kernel.fake.world import FakeWorld


class FakeConntrack:
    """ConntrackAPI over a FakeWorld."""

    def __init__(self, world: FakeWorld) -> None:
        self.world = world

    def _flows(self, ns: netns.Namespace) -> set[UdpFlow]:
        flows: set[UdpFlow] = self.world.require(ns).part("conntrack", set)
        return flows

    def add_flow(self, ns: netns.Namespace, vip: str, backend: str) -> None:
        """What traffic balanced from vip to backend would leave behind."""
        self._flows(ns).add(UdpFlow(vip, backend))

    def _open(self, ns: netns.Namespace) -> dict[str, int]:
        counts: dict[str, int] = self.world.require(ns).part("conntrack-tcp", dict)
        return counts

    def set_tcp_connections(self, ns: netns.Namespace, backend: str, count: int) -> None:
        """What open TCP connections through the LB to backend would leave behind."""
        self._open(ns)[backend] = count

    def count_tcp_connections(self, ns: netns.Namespace, backend: str) -> int:
        return self._open(ns).get(backend, 0)

    def list_udp_flows(self, ns: netns.Namespace) -> frozenset[UdpFlow]:
        return frozenset(self._flows(ns))

    def delete_udp_entries(self, ns: netns.Namespace, vip: str, backend: str) -> int:
        flows = self._flows(ns)
        stale = {f for f in flows if f.vip == vip and f.backend == backend}
        flows -= stale
        return len(stale)
