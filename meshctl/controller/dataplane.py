"""The dataplane a node runs, chosen once when its controller starts: the load-balancer backend
(meshctl.lb.backends) and the task DNS redirect (meshctl.node.task_dns). Each is an object that
says what it needs of the kernel and which sysctls it sets; `controller run`, `meshctl diff`
and `meshctl doctor` ask the same objects, in the same order, by the same rule.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from kernel.errors import Unsupported
from kernel.system import Kernel
from meshctl.lb.backend import LbBackend
from meshctl.lb.backends import BACKENDS, NAMES, backend_named
from meshctl.node.task_dns import TASK_DNS, TaskDns
from meshctl.sysctls import LB, NODE, Setting

T = TypeVar("T")


@dataclass(frozen=True)
class Dataplane:
    """How a node balances its VIPs and how its tasks reach 127.0.0.11:53."""

    lb: LbBackend
    task_dns: TaskDns


def first_available(
    candidates: Sequence[T], why_not: Callable[[T], str | None]
) -> tuple[T, list[tuple[T, str]]]:
    """`auto`'s rule: the first candidate nothing stands against (why_not gives None), else the
    last, which needs only what the mesh needs anyway; and why each one before it was passed
    over. The last is never asked."""
    passed_over: list[tuple[T, str]] = []
    for candidate in candidates[:-1]:
        reason = why_not(candidate)
        if reason is None:
            return candidate, passed_over
        passed_over.append((candidate, reason))
    return candidates[-1], passed_over


def choose_lb(kernel: Kernel, wanted: str = "auto") -> LbBackend:
    """The load-balancer backend to run: "auto" picks the first the kernel can run (IPVS where
    it has it, else nftables, else iptables); a named one must be available."""
    if wanted == "auto":
        return first_available(BACKENDS, lambda backend: backend.available(kernel))[0]
    backend = backend_named(wanted)
    reason = backend.available(kernel)
    if reason is not None:
        others = ", ".join(n for n in NAMES if n != wanted)
        raise Unsupported(f"load-balancer backend {wanted}: {reason}; choose {others} or auto")
    return backend


def choose_task_dns(kernel: Kernel) -> TaskDns:
    """The task DNS redirect: nftables' stateless rewrite where nftables runs in the node
    namespace, else the nat redirect."""
    return first_available(TASK_DNS, lambda redirect: redirect.available(kernel))[0]


def choose_dataplane(kernel: Kernel, lb_backend: str = "auto") -> Dataplane:
    """The node's dataplane, both parts chosen in the namespace the controller runs in."""
    return Dataplane(choose_lb(kernel, lb_backend), choose_task_dns(kernel))


def every_setting() -> list[tuple[Setting, str | None]]:
    """Every sysctl a controller may set, with the name of the dataplane object that lists it
    (None: set whatever the dataplane): the node's, every LB namespace's, then each backend's
    and each task DNS redirect's own, in the order `auto` prefers them."""
    return [
        *((setting, None) for setting in (*NODE, *LB)),
        *((setting, backend.name) for backend in BACKENDS for setting in backend.settings),
        *((setting, redirect.name) for redirect in TASK_DNS for setting in redirect.settings),
    ]
