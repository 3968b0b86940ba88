"""DNS wire format for the hot path: find the question by byte slicing, render pre-encoded answers.

A known question is answered without a full parse: the reply is the query's ID and question
bytes around a header and answer section encoded once (by dnslib, in records.py). Anything
unusual returns None here and takes the slow path through dnslib.
"""

from __future__ import annotations

from dnslib import DNSError, DNSRecord

# Header flags (RFC 1035 4.1.1): the byte at offset 2 and the one at 3.
QR, AA, TC, RD = 0x80, 0x04, 0x02, 0x01
RA = 0x80
OPCODE_MASK = 0x78
RCODE_FORMERR, RCODE_SERVFAIL, RCODE_NOTIMP, RCODE_REFUSED = 1, 2, 4, 5

CLASS_IN = b"\x00\x01"
TYPE_OPT = b"\x00\x29"
# UDP size a client gets without EDNS (RFC 1035) and the size we advertise (DNS flag day 2020).
CLASSIC_UDP_SIZE = 512
OUR_EDNS_SIZE = 1232
# Our OPT record: root name, type OPT, our UDP size, extended rcode/version/flags 0, no options.
OPT_RR = b"\x00" + TYPE_OPT + OUR_EDNS_SIZE.to_bytes(2, "big") + b"\x00" * 6
TCP_LIMIT = 65535

# What a query header may carry for the hot path: one question, no answers or authority,
# no additional record or one (an OPT).
COUNTS_PLAIN = b"\x00\x01\x00\x00\x00\x00\x00\x00"
COUNTS_EDNS = b"\x00\x01\x00\x00\x00\x00\x00\x01"


def question_end(data: bytes) -> int | None:
    """Offset just past the first question (name, type, class), or None if it is not plain.

    Plain means uncompressed labels of at most 63 bytes: what every stub resolver sends.
    """
    i = 12
    n = len(data)
    while i < n:
        length = data[i]
        if length == 0:
            end = i + 5
            return end if end <= n else None
        if length > 63:
            return None
        i += length + 1
    return None


# Names of the query types and response codes metrics carry (CoreDNS's); other types count
# as "other", so a client sending every type cannot grow the label set.
QTYPE_NAMES = {1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 15: "MX", 16: "TXT", 28: "AAAA",
               33: "SRV", 35: "NAPTR", 64: "SVCB", 65: "HTTPS", 255: "ANY"}  # fmt: skip
RCODE_NAMES = ("NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED")


def query_type(data: bytes) -> str:
    """The name of a query's type for metrics ("other" for the rest and for malformed ones)."""
    qend = question_end(data)
    if qend is None:
        return "other"
    return QTYPE_NAMES.get(int.from_bytes(data[qend - 4 : qend - 2], "big"), "other")


def rcode_name(reply: bytes) -> str:
    """The name of a reply's response code (its numeric value past the common six)."""
    code = reply[3] & 0x0F if len(reply) >= 4 else RCODE_FORMERR
    return RCODE_NAMES[code] if code < len(RCODE_NAMES) else str(code)


def edns_size(data: bytes, qend: int) -> int | None:
    """The client's EDNS UDP size if data ends with one OPT record of version 0, else None."""
    if len(data) < qend + 11 or data[qend] != 0 or data[qend + 1 : qend + 3] != TYPE_OPT:
        return None
    rdlen = int.from_bytes(data[qend + 9 : qend + 11], "big")
    if data[qend + 6] != 0 or qend + 11 + rdlen != len(data):
        return None
    return int.from_bytes(data[qend + 3 : qend + 5], "big")


def udp_limit(size: int | None) -> int:
    """The largest UDP reply a client accepts: 512 without EDNS, else its advertised size."""
    return CLASSIC_UDP_SIZE if size is None else max(CLASSIC_UDP_SIZE, size)


class Answer:
    """One known question's reply, encoded once; rendered per query around its ID and question.

    headers holds the 10 header bytes after the ID for each (RD, EDNS, TC) combination. A
    rotated answer (dnsrr, tasks.*) holds fixed-size A records and starts each reply one record
    further on, so clients that take the first address spread over the tasks.
    """

    __slots__ = ("headers", "records", "rotate_step", "turn")

    def __init__(self, an: int, ar: int, records: bytes, rotate_step: int = 0) -> None:
        self.records = records
        self.rotate_step = rotate_step
        self.turn = 0
        headers = []
        for index in range(8):
            rd, edns, tc = index & 1, (index >> 1) & 1, (index >> 2) & 1
            flags = bytes((QR | AA | (TC if tc else 0) | rd, RA))
            counts = (1, 0 if tc else an, 0, (0 if tc else ar) + edns)
            headers.append(flags + b"".join(c.to_bytes(2, "big") for c in counts))
        self.headers = tuple(headers)

    def render(self, ident: bytes, rd: int, question: bytes, size: int | None, limit: int) -> bytes:
        """The reply: truncated (TC, no records) when it would exceed limit bytes."""
        records = self.records
        if self.rotate_step:
            turn = self.turn
            self.turn = turn + 1
            cut = (turn * self.rotate_step) % len(records)
            records = records[cut:] + records[:cut]
        edns = 0 if size is None else 2
        opt = b"" if size is None else OPT_RR
        if 12 + len(question) + len(records) + len(opt) > limit:
            return ident + self.headers[rd | edns | 4] + question + opt
        return ident + self.headers[rd | edns] + question + records + opt


def error_reply(data: bytes, rcode: int) -> bytes:
    """A reply with rcode for a query dnslib could not use: its ID and question if it has one."""
    try:
        query = DNSRecord.parse(data)
    except (DNSError, ValueError, IndexError, KeyError, UnicodeError):
        return bytes((data[0], data[1], QR | (data[2] & (OPCODE_MASK | RD)), RA | rcode)) + bytes(8)
    reply = query.reply(ra=1, aa=0)
    reply.header.rcode = rcode
    return reply.pack()
