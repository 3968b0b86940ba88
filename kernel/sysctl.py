"""Kernel parameters (/proc/sys) per network namespace, by their dotted sysctl names.

/proc/sys/net shows the network namespace of the thread that opens the file, so every read and
write runs inside kernel.netns.run_in: the value is the target namespace's, never the node's.
"""

from __future__ import annotations

import os
from typing import Protocol

from kernel import netns
from kernel.errors import NotFound, calling
from kernel.netns import Namespace

PROC_SYS = "/proc/sys"


class SysctlAPI(Protocol):
    """Read and write one kernel parameter in a namespace; kernel.fake.sysctl mirrors it."""

    def get(self, ns: Namespace, key: str) -> str: ...
    def set(self, ns: Namespace, key: str, value: str) -> None: ...


def key_path(key: str) -> str:
    """net.ipv4.ip_forward → /proc/sys/net/ipv4/ip_forward; with "/" in it, a key may name an
    interface with dots (net/ipv4/conf/eth0.100/rp_filter), as sysctl(8) allows."""
    parts = key.split("/") if "/" in key else key.split(".")
    if not key or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"sysctl key {key!r} is not a dotted name like net.ipv4.ip_forward")
    return os.path.join(PROC_SYS, *parts)


def unknown_key(ns: Namespace, key: str) -> NotFound:
    """The error for a key the kernel does not have (shared with the fake)."""
    place = "the node namespace" if ns is None else f"namespace {ns}"
    return NotFound(
        f"sysctl {key} does not exist in {place}; check the name, the interface it names, "
        f"or whether the kernel has the feature (net.ipv4.vs.* needs IPVS)"
    )


class Sysctl:
    """The real /proc/sys; see SysctlAPI."""

    def get(self, ns: Namespace, key: str) -> str:
        """The value as the kernel prints it, without the trailing newline."""
        path = key_path(key)

        def read() -> str:
            try:
                with open(path) as f:
                    return f.read().strip()
            except FileNotFoundError:
                raise unknown_key(ns, key) from None

        with calling(f"read sysctl {key}"):
            return netns.run_in(ns, read)

    def set(self, ns: Namespace, key: str, value: str) -> None:
        path = key_path(key)

        def write() -> None:
            try:
                with open(path, "w") as f:
                    f.write(f"{value}\n")
            except FileNotFoundError:
                raise unknown_key(ns, key) from None

        with calling(f"write sysctl {key}={value}"):
            netns.run_in(ns, write)
