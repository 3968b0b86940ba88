"""The kernel as the controller uses it, every call counted for /metrics by subsystem, whether
it read or wrote, and its result, without a line in kernel/ or in the reconcilers: the daemon
wraps each subsystem of its Kernel in a proxy that counts the calls made through it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from kernel.errors import NotFound
from kernel.system import Kernel

# Verbs that only look: their calls count as reads, every other one as a write.
READ_VERBS = frozenset({"get", "list", "exists", "snapshot", "count", "available", "bound"})
Count = Callable[[str, str, str], None]  # (subsystem, op: read|write, result: ok|not_found|error)


class _Counted:
    """A subsystem whose public methods report each call to count."""

    def __init__(self, inner: object, subsystem: str, count: Count) -> None:
        self._inner = inner
        self._subsystem = subsystem
        self._count = count

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if name.startswith("_") or not callable(attr):
            return attr
        op = "read" if name.split("_")[0] in READ_VERBS else "write"
        subsystem, count = self._subsystem, self._count

        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                result = attr(*args, **kwargs)
            except NotFound:
                count(subsystem, op, "not_found")
                raise
            except Exception:
                count(subsystem, op, "error")
                raise
            count(subsystem, op, "ok")
            return result

        return call


def counted(kernel: Kernel, count: Count) -> Kernel:
    """The same kernel, each subsystem's calls reported to count."""
    wrapped: dict[str, Any] = {
        f.name: _Counted(getattr(kernel, f.name), f.name, count) for f in dataclasses.fields(kernel)
    }
    return dataclasses.replace(kernel, **wrapped)
