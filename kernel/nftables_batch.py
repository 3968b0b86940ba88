"""nf_tables netlink batches sent from this process: begin, the messages, end, in one write,
which the kernel applies as one transaction (all or nothing, as `nft -f` does); each message's
errno is read back by its sequence number, so a refusal names the object it was about.

The kernel handles the whole batch inside the write (nfnetlink) and answers after: an error for
each message it refused (any refusal aborts the batch), an error on the begin message if the
commit itself failed, and, asked by NLM_F_ACK on the last message only, one ack that says the
answers are complete. Asking every message for an ack would queue one socket buffer per message
(hundreds of bytes each), which a full sync of 100,000 messages would overflow.
"""

from __future__ import annotations

import errno
import itertools
import os
import socket
import threading
from collections.abc import Sequence

from kernel import netns
from kernel.errors import KernelError, translate
from kernel.netlink import ANSWER_TIMEOUT, NETLINK_CAP_ACK, SOL_NETLINK, read_acks
from kernel.nftables_messages import (
    NFNL_MSG_BATCH_BEGIN,
    NFNL_MSG_BATCH_END,
    NLM_F_ACK,
    Message,
    batch_marker,
)

NETLINK_NETFILTER = 12
SO_SNDBUFFORCE = 32
RECEIVE_BUFFER = 1 << 20
_SEQ = itertools.count(1)
_SEQ_LOCK = threading.Lock()


def frame(messages: Sequence[Message]) -> tuple[bytes, int]:
    """The batch of messages in one buffer, and the sequence number of its begin (message i
    has begin + 1 + i; the last asks for an ack)."""
    with _SEQ_LOCK:
        begin = next(_SEQ) & 0x7FFFFFFF
        for _ in range(len(messages) + 1):
            next(_SEQ)
    parts = [batch_marker(NFNL_MSG_BATCH_BEGIN, begin)]
    last = len(messages) - 1
    for index, message in enumerate(messages):
        parts.append(message.encode(begin + 1 + index, NLM_F_ACK if index == last else 0))
    parts.append(batch_marker(NFNL_MSG_BATCH_END, begin + len(messages) + 1))
    return b"".join(parts), begin


def write_batch(ns: netns.Namespace, messages: Sequence[Message], what: str) -> None:
    """Apply messages as one transaction in ns; a refused one changes nothing and raises a
    KernelError naming the first message the kernel refused (`what` says what was being done)."""
    if not messages:
        return
    data, begin = frame(messages)
    where = f"{what} in netns {ns or '(node)'}"
    codes = netns.run_in(ns, _exchange, data, begin, len(messages), where)
    if codes.get(begin):
        raise _refused(where, "commit the transaction", codes[begin])
    refused = sorted(seq for seq, code in codes.items() if code and seq != begin)
    if refused:
        first = refused[0]
        more = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
        raise _refused(where, messages[first - begin - 1].what + more, codes[first])


def _refused(where: str, what: str, code: int) -> KernelError:
    refusal = OSError(code, os.strerror(code))
    return translate(refusal, f"{where}: the kernel refused to {what} (nothing was changed)")


def _exchange(data: bytes, begin: int, count: int, where: str) -> dict[int, int]:
    """Send one batch on a fresh nfnetlink socket of this thread's namespace; the errno of each
    sequence number the kernel answered (0: done) up to the ack of the last message."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER) as sock:
        _size(sock, len(data))
        sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
        sock.bind((0, 0))
        sock.settimeout(ANSWER_TIMEOUT)
        try:
            sock.send(data)
        except OSError as err:
            raise translate(err, f"{where}: sending {len(data)} bytes of nftables batch") from err
        last = begin + count
        codes: dict[int, int] = {}
        try:
            while last not in codes and not codes.get(begin):
                read_acks(sock.recv(1 << 16), begin, last, codes)
        except TimeoutError as err:
            raise KernelError(
                f"{where}: no answer to an nftables batch in {ANSWER_TIMEOUT} s; retry, and "
                "report it if it persists"
            ) from err
        except OSError as err:
            if err.errno != errno.ENOBUFS:
                raise translate(err, f"{where}: reading the kernel's answers") from err
            # Only refusals can fill the queue (a batch that passes answers once): it was
            # aborted, and its answers lost.
            raise KernelError(
                f"{where}: the kernel refused the transaction with more errors than could be "
                "read (nothing was changed)",
                errno.ENOBUFS,
            ) from err
        return codes


def has_table(ns: netns.Namespace, message: Message) -> bool:
    """Whether the table that a GETTABLE message names exists in ns."""

    def ask() -> int:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER) as sock:
            sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
            sock.bind((0, 0))
            sock.settimeout(ANSWER_TIMEOUT)
            sock.send(message.encode(1, NLM_F_ACK))
            codes: dict[int, int] = {}
            while 1 not in codes:
                read_acks(sock.recv(1 << 16), 1, 1, codes)
            return codes[1]

    where = f"looking up the nftables table in netns {ns or '(node)'}"
    code = netns.run_in(ns, ask)
    if code not in (0, errno.ENOENT):
        raise translate(OSError(code, os.strerror(code)), where)
    return code == 0


def _size(sock: socket.socket, length: int) -> None:
    """Room for the whole batch in one write, and for the answers."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
    wanted = length + (1 << 16)
    if wanted > sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, wanted)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, wanted)
