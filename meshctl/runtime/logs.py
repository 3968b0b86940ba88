"""Task logs kept to a bounded size: rotated by the controller, the way logrotate's copytruncate
does it.

A task outlives its controller and writes straight into its log file (opened O_APPEND, see
process.start), so the file cannot be renamed under it: the controller copies the log to
`log.1` (older copies move up to `log.2`...) and empties `log` in place, and the task's next
write lands at the new end. As with copytruncate, a line written between the copy and the
truncation is lost. Readers take the files oldest first: log.N ... log.1, log.
"""

from __future__ import annotations

import logging
import os
from typing import BinaryIO

log = logging.getLogger("meshctl.runtime")

LOG_MAX_BYTES = 10 * 1024 * 1024  # a log past this size is rotated
LOG_KEEP = 3  # files kept per task, the live one included: log, log.1, log.2
_CHUNK = 1 << 16


def rotated_paths(path: str, keep: int = LOG_KEEP) -> list[str]:
    """The rotated copies of the log at path, oldest first (path.{keep-1} ... path.1)."""
    return [f"{path}.{index}" for index in range(keep - 1, 0, -1)]


def rotate_log(path: str, max_bytes: int, keep: int) -> bool:
    """Rotate the log at path if it has grown past max_bytes; True if it did.

    Keeps at most `keep` files (keep=1: the log is only emptied); a copy holds at most the last
    max_bytes, from a line start. Never raises: a log that cannot be rotated now (disk full)
    is tried again on the next call, and the failure is logged.
    """
    try:
        if os.stat(path).st_size <= max_bytes:
            return False
    except FileNotFoundError:
        return False  # the task has written nothing yet
    except OSError as err:
        log.warning("log %s: cannot rotate: %s", path, err)
        return False
    try:
        older = rotated_paths(path, keep)  # oldest first: each moves one place older
        for source, target in zip(older[1:], older, strict=False):
            if os.path.exists(source):
                os.replace(source, target)
        if older:
            _copy_tail(path, older[-1], max_bytes)
        os.truncate(path, 0)
    except OSError as err:
        log.warning("log %s: cannot rotate: %s", path, err)
        return False
    return True


def _copy_tail(source: str, target: str, max_bytes: int) -> None:
    """Copy source to target through a temporary file, so a reader never sees half a copy.

    A log that grew past twice max_bytes since the last look (a task flooding it) keeps only
    its last max_bytes, from a line start: the copies stay bounded.
    """
    temporary = f"{target}.tmp"
    with open(source, "rb") as src:
        stat = os.fstat(src.fileno())
        start = stat.st_size - max_bytes if stat.st_size > 2 * max_bytes else 0
        src.seek(max(0, start - 1))
        first = src.read(_CHUNK)
        if start > 0:
            # From the first line start at or after `start` (the byte before it tells); a
            # line longer than the chunk is kept cut rather than dropped whole.
            newline = first.find(b"\n")
            first = first[newline + 1 :] if newline >= 0 else first[1:]
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, stat.st_mode & 0o777)
        with open(fd, "wb") as dst:
            dst.write(first)
            # To the end as it was when opened, then once more to the end as it is now: what
            # the task wrote meanwhile is kept, and a fast writer cannot keep the copy going.
            _copy_to(src, dst, stat.st_size)
            _copy_to(src, dst, os.fstat(src.fileno()).st_size)
    os.replace(temporary, target)


def _copy_to(src: BinaryIO, dst: BinaryIO, end: int) -> None:
    while src.tell() < end and (chunk := src.read(min(_CHUNK, end - src.tell()))):
        dst.write(chunk)
