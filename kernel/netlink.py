"""Netlink requests in batches: many per write, each request's errno read back by sequence number.

For the verbs that take thousands of objects at once (VIP addresses in kernel.links, IPVS
entries in kernel.ipvs, neighbour and FDB entries in kernel.neighbours). pyroute2 encodes the
messages; this module moves them, and patches requests that differ only in a few fields into a
template pyroute2 encoded (`Templates`).
"""

from __future__ import annotations

import errno
import ipaddress
import itertools
import socket
import struct
from collections.abc import Callable, Hashable, Iterable, Iterator
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any

from pyroute2.netlink import NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST
from pyroute2.netlink.exceptions import NetlinkError

from kernel.errors import KernelError, calling, translate

NLMSG_ERROR = 2  # the type of an ack: an errno (0 = done) and the request's header
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10  # acks of failed requests leave out the request: smaller acks
# Requests per write. The kernel handles a whole write before we read, so every ack of it must fit
# in the receive buffer: 256 acks take about 200 KB, under the 425 KB that Linux grants for
# RECEIVE_BUFFER even where net.core.rmem_max is at its default (and a write whose acks are
# dropped anyway is redone request by request, see NetlinkBatch.run).
BATCH_SIZE = 256
RECEIVE_BUFFER = SEND_BUFFER = 1 << 20
ANSWER_TIMEOUT = 60.0  # seconds for the acks of one write; a lost ack must not hang the caller
ADD_FLAGS = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL  # pyroute2's "add"
REPLACE_FLAGS = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE  # pyroute2's "replace"
DELETE_FLAGS = NLM_F_REQUEST | NLM_F_ACK


class NetlinkBatch:
    """A netlink socket of the calling thread's namespace that sends requests BATCH_SIZE per
    write and reads back each one's errno, matched by sequence number.

    pyroute2 encodes the messages. Its own nlm_request_batch cannot say which request failed
    (noraise drops the errors, else the first one ends the reading) and its per-request machinery
    costs more than the kernel's work (0.2 ms per address against 0.12 ms here).
    """

    def __init__(self, protocol: int) -> None:
        with calling(f"open a netlink socket (protocol {protocol})"):
            self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, protocol)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
            self._sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
            self._sock.bind((0, 0))
            self._sock.settimeout(ANSWER_TIMEOUT)
        except OSError as err:
            self._sock.close()
            raise translate(err, "set up a netlink socket") from err
        self._seq = 0

    def __enter__(self) -> NetlinkBatch:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        err: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._sock.close()

    def run(self, messages: Iterable[bytes]) -> Iterator[int]:
        """Each message's errno (0: done), in order. Messages (encoded requests with NLM_F_ACK
        set; their sequence numbers are written here) are sent one chunk at a time as the codes
        are consumed, so a caller that raises at a failure sends nothing after its chunk.
        A chunk whose acks the kernel dropped (ENOBUFS) is sent again one message per write:
        every request here is an idempotent ensure or delete, so a repeat is safe."""
        it = iter(messages)
        while chunk := list(itertools.islice(it, BATCH_SIZE)):
            codes = self._send(chunk)
            if codes is None:
                codes = [code for msg in chunk for code in self._send([msg]) or [errno.ENOBUFS]]
            yield from codes

    def _send(self, chunk: list[bytes]) -> list[int] | None:
        """Send chunk in one write: the errnos, or None if acks were lost."""
        first = self._seq + 1
        self._seq += len(chunk)
        data = bytearray()
        for seq, msg in enumerate(chunk, first):
            data += msg
            struct.pack_into("=I", data, len(data) - len(msg) + 8, seq)  # nlmsghdr's nlmsg_seq
        self._sock.send(data)
        codes: dict[int, int] = {}
        try:
            while len(codes) < len(chunk):
                self._read(codes, first, self._seq)
        except TimeoutError as err:
            raise KernelError(
                f"the kernel answered {len(codes)} of {len(chunk)} netlink requests in "
                f"{ANSWER_TIMEOUT} s; retry, and report it if it persists"
            ) from err
        except OSError as err:
            if err.errno != errno.ENOBUFS:
                raise translate(err, "read netlink acks") from err
            self._drain()
            return None
        return [codes[seq] for seq in range(first, self._seq + 1)]

    def _drain(self) -> None:
        """Drop every queued ack: until its queue empties, a congested socket loses further
        acks without a word."""
        self._sock.settimeout(0)
        try:
            while True:
                self._sock.recv(1 << 16)
        except BlockingIOError:
            pass
        finally:
            self._sock.settimeout(ANSWER_TIMEOUT)

    def _read(self, codes: dict[int, int], first: int, last: int) -> None:
        """Read one datagram of acks into codes (seq → errno); acks of earlier chunks whose
        reading was cut short are ignored."""
        read_acks(self._sock.recv(1 << 16), first, last, codes)


