"""Which ports processes of a namespace hold: TCP listeners and bound UDP sockets.

Read from /proc/thread-self/net inside the namespace (the table of the reading thread's
namespace), so a published port that a process already uses can be refused instead of
taken over by a DNAT rule.
"""

from __future__ import annotations

from typing import Protocol

from kernel import netns

TCP_LISTEN = "0A"
_TABLES = (("tcp", "tcp"), ("tcp6", "tcp"), ("udp", "udp"), ("udp6", "udp"))


class SocketsAPI(Protocol):
    def bound_ports(self, ns: netns.Namespace) -> frozenset[tuple[int, str]]: ...


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
        ports.add((int(local.rsplit(":", 1)[1], 16), proto))
    return ports


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
