"""The errno table: which failures are "already done" and which become which typed error."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from contextlib import AbstractContextManager

import pytest
from pyroute2.netlink.exceptions import NetlinkError

from kernel.errors import (
    AlreadyExists,
    KernelError,
    NotFound,
    PermissionDenied,
    Unsupported,
    calling,
    deleting,
    ensuring,
)

Guard = Callable[[str], AbstractContextManager[None]]


def fail(err: BaseException, guard: Guard) -> None:
    with guard("add thing x"):
        raise err


@pytest.mark.parametrize("make", [lambda c: OSError(c, os.strerror(c)), lambda c: NetlinkError(c)])
def test_ensure_of_an_existing_object_is_done(make: Callable[[int], BaseException]) -> None:
    fail(make(errno.EEXIST), ensuring)  # no exception


@pytest.mark.parametrize("code", [errno.ENOENT, errno.ESRCH, errno.EADDRNOTAVAIL, errno.ENODEV])
def test_delete_of_a_missing_object_is_done(code: int) -> None:
    fail(NetlinkError(code), deleting)
    fail(OSError(code, os.strerror(code)), deleting)


@pytest.mark.parametrize(
    ("code", "guard", "kind"),
    [
        (errno.ENOENT, ensuring, NotFound),
        (errno.ENODEV, calling, NotFound),
        (errno.ESRCH, ensuring, NotFound),
        (errno.EEXIST, calling, AlreadyExists),
        (errno.EEXIST, deleting, AlreadyExists),
        (errno.EPERM, ensuring, PermissionDenied),
        (errno.EACCES, deleting, PermissionDenied),
        (errno.EOPNOTSUPP, calling, Unsupported),
        (errno.EAFNOSUPPORT, ensuring, Unsupported),
        (errno.EINVAL, deleting, KernelError),
        (errno.ENETUNREACH, calling, KernelError),
    ],
)
def test_other_failures_become_typed_errors(
    code: int, guard: Guard, kind: type[KernelError]
) -> None:
    for err in (NetlinkError(code), OSError(code, os.strerror(code))):
        with pytest.raises(kind) as raised:
            fail(err, guard)
        assert type(raised.value) is kind
        assert raised.value.code == code
        assert str(raised.value).startswith(f"add thing x: {errno.errorcode[code]}")
        assert raised.value.__cause__ is err


def test_messages_say_what_to_do() -> None:
    with pytest.raises(PermissionDenied, match="run as root"):
        fail(NetlinkError(errno.EPERM), calling)
    with pytest.raises(Unsupported, match="kernel lacks this feature"):
        fail(NetlinkError(errno.EOPNOTSUPP), calling)


def test_other_exceptions_pass_through_untouched() -> None:
    for guard in (ensuring, deleting, calling):
        with pytest.raises(ValueError, match="not a kernel error"):
            fail(ValueError("not a kernel error"), guard)
