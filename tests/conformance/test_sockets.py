"""kernel.sockets on fake and real: a port some process holds is reported, others are not."""

from __future__ import annotations

import socket
import subprocess

from kernel import netns
from kernel.fake.sockets import FakeSockets
from kernel.sockets import Sockets, count_served, parse_proc_net
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


def test_served_connections_counts_what_listeners_accepted_not_what_clients_opened(
    kernel: KernelUnderTest,
) -> None:
    """What a leaving task's node waits for: connections its servers hold, from anywhere."""
    ns = kernel.new_ns("serve")
    sockets = FakeSockets(kernel.world) if kernel.is_fake and kernel.world else Sockets()
    listener = _hold(kernel, ns, 8125, "tcp")
    assert sockets.served_connections(ns) == 0
    opened: list[socket.socket] = []
    try:
        if kernel.is_fake:
            assert kernel.world is not None
            FakeSockets(kernel.world).accept(ns, 8125)
        else:
            assert listener is not None
            # A client in the same namespace: its own socket is not served, the accepted one is.
            subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
            client = netns.run_in(ns, socket.create_connection, ("127.0.0.1", 8125), 2)
            opened += [client, listener.accept()[0]]
        assert sockets.served_connections(ns) == 1
        if kernel.is_fake:
            assert kernel.world is not None
            FakeSockets(kernel.world).close(ns, 8125)
        else:
            for sock in opened:
                sock.close()
        # The server's side of a connection the client closed first waits in TIME_WAIT or
        # FIN_WAIT: no longer established.
        assert sockets.served_connections(ns) == 0
    finally:
        for sock in [*opened, listener]:
            if sock is not None:
                sock.close()


def test_count_served_skips_outgoing_connections() -> None:
    table = (
        "  sl  local_address rem_address   st\n"
        "   0: 00000000:0050 00000000:0000 0A\n"  # listening on 80
        "   1: 0A000102:0050 0A000109:9C40 01\n"  # accepted on 80
        "   2: 0A000102:9C41 0A000103:0050 01\n"  # opened to another server's 80
        "   3: 0A000102:0050 0A000109:9C42 06\n"  # accepted, in TIME_WAIT
    )
    assert count_served(table) == 1
