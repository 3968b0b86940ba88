"""Which ports processes of a namespace hold (TCP listeners and bound UDP sockets), and how
many TCP connections its servers hold open.

Read from /proc/thread-self/net inside the namespace (the table of the reading thread's
namespace): a published port that a process already uses can be refused instead of taken over
by a DNAT rule, and a leaving task is stopped only once the connections it serves are done,
whichever node's load balancer sent them.
"""

from __future__ import annotations

from typing import Protocol

from kernel import netns

TCP_ESTABLISHED = "01"
TCP_LISTEN = "0A"
_TABLES = (("tcp", "tcp"), ("tcp6", "tcp"), ("udp", "udp"), ("udp6", "udp"))


class SocketsAPI(Protocol):
    def bound_ports(self, ns: netns.Namespace) -> frozenset[tuple[int, str]]: ...

    def served_connections(self, ns: netns.Namespace) -> int: ...


def parse_proc_net(text: str, proto: str) -> set[tuple[int, str]]:
    """(port, proto) of each TCP listener or UDP socket in one /proc/net/{tcp,udp}[6] table."""
    ports = set()
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 4:
            continue
        local, state = fields[1], fields[3]
        if proto == "tcp" and state != TCP_LISTEN:
            continue
        ports.add((_port(local), proto))
    return ports


def count_served(text: str) -> int:
    """Established TCP connections on a port that a socket of the same table listens on (the
    connections its servers accepted, not those its clients opened), in one /proc/net table."""
    rows = [line.split() for line in text.splitlines()[1:]]
    rows = [fields for fields in rows if len(fields) >= 4]
    listening = {_port(fields[1]) for fields in rows if fields[3] == TCP_LISTEN}
    return sum(1 for f in rows if f[3] == TCP_ESTABLISHED and _port(f[1]) in listening)


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1], 16)


def _read_served() -> int:
    served = 0
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/thread-self/net/{table}") as f:
                served += count_served(f.read())
        except FileNotFoundError:  # no IPv6 in this kernel
            continue
    return served


def _read_tables() -> frozenset[tuple[int, str]]:
    ports: set[tuple[int, str]] = set()
    for table, proto in _TABLES:
        try:
            with open(f"/proc/thread-self/net/{table}") as f:
                ports |= parse_proc_net(f.read(), proto)
        except FileNotFoundError:  # no IPv6 in this kernel
            continue
    return frozenset(ports)


class Sockets:
    """SocketsAPI on the real kernel."""

    def bound_ports(self, ns: netns.Namespace) -> frozenset[tuple[int, str]]:
        return netns.run_in(ns, _read_tables)

    def served_connections(self, ns: netns.Namespace) -> int:
        return netns.run_in(ns, _read_served)
