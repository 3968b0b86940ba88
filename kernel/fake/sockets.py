"""kernel.sockets in memory: ports a test says some process holds."""

from __future__ import annotations

from kernel import netns
from kernel.fake.world import FakeWorld


class FakeSockets:
    """SocketsAPI over a FakeWorld; `bind` stands for a process holding a port."""

    def __init__(self, world: FakeWorld) -> None:
        self.world = world

    def _ports(self, ns: netns.Namespace) -> set[tuple[int, str]]:
        ports: set[tuple[int, str]] = self.world.require(ns).part("sockets", set)
        return ports

    def bind(self, ns: netns.Namespace, port: int, proto: str) -> None:
        self._ports(ns).add((port, proto))

    def bound_ports(self, ns: netns.Namespace) -> frozenset[tuple[int, str]]:
        return frozenset(self._ports(ns))
