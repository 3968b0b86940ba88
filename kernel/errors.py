"""The one place where errno becomes "already done" or a typed, readable exception."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager

from pyroute2.netlink.exceptions import NetlinkError

# An ensure that meets one of these finds the object already there: nothing to do.
ENSURE_DONE = frozenset({errno.EEXIST})
# A delete that meets one of these finds the object already gone: nothing to do.
DELETE_DONE = frozenset({errno.ENOENT, errno.ESRCH, errno.EADDRNOTAVAIL, errno.ENODEV})


class KernelError(Exception):
    """A kernel call failed; the message names the object and what to do next."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class NotFound(KernelError):
    """The object (or the namespace it should live in) does not exist."""


class AlreadyExists(KernelError):
    """The object exists with different properties than asked for."""


class Unsupported(KernelError):
    """The kernel lacks the feature (for example IPVS, or a module that cannot be loaded)."""


class PermissionDenied(KernelError):
    """The call needs root (CAP_NET_ADMIN)."""


def errno_of(err: BaseException) -> int | None:
    """The errno carried by an OSError or a pyroute2 NetlinkError, else None."""
    if isinstance(err, NetlinkError):
        return int(err.code)
    if isinstance(err, OSError):
        return err.errno
    return None


def translate(err: BaseException, what: str) -> KernelError:
    """Turn an OSError/NetlinkError into the matching typed exception with a readable message."""
    code = errno_of(err)
    reason = errno.errorcode.get(code, str(code)) if code is not None else type(err).__name__
    text = f"{what}: {reason} ({err})"
    if code in (errno.ENOENT, errno.ENODEV, errno.ESRCH):
        return NotFound(text, code)
    if code == errno.EEXIST:
        return AlreadyExists(text, code)
    if code in (errno.EPERM, errno.EACCES):
        return PermissionDenied(f"{text}; run as root (CAP_NET_ADMIN)", code)
    if code in (errno.EOPNOTSUPP, errno.EPROTONOSUPPORT, errno.EAFNOSUPPORT):
        return Unsupported(f"{text}; the kernel lacks this feature", code)
    return KernelError(text, code)


@contextmanager
def ensuring(what: str) -> Iterator[None]:
    """Run an ensure: "already exists" is success, any other failure a typed KernelError."""
    try:
        yield
    except (OSError, NetlinkError) as err:
        if errno_of(err) in ENSURE_DONE:
            return
        raise translate(err, what) from err


@contextmanager
def deleting(what: str) -> Iterator[None]:
    """Run a delete: "already gone" is success, any other failure a typed KernelError."""
    try:
        yield
    except (OSError, NetlinkError) as err:
        if errno_of(err) in DELETE_DONE:
            return
        raise translate(err, what) from err


@contextmanager
def calling(what: str) -> Iterator[None]:
    """Run any other kernel call: every failure becomes a typed KernelError."""
    try:
        yield
    except (OSError, NetlinkError) as err:
        raise translate(err, what) from err
