"""kernel.sockets in memory: ports a test says some process holds, and connections it says
a server accepted."""

from __future__ import annotations

from kernel import netns
from kernel.fake.world import FakeWorld


class FakeSockets:
    """SocketsAPI over a FakeWorld; `bind` stands for a process holding a port, `accept` for
    a server taking a connection on a port it holds (`close` for its end)."""

    def __init__(self, world: FakeWorld) -> None:
        self.world = world

    def _ports(self, ns: netns.Namespace) -> set[tuple[int, str]]:
        ports: set[tuple[int, str]] = self.world.require(ns).part("sockets", set)
        return ports

    def bind(self, ns: netns.Namespace, port: int, proto: str) -> None:
        self._ports(ns).add((port, proto))

    def bound_ports(self, ns: netns.Namespace) -> frozenset[tuple[int, str]]:
        return frozenset(self._ports(ns))

    def _served(self, ns: netns.Namespace) -> list[int]:
        served: list[int] = self.world.require(ns).part("served", list)
        return served

    def accept(self, ns: netns.Namespace, port: int) -> None:
        assert (port, "tcp") in self._ports(ns), f"no listener on {port} in {ns}"
        self._served(ns).append(port)

    def close(self, ns: netns.Namespace, port: int) -> None:
        self._served(ns).remove(port)

    def served_connections(self, ns: netns.Namespace) -> int:
        return len(self._served(ns))
