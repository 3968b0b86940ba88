"""Durations as Docker writes them (Go's time.ParseDuration: `500ms`, `5s`, `1m30s`), in seconds.

The model keeps durations as float seconds; the CLI parses user text here and prints it back
in the same notation so `inspect` shows what the user typed.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

# Longest units first so `ms` is not read as `m` followed by garbage.
_UNITS: dict[str, float] = {
    "h": 3600.0,
    "m": 60.0,
    "s": 1.0,
    "ms": 1e-3,
    "us": 1e-6,
    "µs": 1e-6,
    "ns": 1e-9,
}
# ASCII digits only: \d would also take other scripts' digits, which float() reads.
_PART = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ns|us|µs|ms|s|m|h)")
# Go's durations are int64 nanoseconds: about 292 years, as Docker accepts at most.
MAX_SECONDS = (2**63 - 1) / 1e9


class DurationError(ValueError):
    """Text that is not a Docker/Go duration."""


def parse_duration(text: str, field: str = "duration") -> float:
    """Seconds in `text` (`1m30s` → 90.0); `0` alone needs no unit, as in Go."""
    value = text.strip()
    if value == "0":
        return 0.0
    pos, total = 0, 0.0
    while pos < len(value):
        match = _PART.match(value, pos)
        if match is None:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if not value or pos != len(value):
        raise DurationError(f"invalid {field} {text!r}: write a duration like 500ms, 5s or 1m30s")
    if not total <= MAX_SECONDS:  # also catches inf from hundreds of digits
        raise DurationError(
            f"invalid {field} {text!r}: that is too long; use at most {MAX_SECONDS // 3600:.0f}h"
        )
    return total


def format_duration(seconds: float) -> str:
    """The shortest Go-style text for `seconds` (90.0 → `1m30s`, 0.5 → `500ms`)."""
    if seconds == 0:
        return "0s"
    if seconds < 1:
        for unit in ("ms", "us", "ns"):
            amount = seconds / _UNITS[unit]
            if amount >= 1 or unit == "ns":
                return f"{_trim(amount)}{unit}"
    hours, rest = divmod(seconds, 3600.0)
    minutes, secs = divmod(rest, 60.0)
    text = ""
    if hours:
        text += f"{int(hours)}h"
    if hours or minutes:
        text += f"{int(minutes)}m"
    return text + f"{_trim(secs)}s"


def _trim(amount: float) -> str:
    """A number without a trailing `.0` and without float noise (0.1+0.2 → 0.3)."""
    return f"{round(amount, 6):g}"


class TimeError(ValueError):
    """Text that is neither a timestamp nor a duration."""


def parse_time(text: str, now: float, field: str = "time") -> float:
    """A point in time as Docker's --since/--until take it: a duration back from now (`10m`),
    Unix seconds (`1700000000.5`) or an RFC 3339 date or time (`2024-05-01T10:00:00Z`; without
    a zone, UTC)."""
    value = text.strip()
    if re.fullmatch(r"[0-9]{1,12}(\.[0-9]{1,9})?", value):
        return float(value)
    try:
        return now - parse_duration(value, field)
    except DurationError:
        pass
    try:
        stamp = datetime.fromisoformat(value.replace("z", "Z"))
    except ValueError:
        raise TimeError(
            f"invalid {field} {text!r}: give a duration back from now (10m), Unix seconds or an "
            "RFC 3339 time (2024-05-01T10:00:00Z)"
        ) from None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=UTC)
    return stamp.timestamp()


def format_time(seconds: float) -> str:
    """RFC 3339 in UTC with nanoseconds, as `docker events` prints times."""
    stamp = datetime.fromtimestamp(seconds, UTC)
    nanos = round((seconds - int(seconds)) * 1e9) % 1_000_000_000
    return stamp.strftime("%Y-%m-%dT%H:%M:%S") + f".{nanos:09d}Z"
