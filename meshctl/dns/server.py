"""The embedded DNS server: one asyncio loop reading UDP and TCP sockets opened inside each task.

A socket keeps the namespace it was created in, so sockets made in a task's namespace (through
kernel.netns.run_in) and read here serve that task while this process stays in the node's
namespace, where the forwarder's sockets then reach the upstream resolvers. All methods run on
the event loop's thread; meshctl.dns.thread.ServerThread drives it from another thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from kernel import netns
from kernel.errors import calling
from meshctl.dns.forwarder import EMBEDDED_ADDRESS, Forwarder
from meshctl.dns.records import DnsView, ScopeTable, Zone, build_zones
from meshctl.dns.wire import RCODE_SERVFAIL, error_reply, query_type, rcode_name
from meshctl.stats import DNS_BUCKETS, Counts, Histogram

# Datagrams read per readiness callback: the loop then moves to the other endpoints, so a task
# flooding its socket gets a fair share, not the whole loop.
UDP_BUDGET = 64
TCP_IDLE_SECONDS = 10.0
# Room for bursts (the kernel caps it at net.core.rmem_max); beyond it the kernel drops a
# flood's excess on the flooding task's socket alone.
UDP_RECV_BUFFER = 1 << 20


@dataclass
class DnsStats:
    """What the server answered, for /metrics: requests by protocol and type, responses by
    rcode and source (local, forward), durations by type from the query's arrival to the
    reply's send."""

    requests: Counts = field(default_factory=Counts)
    responses: Counts = field(default_factory=Counts)
    durations: dict[str, Histogram] = field(default_factory=dict)

    def answered(self, reply: bytes, source: str, qtype: str, started: float) -> None:
        self.responses.inc(rcode_name(reply), source)
        histogram = self.durations.get(qtype)
        if histogram is None:
            histogram = self.durations[qtype] = Histogram(DNS_BUCKETS)
        histogram.observe(time.perf_counter() - started)


@dataclass(eq=False)
class _Endpoint:
    """One task's sockets, its scope's table and what it has in flight."""

    endpoint_id: str
    networks: frozenset[str]
    udp: socket.socket
    tcp: socket.socket
    table: ScopeTable
    forwards: int = 0
    # The accept loop and one task per TCP connection: cancelled with the endpoint.
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    connections: int = 0


async def _recv_exactly(conn: socket.socket, size: int) -> bytes:
    """Read exactly size bytes from a stream socket; EOFError if it closes first."""
    loop = asyncio.get_running_loop()
    data = b""
    while len(data) < size:
        chunk = await loop.sock_recv(conn, size - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def _open_sockets(address: str, port: int) -> tuple[socket.socket, socket.socket]:
    """A UDP and a listening TCP socket on address:port in the calling thread's namespace."""
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        with calling(f"bind DNS sockets on {address}:{port} (is loopback up in the namespace?)"):
            udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RECV_BUFFER)
            udp.bind((address, port))
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            tcp.bind((address, port))
            tcp.listen(128)
    except BaseException:
        udp.close()
        tcp.close()
        raise
    udp.setblocking(False)
    tcp.setblocking(False)
    return udp, tcp


