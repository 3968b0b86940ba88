"""Network namespaces: create, delete, list, and run code inside one without moving the process.

A namespace is named by its name under /var/run/netns, by an absolute path (/proc/PID/ns/net,
a bind mount made by another runtime), or by None: the namespace this process runs in (the node).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from pyroute2 import netns as _pr_netns

from kernel.errors import NotFound, calling, deleting

NETNS_DIR = "/var/run/netns"

T = TypeVar("T")
Namespace = str | None


def path(ns: str) -> str:
    """The filesystem path of a namespace given by name or path."""
    return ns if ns.startswith("/") else os.path.join(NETNS_DIR, ns)


def exists(ns: str) -> bool:
    return os.path.exists(path(ns))


def list_namespaces(prefix: str = "") -> list[str]:
    """Names of the namespaces under /var/run/netns that start with prefix, sorted."""
    try:
        names = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith(prefix))


def create(name: str) -> None:
    """Ensure a named namespace exists; creating one that exists is a no-op."""
    if exists(name):
        return
    with calling(f"create netns {name}"):
        _pr_netns.create(name)


def delete(name: str) -> None:
    """Remove a named namespace; removing a missing one is a no-op.

    The namespace itself lives on while a process or socket still holds it: callers stop their
    processes first.
    """
    with deleting(f"delete netns {name}"):
        _pr_netns.remove(name)


def run_in(ns: Namespace, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call fn inside namespace ns and return its result (or raise its exception).

    setns(2) for CLONE_NEWNET changes only the calling thread, so the call runs in a fresh
    thread that enters ns and ends with it: the process never moves by accident. The namespace is
    opened without the create flag (flags=0), so a misspelt name fails instead of making one.
    ns=None runs fn here, in the current namespace.
    """
    if ns is None:
        return fn(*args, **kwargs)
    nspath = path(ns)
    if not os.path.exists(nspath):
        raise NotFound(f"network namespace {ns} does not exist")
    outcome: dict[str, Any] = {}

    def body() -> None:
        try:
            with calling(f"enter netns {ns}"):
                _pr_netns.setns(nspath, flags=0)
            outcome["value"] = fn(*args, **kwargs)
        except BaseException as err:  # carried to the caller's thread
            outcome["error"] = err

    worker = threading.Thread(target=body, name=f"netns:{ns}", daemon=True)
    worker.start()
    worker.join()
    if "error" in outcome:
        raise outcome["error"]
    value: T = outcome["value"]
    return value


def inode(ns: Namespace) -> int:
    """The namespace's inode number: equal inodes mean the same namespace."""
    return os.stat(path(ns) if ns is not None else "/proc/thread-self/ns/net").st_ino


class NetnsAPI(Protocol):
    """Named namespaces: what kernel.fake.world.FakeNetns implements in memory."""

    def create(self, name: str) -> None: ...
    def delete(self, name: str) -> None: ...
    def exists(self, name: str) -> bool: ...
    def list_namespaces(self, prefix: str = "") -> list[str]: ...


class Netns:
    """The namespace verbs as an object, so callers can be handed the fake instead (kernel.fake)."""

    create = staticmethod(create)
    delete = staticmethod(delete)
    exists = staticmethod(exists)
    list_namespaces = staticmethod(list_namespaces)
