"""The socket keeper (meshctl.keeper), as a real process: it holds sockets for the next
controller, gives them back unchanged, forgets those of a namespace that is gone, and ends when
it holds nothing and no controller is connected."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshctl.keeper import KeeperClient
from tests.conftest import scaled


def _udp() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    return sock


def _keeper_pids(path: str) -> list[int]:
    found = subprocess.run(
        ["pgrep", "-f", f"meshctl.keeper {path}"], capture_output=True, text=True
    )
    return [int(p) for p in found.stdout.split()]


def _wait_gone(path: str) -> bool:
    deadline = time.monotonic() + scaled(5)
    while _keeper_pids(path) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not _keeper_pids(path)


@pytest.fixture
def path(tmp_path: Path) -> Iterator[str]:
    yield str(tmp_path / "keeper.sock")
    for pid in _keeper_pids(str(tmp_path / "keeper.sock")):
        os.kill(pid, 9)


def test_sockets_outlive_the_controller_and_come_back_with_their_queue(path: str) -> None:
    first = KeeperClient(path)
    first.connect()  # starts the keeper
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    udp, other = _udp(), _udp()
    first.put("t1", {"networks": ["front"]}, [udp, other])
    port = udp.getsockname()[1]
    first.close()
    udp.close()  # the controller is gone: only the keeper holds the socket now
    other.close()
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.sendto(b"asked in the gap", ("127.0.0.1", port))
    sender.close()

    second = KeeperClient(path)
    ((tag, info, socks),) = second.take()
    assert (tag, info) == ("t1", {"networks": ["front"]})
    assert socks[0].getsockname()[1] == port
    assert socks[0].recv(100) == b"asked in the gap"  # queued while no controller ran
    second.drop("t1")
    assert second.take() == []
    for sock in socks:
        sock.close()
    second.close()
    assert _wait_gone(path), "the keeper stayed with nothing to keep and nobody connected"
    assert not os.path.exists(path)


def test_the_sockets_of_a_namespace_that_is_gone_are_closed(path: str, tmp_path: Path) -> None:
    namespace = tmp_path / "netns-of-t1"
    namespace.touch()
    client = KeeperClient(path)
    sock = _udp()
    client.put("t1", {"namespace": str(namespace)}, [sock])
    other = _udp()
    client.put("t2", {}, [other])
    sock.close()
    other.close()
    namespace.unlink()
    deadline = time.monotonic() + scaled(5)
    while True:
        taken = client.take()
        for _, _, socks in taken:
            for each in socks:
                each.close()
        if [tag for tag, _, _ in taken] == ["t2"]:
            break
        assert time.monotonic() < deadline, "t1's sockets are still kept"
        time.sleep(0.1)
    client.close()
