"""kernel.sockets on fake and real: a port some process holds is reported, others are not."""

from __future__ import annotations

import socket

from kernel import netns
from kernel.fake.sockets import FakeSockets
from kernel.sockets import Sockets, parse_proc_net
from tests.conformance.conftest import KernelUnderTest


def _hold(kernel: KernelUnderTest, ns: str, port: int, proto: str) -> socket.socket | None:
    """Make a process hold the port: a real socket, or the fake's record of one."""
    if kernel.is_fake:
        assert kernel.world is not None
        FakeSockets(kernel.world).bind(ns, port, proto)
        return None
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    sock = netns.run_in(ns, socket.socket, socket.AF_INET, kind)
    sock.bind(("0.0.0.0", port))
    if proto == "tcp":
        sock.listen()
    return sock


def test_bound_ports_lists_listeners_and_udp_sockets(kernel: KernelUnderTest) -> None:
    ns = kernel.new_ns("sock")
    sockets = FakeSockets(kernel.world) if kernel.is_fake and kernel.world else Sockets()
    held = [_hold(kernel, ns, 8123, "tcp"), _hold(kernel, ns, 8124, "udp")]
    try:
        ports = sockets.bound_ports(ns)
        assert {(8123, "tcp"), (8124, "udp")} <= ports
        assert (8124, "tcp") not in ports and (8123, "udp") not in ports
        assert (8123, "tcp") not in sockets.bound_ports(kernel.new_ns("other"))
    finally:
        for sock in held:
            if sock is not None:
                sock.close()


def test_parse_ignores_tcp_sockets_that_do_not_listen() -> None:
    table = (
        "  sl  local_address rem_address   st\n"
        "   0: 00000000:1F40 00000000:0000 0A\n"
        "   1: 0100007F:1F41 0100007F:9C40 01\n"
    )
    assert parse_proc_net(table, "tcp") == {(8000, "tcp")}
    assert parse_proc_net(table, "udp") == {(8000, "udp"), (8001, "udp")}