def read_acks(data: bytes, first: int, last: int, codes: dict[int, int]) -> None:
    """The acks and errors of one datagram whose sequence numbers are first..last, into codes
    (seq → errno, 0 for an ack); any other message is skipped."""
    offset = 0
    while offset + 20 <= len(data):
        length, kind, _flags, seq, _pid = struct.unpack_from("=IHHII", data, offset)
        if kind == NLMSG_ERROR and first <= seq <= last:
            (code,) = struct.unpack_from("=i", data, offset + 16)
            codes[seq] = -code
        offset += max((length + 3) & ~3, 16)


def judged(guard: AbstractContextManager[None], code: int) -> None:
    """Judge a batched request's errno as guard (ensuring, deleting or calling with what was
    asked) judges a single call's: no error, "already done", or the typed KernelError."""
    if code:
        with guard:
            raise NetlinkError(code)


# The kinds of field a template leaves blank: how a value is packed, and two stand-in values
# whose packings differ in every byte, so where two encodings with them differ is exactly where
# the field goes.
_PACK: dict[str, Callable[[Any], bytes]] = {
    "ipv4": lambda value: ipaddress.IPv4Address(value).packed,
    "ipv6": lambda value: ipaddress.IPv6Address(value).packed,
    "u32": lambda value: struct.pack("=I", value),  # netlink integers are in host order
    "mac": lambda value: bytes.fromhex(value.replace(":", "")),
}
_STAND_INS: dict[str, tuple[Any, Any]] = {
    "ipv4": ("165.165.165.165", "90.90.90.90"),
    "ipv6": (":".join(["a5a5"] * 8), ":".join(["5a5a"] * 8)),
    "u32": (0xA5A5A5A5, 0x5A5A5A5A),
    "mac": ("a5:a5:a5:a5:a5:a5", "5a:5a:5a:5a:5a:5a"),
}

Field = tuple[str, Any]  # (kind, value)


def address_field(address: str) -> Field:
    """An IPv4 or IPv6 address as a template field."""
    return ("ipv4" if ipaddress.ip_address(address).version == 4 else "ipv6", address)


def mac_field(mac: str) -> Field:
    """A MAC address ("02:42:0a:00:00:01") as a template field."""
    return ("mac", mac)


class Templates:
    """Encoded requests that differ only in a few fixed-size fields (addresses, marks).

    pyroute2's encoder costs 0.1 to 0.3 ms a request natively and about 5 ms under the QEMU
    lane's emulation, more than the kernel's work. A shape's first request is encoded as it
    is (a single change costs one encoding). At its second, `encode(shape, values)` runs once
    with stand-in values and once more per field with that field's other stand-in, and every
    further request of the shape is that encoding with its values written where the field's
    two encodings differed. A shape whose fields cannot be told apart that way is encoded in
    full each time.
    """

    def __init__(self, encode: Callable[[Hashable, tuple[Any, ...]], bytes]) -> None:
        self._encode = encode
        self._seen: set[Hashable] = set()
        self._templates: dict[Hashable, tuple[bytes, tuple[tuple[int, ...], ...] | None]] = {}

    def request(self, shape: Hashable, fields: tuple[Field, ...]) -> bytes:
        kinds = tuple(kind for kind, _ in fields)
        key = (shape, kinds)
        if key not in self._templates:
            if key not in self._seen:
                self._seen.add(key)
                return self._encode(shape, tuple(value for _, value in fields))
            self._templates[key] = self._template(shape, kinds)
        data, spots = self._templates[key]
        if spots is None:
            return self._encode(shape, tuple(value for _, value in fields))
        out = bytearray(data)
        for (kind, value), places in zip(fields, spots, strict=True):
            packed = _PACK[kind](value)
            for at in places:
                out[at : at + len(packed)] = packed
        return bytes(out)

    def _template(
        self, shape: Hashable, kinds: tuple[str, ...]
    ) -> tuple[bytes, tuple[tuple[int, ...], ...] | None]:
        first = tuple(_STAND_INS[kind][0] for kind in kinds)
        data = self._encode(shape, first)
        spots = []
        for index, kind in enumerate(kinds):
            values = (*first[:index], _STAND_INS[kind][1], *first[index + 1 :])
            other = self._encode(shape, values)
            if len(other) != len(data):
                return data, None
            size = len(_PACK[kind](first[index]))
            differ = [i for i, (a, b) in enumerate(zip(data, other, strict=True)) if a != b]
            places = tuple(differ[::size])
            if not places or differ != [at + i for at in places for i in range(size)]:
                return data, None
            spots.append(places)
        return data, tuple(spots)
