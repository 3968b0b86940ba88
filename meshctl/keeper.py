"""The socket keeper: a small process that holds sockets across a controller restart, so that
what answers on them (the tasks' embedded DNS) never stops. Standard library only: it stays
small, and an upgrade of meshctl need not replace it.

The DNS server lives in the controller's process, its sockets in the tasks' namespaces. When
the controller ends (an upgrade, a crash) its sockets would close with it: a query to
127.0.0.11 in the gap would be refused, and the next controller would open new ports and
rewrite every task's redirect. The controller therefore hands a duplicate of each endpoint's
sockets to this process, which outlives it (a session of its own, as tasks are). While no
controller runs, the kernel queues what arrives on them (UDP in the socket's buffer, TCP in
its backlog); the next controller takes the same sockets back from the keeper and answers the
queue: a restart delays answers by the gap, loses none and changes no rule.

It runs `python -m meshctl.keeper SOCKET`, listening on a unix SEQPACKET socket (0600, in
the controller's state directory). Each message is JSON, with descriptors attached:
    {"op": "put", "tag": T, "info": {...}} + fds   keep these sockets under T (replacing any)
    {"op": "drop", "tag": T}                        close T's sockets
    {"op": "list"}      answered by one {"tag", "info"} + fds per tag, then {"end": true}
It closes a tag's sockets once the file named in its info's "namespace" is gone (the task's
namespace was deleted: its sockets must not keep it alive), and exits
when it holds nothing and no controller is connected.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

MAX_MESSAGE = 65536
MAX_FDS = 8
CHECK_SECONDS = 1.0  # how often the keeper looks for namespaces that are gone
START_SECONDS = 10.0


class KeeperError(Exception):
    """The keeper could not be reached or started."""


@dataclass
class Kept:
    """One tag's sockets and what the controller said about them."""

    info: dict[str, Any]
    fds: list[int] = field(default_factory=list)


# -- the keeper process ---------------------------------------------------------------------------


class Keeper:
    """What the keeper holds, by tag, and how it answers one message."""

    def __init__(self) -> None:
        self.kept: dict[str, Kept] = {}

    def handle(self, conn: socket.socket, message: dict[str, Any], fds: list[int]) -> None:
        op = message.get("op")
        tag = str(message.get("tag", ""))
        if op == "put" and tag:
            self.drop(tag)
            self.kept[tag] = Kept(dict(message.get("info") or {}), fds)
            return
        for fd in fds:  # descriptors sent with anything else are not kept
            os.close(fd)
        if op == "drop":
            self.drop(tag)
        elif op == "list":
            for name, kept in sorted(self.kept.items()):
                socket.send_fds(conn, [_encode({"tag": name, "info": kept.info})], kept.fds)
            conn.send(_encode({"end": True}))

    def drop(self, tag: str) -> None:
        kept = self.kept.pop(tag, None)
        for fd in kept.fds if kept else ():
            os.close(fd)

    def forget_gone_namespaces(self) -> None:
        for tag, kept in list(self.kept.items()):
            path = kept.info.get("namespace")
            if path and not os.path.exists(path):
                self.drop(tag)


def main(path: str) -> None:
    """Listen, then go on in a child that nobody waits for (the controller's start returns
    once the socket is there, and no zombie keeper is left to it)."""
    listener = _listen(path)
    if os.fork():
        os._exit(0)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):  # the starter waits for its end of these to close
        os.dup2(devnull, fd)
    serve(listener, path)


def serve(listener: socket.socket, path: str) -> None:
    """The keeper's loop: accept controllers, answer their messages, until it holds nothing
    and none is connected."""
    keeper = Keeper()
    clients: list[socket.socket] = []
    checked = time.monotonic()
    while True:
        readable, _, _ = select.select([listener, *clients], [], [], CHECK_SECONDS)
        for sock in readable:
            if sock is listener:
                clients.append(listener.accept()[0])
                continue
            try:
                data, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, MAX_FDS)
            except OSError:
                data, fds = b"", []
            if not data:
                clients.remove(sock)
                sock.close()
                continue
            with contextlib.suppress(OSError, ValueError):
                keeper.handle(sock, json.loads(data), fds)
        if time.monotonic() - checked >= CHECK_SECONDS:
            keeper.forget_gone_namespaces()
            checked = time.monotonic()
        if not keeper.kept and not clients:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return


def _listen(path: str) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # a dead keeper's: nobody listens on it any more
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    old = os.umask(0o177)  # 0600: the socket hands out DNS sockets of every task
    try:
        listener.bind(path)
    finally:
        os.umask(old)
    listener.listen(8)
    return listener


def _encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message).encode()


# -- the controller's side ------------------------------------------------------------------------


class KeeperClient:
    """The controller's connection to its node's keeper, started if none runs."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._conn: socket.socket | None = None

    def connect(self) -> None:
        """Reach the running keeper, or start one (in a session of its own) and reach it."""
        if self._conn is not None:
            return
        with contextlib.suppress(OSError):
            self._conn = _connect(self.path)
            return
        try:
            started = subprocess.run(
                [sys.executable, "-m", "meshctl.keeper", self.path],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,  # as tasks: a signal to the controller's group spares it
                timeout=START_SECONDS,
                check=False,
            )
        except subprocess.SubprocessError as err:
            raise KeeperError(f"cannot start the socket keeper: {err}") from None
        try:
            self._conn = _connect(self.path)
        except OSError as err:
            why = started.stderr.decode(errors="replace").strip().splitlines()[-1:] or [str(err)]
            raise KeeperError(f"cannot start the socket keeper: {why[0]}") from None

    def put(self, tag: str, info: dict[str, Any], socks: list[socket.socket]) -> None:
        socket.send_fds(
            self._connected(),
            [_encode({"op": "put", "tag": tag, "info": info})],
            [s.fileno() for s in socks],
        )

    def drop(self, tag: str) -> None:
        self._connected().send(_encode({"op": "drop", "tag": tag}))

    def take(self) -> list[tuple[str, dict[str, Any], list[socket.socket]]]:
        """Every tag the keeper holds, with its info and its sockets (duplicates: the keeper
        keeps its own until told to drop them)."""
        conn = self._connected()
        conn.send(_encode({"op": "list"}))
        taken: list[tuple[str, dict[str, Any], list[socket.socket]]] = []
        while True:
            data, fds, _, _ = socket.recv_fds(conn, MAX_MESSAGE, MAX_FDS)
            if not data:
                raise KeeperError("the socket keeper closed the connection")
            message = json.loads(data)
            if message.get("end"):
                return taken
            socks = [socket.socket(fileno=fd) for fd in fds]
            taken.append((message["tag"], message["info"], socks))

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _connected(self) -> socket.socket:
        self.connect()
        assert self._conn is not None
        return self._conn


def _connect(path: str) -> socket.socket:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        conn.connect(path)
    except OSError:
        conn.close()
        raise
    return conn


if __name__ == "__main__":
    main(sys.argv[1])
