"""Run a DnsServer on its own event loop in a background thread, optionally in another namespace.

The DNS hot path then never waits behind other work of the calling process, and a test or
bench can start the server "on a node" (a namespace it made) and drive it synchronously.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, TypeVar

from kernel import netns
from meshctl.dns.records import DnsView
from meshctl.dns.server import DnsServer

T = TypeVar("T")


class ServerThread:
    """A context manager: the server runs (in namespace) between enter and exit."""

    def __init__(self, server: DnsServer, namespace: netns.Namespace = None) -> None:
        self.server = server
        self.loop = asyncio.new_event_loop()
        # The loop thread enters the namespace, so the forwarder's sockets are made there.
        self._thread = threading.Thread(
            target=netns.run_in, args=(namespace, self.loop.run_forever), daemon=True
        )

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        """Run a coroutine on the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def update(self, view: DnsView) -> None:
        """Swap in new records; returns once queries get answers from them."""

        async def swap() -> None:
            self.server.update(view)

        self.run(swap())

    def add_endpoint(
        self, endpoint_id: str, namespace: netns.Namespace, networks: frozenset[str], **kw: Any
    ) -> tuple[int, int]:
        """DnsServer.add_endpoint, from this thread."""
        return self.run(self.server.add_endpoint(endpoint_id, namespace, networks, **kw))

    def adopt_endpoint(
        self,
        endpoint_id: str,
        networks: frozenset[str],
        udp: socket.socket,
        tcp: socket.socket,
        *,
        waiting: bool = False,
    ) -> tuple[int, int]:
        """DnsServer.adopt_endpoint, from this thread."""

        async def adopt() -> tuple[int, int]:
            return self.server.adopt_endpoint(endpoint_id, networks, udp, tcp, waiting=waiting)

        return self.run(adopt())

    def sockets(self, endpoint_id: str) -> tuple[socket.socket, socket.socket]:
        """DnsServer.sockets, from this thread."""

        async def get() -> tuple[socket.socket, socket.socket]:
            return self.server.sockets(endpoint_id)

        return self.run(get())

    def remove_endpoint(self, endpoint_id: str) -> None:
        """DnsServer.remove_endpoint, from this thread."""

        async def remove() -> None:
            self.server.remove_endpoint(endpoint_id)

        self.run(remove())

    def __enter__(self) -> ServerThread:
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            self.run(self.server.close())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
            self.loop.close()
