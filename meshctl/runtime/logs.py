"""Task logs kept to a bounded size: rotated by the controller, the way logrotate's copytruncate
does it.

A task outlives its controller and writes straight into its log file (opened O_APPEND, see
process.start), so the file cannot be renamed under it: the controller copies the log to
`log.1` (older copies move up to `log.2`...) and empties `log` in place, and the task's next
write lands at the new end. As with copytruncate, a line written between the copy and the
truncation is lost. Readers take the files oldest first: log.N ... log.1, log.

When lines were written (`service logs --timestamps`, `--since`): the task writes nothing but
its bytes, so the controller notes, a few times a second (LogClock), each log's new size with
its modification time in `log.times` (`SIZE MTIME` lines, rotated along with the log). A line
ending at or before a noted size was written at or before that time: its stamp is the time of
the first such note, so it is at most one look late (the last line of a burst is exact).
Lines written while no controller ran get the time it came back and saw them.

`service logs` reads them with read_log: whole lines only (a partial last line waits for its
end), across a rotation that happened between two reads.
"""

from __future__ import annotations

import bisect
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import BinaryIO

from meshctl import naming

log = logging.getLogger("meshctl.runtime")

LOG_MAX_BYTES = 10 * 1024 * 1024  # a log past this size is rotated
LOG_KEEP = 3  # files kept per task, the live one included: log, log.1, log.2
_CHUNK = 1 << 16
TIMES = ".times"  # beside each log file: when it reached each size


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
            for suffix in ("", TIMES):
                if os.path.exists(source + suffix):
                    os.replace(source + suffix, target + suffix)
        if older:
            start = _copy_tail(path, older[-1], max_bytes)
            _write_times(older[-1] + TIMES, [
                (size - start, when) for size, when in read_times(path) if size > start
            ])  # fmt: skip
        os.truncate(path, 0)
        _write_times(path + TIMES, [])
    except OSError as err:
        log.warning("log %s: cannot rotate: %s", path, err)
        return False
    return True


