"""Forward the names that are not ours to the upstream resolvers, from the node's namespace.

Each attempt uses a fresh socket (a random source port and ID per query) made in the thread
running the event loop, so it lives in the controller's namespace, not the task's. An upstream
that times out, refuses, or answers SERVFAIL or REFUSED is skipped for the next one (libnetwork
stops at the first: libnetwork#2663); when all fail the client gets SERVFAIL, never silence.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
from collections.abc import Sequence

from meshctl.dns.wire import RCODE_REFUSED, RCODE_SERVFAIL, error_reply, rcode_name
from meshctl.stats import Counts

DNS_PORT = 53
RESOLV_CONF = "/etc/resolv.conf"
# The embedded server's own address: forwarding to it would loop.
EMBEDDED_ADDRESS = "127.0.0.11"
_GIVE_UP_RCODES = frozenset({RCODE_SERVFAIL, RCODE_REFUSED})


def _port(text: str) -> int:
    """A port 1-65535 in ASCII digits (int() would also take ' 53', '+53' or other scripts')."""
    if not (text.isascii() and text.isdigit() and len(text) <= 5 and 1 <= int(text) <= 65535):
        raise ValueError(text)
    return int(text)


def parse_upstream(text: str) -> tuple[str, int]:
    """'1.2.3.4', '1.2.3.4:5353', '::1' or '[::1]:5353' as (address, port); ValueError if not."""
    try:
        if text.startswith("["):
            host, colon, port = text[1:].partition("]:")
            if not colon and not host.endswith("]"):
                raise ValueError(text)
            return str(ipaddress.ip_address(host.removesuffix("]"))), _port(port or "53")
        if text.count(":") == 1:
            host, port = text.split(":")
            return str(ipaddress.ip_address(host)), _port(port)
        return str(ipaddress.ip_address(text)), DNS_PORT
    except ValueError:
        raise ValueError(
            f"upstream DNS server {text!r} is not an IP address with an optional port: "
            "give it as 10.0.0.53, 10.0.0.53:5353, fd00::53 or [fd00::53]:5353"
        ) from None


def read_resolv_conf(path: str = RESOLV_CONF) -> list[str]:
    """The nameservers of a resolv.conf, in order, leaving out the embedded server itself."""
    try:
        with open(path, encoding="utf-8") as conf:
            lines = conf.read().splitlines()
    except FileNotFoundError:
        return []
    servers = []
    for line in lines:
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver" and fields[1] != EMBEDDED_ADDRESS:
            servers.append(fields[1].split("%")[0])  # drop an IPv6 zone index
    return servers


class Forwarder:
    """Sends a query to the upstreams in order and returns the first usable reply."""

    def __init__(
        self, upstreams: Sequence[str], timeout: float = 2.0, max_in_flight: int = 1024
    ) -> None:
        self.upstreams = [parse_upstream(u) for u in upstreams]
        self.timeout = timeout
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self.sent = Counts()  # by upstream ("address:port")
        # by upstream and why: timeout, error, malformed, SERVFAIL, REFUSED
        self.failures = Counts()

    @property
    def full(self) -> bool:
        """Whether the bound on forwards in flight is reached: callers answer SERVFAIL now."""
        return self.in_flight >= self.max_in_flight

    async def forward(self, query: bytes, tcp: bool) -> bytes:
        """The upstream reply to query with the client's ID, or SERVFAIL if no upstream answers."""
        self.in_flight += 1
        try:
            for address, port in self.upstreams:
                ident = os.urandom(2)
                upstream = f"{address}:{port}"
                self.sent.inc(upstream)
                try:
                    ask = self._ask_tcp if tcp else self._ask_udp
                    reply = await asyncio.wait_for(
                        ask(address, port, ident + query[2:]), self.timeout
                    )
                except TimeoutError:
                    self.failures.inc(upstream, "timeout")
                    continue
                except (OSError, asyncio.IncompleteReadError):
                    self.failures.inc(upstream, "error")
                    continue
                if len(reply) < 12 or reply[:2] != ident:
                    self.failures.inc(upstream, "malformed")
                    continue
                if reply[3] & 0x0F in _GIVE_UP_RCODES:
                    self.failures.inc(upstream, rcode_name(reply))
                    continue
                return query[:2] + reply[2:]
            return error_reply(query, RCODE_SERVFAIL)
        finally:
            self.in_flight -= 1

    @staticmethod
    async def _ask_udp(address: str, port: int, query: bytes) -> bytes:
        """One UDP exchange; replies from elsewhere or with another ID are ignored."""
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            # Connected: the kernel drops datagrams from other sources and reports ICMP
            # unreachable as ECONNREFUSED, so a dead upstream fails at once, not on timeout.
            sock.connect((address, port))
            await loop.sock_sendall(sock, query)
            while True:
                reply = await loop.sock_recv(sock, 65535)
                if reply[:2] == query[:2]:
                    return reply

    @staticmethod
    async def _ask_tcp(address: str, port: int, query: bytes) -> bytes:
        """One TCP exchange (RFC 1035 4.2.2: two-byte length prefix)."""
        reader, writer = await asyncio.open_connection(address, port)
        try:
            writer.write(len(query).to_bytes(2, "big") + query)
            await writer.drain()
            length = int.from_bytes(await reader.readexactly(2), "big")
            return await reader.readexactly(length)
        finally:
            writer.close()