class DnsServer:
    """Serves every endpoint (task) from per-scope record tables; forwards the rest upstream."""

    def __init__(
        self,
        upstreams: Sequence[str],
        *,
        forward_timeout: float = 2.0,
        max_forwards: int = 1024,
        max_forwards_per_endpoint: int = 64,
        max_tcp_per_endpoint: int = 16,
    ) -> None:
        self.forwarder = Forwarder(upstreams, forward_timeout, max_forwards)
        self.stats = DnsStats()
        self.max_forwards_per_endpoint = max_forwards_per_endpoint
        self.max_tcp_per_endpoint = max_tcp_per_endpoint
        self._zones: dict[str, Zone] = {}
        self._tables: dict[frozenset[str], ScopeTable] = {}
        self._endpoints: dict[str, _Endpoint] = {}
        self._pending: set[asyncio.Task[Any]] = set()
        self._waiting: set[str] = set()  # adopted endpoints not read until the next update

    def _table(self, scope: frozenset[str]) -> ScopeTable:
        table = self._tables.get(scope)
        if table is None:
            table = self._tables[scope] = ScopeTable(self._zones, scope)
        return table

    def update(self, view: DnsView) -> None:
        """Rebuild the records from view and swap every endpoint to the new tables at once;
        serve the adopted endpoints that waited for records."""
        self._zones = build_zones(view)
        self._tables = {}
        for endpoint in self._endpoints.values():
            endpoint.table = self._table(endpoint.networks)
        waiting, self._waiting = self._waiting, set()
        for endpoint_id in sorted(waiting & set(self._endpoints)):
            self._serve(self._endpoints[endpoint_id])

    async def add_endpoint(
        self,
        endpoint_id: str,
        namespace: netns.Namespace,
        networks: frozenset[str],
        address: str = EMBEDDED_ADDRESS,
        port: int = 0,
    ) -> tuple[int, int]:
        """Open and serve sockets in the endpoint's namespace; returns the (UDP, TCP) ports.

        port 0 picks random ports, which the nat redirect of 127.0.0.11:53 then points at.
        Adding an endpoint that exists replaces it.
        """
        self.remove_endpoint(endpoint_id)
        udp, tcp = netns.run_in(namespace, _open_sockets, address, port)
        return self.adopt_endpoint(endpoint_id, networks, udp, tcp)

    def adopt_endpoint(
        self,
        endpoint_id: str,
        networks: frozenset[str],
        udp: socket.socket,
        tcp: socket.socket,
        *,
        waiting: bool = False,
    ) -> tuple[int, int]:
        """Serve sockets opened earlier; returns their (UDP, TCP) ports. Those of a controller
        before this one (waiting: True) are read from the next update() on: what they queued
        meanwhile is then answered from the records, not from an empty table."""
        self.remove_endpoint(endpoint_id)
        udp.setblocking(False)
        tcp.setblocking(False)
        endpoint = _Endpoint(endpoint_id, networks, udp, tcp, self._table(networks))
        self._endpoints[endpoint_id] = endpoint
        if waiting:
            self._waiting.add(endpoint_id)
        else:
            self._serve(endpoint)
        return udp.getsockname()[1], tcp.getsockname()[1]

    def _serve(self, endpoint: _Endpoint) -> None:
        asyncio.get_running_loop().add_reader(endpoint.udp.fileno(), self._on_udp, endpoint)
        self._start(endpoint, self._accept(endpoint))

    def sockets(self, endpoint_id: str) -> tuple[socket.socket, socket.socket]:
        """An endpoint's (UDP, TCP) sockets, to hand to the socket keeper."""
        endpoint = self._endpoints[endpoint_id]
        return endpoint.udp, endpoint.tcp

    def remove_endpoint(self, endpoint_id: str) -> None:
        """Stop serving an endpoint and close its sockets; a missing one is a no-op."""
        endpoint = self._endpoints.pop(endpoint_id, None)
        if endpoint is None:
            return
        asyncio.get_running_loop().remove_reader(endpoint.udp.fileno())
        endpoint.udp.close()
        if endpoint_id in self._waiting:  # never served: no task holds its TCP socket
            self._waiting.discard(endpoint_id)
            endpoint.tcp.close()
        # Each task closes its socket as it ends, after the loop stopped watching it.
        for task in endpoint.tasks:
            task.cancel()

    async def close(self) -> None:
        """Stop serving every endpoint; cancel forwards and connections in flight."""
        for endpoint_id in list(self._endpoints):
            self.remove_endpoint(endpoint_id)
        pending = list(self._pending)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    def _start(self, endpoint: _Endpoint | None, coro: Coroutine[Any, Any, None]) -> None:
        """Run coro as a task that close() (and, given an endpoint, its removal) cancels."""
        task = asyncio.get_running_loop().create_task(coro)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        if endpoint is not None:
            endpoint.tasks.add(task)
            task.add_done_callback(endpoint.tasks.discard)

    def _on_udp(self, endpoint: _Endpoint) -> None:
        """The hot path: answer up to UDP_BUDGET queued datagrams from the endpoint's socket."""
        sock = endpoint.udp
        answer = endpoint.table.answer
        stats = self.stats
        for _ in range(UDP_BUDGET):
            try:
                data, peer = sock.recvfrom(65535)
            except OSError:  # drained (EAGAIN) or a queued ICMP error: nothing to read now
                return
            started = time.perf_counter()
            qtype = query_type(data)
            stats.requests.inc("udp", qtype)
            reply = answer(data, False)
            if reply is None:
                self._forward_udp(endpoint, data, peer, qtype, started)
            elif reply:
                try:  # noqa: SIM105 -- suppress() costs a context manager per packet here
                    sock.sendto(reply, peer)
                except OSError:  # the client's buffer is full or it went away: as UDP loss
                    pass
                stats.answered(reply, "local", qtype, started)

    def _may_forward(self, endpoint: _Endpoint) -> bool:
        """Whether a forward fits both the endpoint's and the server's bound on forwards."""
        return endpoint.forwards < self.max_forwards_per_endpoint and not self.forwarder.full

    def _forward_udp(
        self, endpoint: _Endpoint, data: bytes, peer: tuple[str, int], qtype: str, started: float
    ) -> None:
        if not self._may_forward(endpoint):
            reply = error_reply(data, RCODE_SERVFAIL)
            with contextlib.suppress(OSError):  # lost like any UDP reply
                endpoint.udp.sendto(reply, peer)
            self.stats.answered(reply, "overload", qtype, started)
            return
        self._start(None, self._forward_then_reply(endpoint, data, peer, qtype, started))

    async def _forward_then_reply(
        self, endpoint: _Endpoint, data: bytes, peer: tuple[str, int], qtype: str, started: float
    ) -> None:
        endpoint.forwards += 1
        try:
            reply = await self.forwarder.forward(data, tcp=False)
        finally:
            endpoint.forwards -= 1
        with contextlib.suppress(OSError):  # the endpoint was removed meanwhile, or the client left
            endpoint.udp.sendto(reply, peer)
        self.stats.answered(reply, "forward", qtype, started)

    async def _accept(self, endpoint: _Endpoint) -> None:
        """Accept TCP connections, each served by its own task, up to the endpoint's bound."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                conn, _ = await loop.sock_accept(endpoint.tcp)
                if endpoint.connections >= self.max_tcp_per_endpoint:
                    conn.close()
                    continue
                conn.setblocking(False)
                self._start(endpoint, self._serve_tcp(endpoint, conn))
        finally:
            endpoint.tcp.close()

    async def _serve_tcp(self, endpoint: _Endpoint, conn: socket.socket) -> None:
        """Answer length-prefixed queries (RFC 1035 4.2.2) on one connection until idle."""
        loop = asyncio.get_running_loop()
        endpoint.connections += 1
        try:
            while True:
                head = await asyncio.wait_for(_recv_exactly(conn, 2), TCP_IDLE_SECONDS)
                length = int.from_bytes(head, "big")
                data = await asyncio.wait_for(_recv_exactly(conn, length), TCP_IDLE_SECONDS)
                started = time.perf_counter()
                qtype = query_type(data)
                self.stats.requests.inc("tcp", qtype)
                reply = endpoint.table.answer(data, True)
                source = "local"
                if reply is None:
                    source = "forward" if self._may_forward(endpoint) else "overload"
                    reply = await self._forward_tcp(endpoint, data)
                if reply:
                    await loop.sock_sendall(conn, len(reply).to_bytes(2, "big") + reply)
                    self.stats.answered(reply, source, qtype, started)
        except (TimeoutError, EOFError, OSError):
            pass
        finally:
            endpoint.connections -= 1
            conn.close()

    async def _forward_tcp(self, endpoint: _Endpoint, data: bytes) -> bytes:
        if not self._may_forward(endpoint):
            return error_reply(data, RCODE_SERVFAIL)
        endpoint.forwards += 1
        try:
            return await self.forwarder.forward(data, tcp=True)
        finally:
            endpoint.forwards -= 1