def _copy_tail(source: str, target: str, max_bytes: int) -> int:
    """Copy source to target through a temporary file, so a reader never sees half a copy;
    returns the offset in source the copy starts at.

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
            start += newline if newline >= 0 else 0
            first = first[newline + 1 :] if newline >= 0 else first[1:]
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, stat.st_mode & 0o777)
        with open(fd, "wb") as dst:
            dst.write(first)
            # To the end as it was when opened, then once more to the end as it is now: what
            # the task wrote meanwhile is kept, and a fast writer cannot keep the copy going.
            _copy_to(src, dst, stat.st_size)
            _copy_to(src, dst, os.fstat(src.fileno()).st_size)
    os.replace(temporary, target)
    return start


def _copy_to(src: BinaryIO, dst: BinaryIO, end: int) -> None:
    while src.tell() < end and (chunk := src.read(min(_CHUNK, end - src.tell()))):
        dst.write(chunk)


def read_times(path: str) -> list[tuple[int, float]]:
    """The (size, time) notes of the log at path, in order ([] if none)."""
    try:
        with open(path + TIMES, encoding="ascii") as f:
            notes = [line.split() for line in f]
    except (OSError, UnicodeError):
        return []
    out = []
    for note in notes:
        try:
            out.append((int(note[0]), float(note[1])))
        except (IndexError, ValueError):
            continue  # a half-written last note
    return out


def _write_times(path: str, notes: list[tuple[int, float]]) -> None:
    """The notes file at path holds notes (none: no file)."""
    if not notes:
        if os.path.exists(path):
            os.remove(path)
        return
    with open(path, "w", encoding="ascii") as f:
        f.writelines(f"{size} {when:.6f}\n" for size, when in notes)


def line_time(notes: list[tuple[int, float]], end: int, fallback: float) -> float:
    """When the line ending at byte offset end was written at the latest: the first note at or
    past it, else fallback (the file's modification time)."""
    index = bisect.bisect_left(notes, (end, -1.0))
    return notes[index][1] if index < len(notes) else fallback


class LogClock:
    """Notes the logs' growth (see the module's docstring); rotation goes through it too, so
    a note and a rotation of one log never interleave."""

    def __init__(self) -> None:
        self._sizes: dict[str, int] = {}
        self._lock = threading.Lock()

    def note(self, paths: list[str]) -> None:
        with self._lock:
            for path in paths:
                self._note(path)
            for gone in set(self._sizes) - set(paths):
                del self._sizes[gone]

    def _note(self, path: str) -> None:
        try:
            stat = os.stat(path)
        except OSError:
            return
        known = self._sizes.get(path)
        if known is None:
            notes = read_times(path)
            known = notes[-1][0] if notes else 0
        if stat.st_size < known:
            known = 0  # emptied (rotated): its notes were moved along
        if stat.st_size > known:
            try:
                with open(path + TIMES, "a", encoding="ascii") as f:
                    f.write(f"{stat.st_size} {stat.st_mtime:.6f}\n")
            except OSError as err:
                log.warning("log %s: cannot note its times: %s", path, err)
                return
        self._sizes[path] = stat.st_size

    def rotate(self, path: str, max_bytes: int, keep: int) -> bool:
        """rotate_log, after noting what the log holds now."""
        with self._lock:
            self._note(path)
            rotated = rotate_log(path, max_bytes, keep)
            if rotated:
                self._sizes[path] = 0
            return rotated


def task_log_path(state_dir: str, task_id: str) -> str:
    """Where the runtime writes a task's output: <state-dir>/tasks/<task-id>/log."""
    return os.path.join(naming.task_dir(state_dir, task_id), "log")


Line = tuple[str, float]  # a log line's text and when it was written (0.0: not asked)
FOLLOW_INTERVAL = 0.5  # seconds between two reads of a followed log


def task_log_lines(
    state_dir: str,
    tasks: Callable[[], list[tuple[str, str]]],
    *,
    follow: bool = False,
    tail: int | None = None,
    since: float | None = None,
    timed: bool = False,
) -> Iterator[tuple[str, str, float]]:
    """(label, line, when written) for the lines of the tasks' logs (`service logs`): all of
    each (its last `tail`), then, following, the lines written after, read again every
    FOLLOW_INTERVAL. tasks() gives the (task id, label) pairs to read, asked before each read,
    so tasks that come while following are read from their start."""
    offsets: dict[str, int] = {}
    first = True
    while first or follow:
        if not first:
            time.sleep(FOLLOW_INTERVAL)
        for task_id, label in tasks():
            offset = None if first else offsets.get(task_id, 0)
            lines, offsets[task_id] = read_log(
                task_log_path(state_dir, task_id),
                offset,
                tail=tail if first else None,
                since=since,
                timed=timed,
            )
            for line, when in lines:
                yield label, line, when
        first = False


def read_log(
    path: str,
    offset: int | None,
    *,
    tail: int | None = None,
    since: float | None = None,
    timed: bool = False,
) -> tuple[list[Line], int]:
    """The complete lines of the log at path from byte offset on (None: all of it, its rotated
    files first), each with when it was written if timed (or since is given); only those
    written since `since`, the last `tail` of them. Also the offset to read on from."""
    timed = timed or since is not None
    earlier: list[tuple[str, int, bytes]] = []  # (file, offset, bytes): lines of rotated files
    if offset is None:
        earlier = [(p, 0, _read_from(p, 0) or b"") for p in rotated_paths(path)]
        offset = 0
    elif os.path.exists(path) and os.path.getsize(path) < offset:
        # Rotated (copied to log.1 and emptied) since the last read: log.1's rest comes first.
        rotated = rotated_paths(path)[-1]
        earlier = [(rotated, offset, _read_from(rotated, offset) or b"")]
        offset = 0
    data = _read_from(path, offset)
    if data is None:
        return [], offset
    complete = data[: data.rfind(b"\n") + 1]  # a partial last line waits for its end
    lines: list[Line] = []
    for file, start, chunk in [*earlier, (path, offset, complete)]:
        lines += _timed_lines(file, start, chunk, timed)
    if since is not None:
        lines = [(line, when) for line, when in lines if when >= since]
    if tail is not None:
        lines = lines[-tail:] if tail else []
    return lines, offset + len(complete)


def _timed_lines(file: str, start: int, chunk: bytes, timed: bool) -> list[Line]:
    """The lines of chunk (read from file at offset start), each with when it was written
    (0.0 unless timed); a last line without its newline (a rotated file's cut) counts."""
    notes = read_times(file) if timed else []
    fallback = os.path.getmtime(file) if timed and os.path.exists(file) else 0.0
    out, end = [], start
    for raw in chunk.split(b"\n")[: -1 if chunk.endswith(b"\n") else None]:
        end += len(raw) + 1
        text = raw.decode(errors="replace").removesuffix("\r")
        out.append((text, line_time(notes, end - 1, fallback) if timed else 0.0))
    return out if chunk else []


def _read_from(path: str, offset: int) -> bytes | None:
    """The bytes of a log file from offset on; None if it does not exist (yet)."""
    try:
        with open(path, "rb") as log:
            log.seek(offset)
            return log.read()
    except FileNotFoundError:
        return None
