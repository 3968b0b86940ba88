"""What every reconciler of a controller pass shares: the `Reconciler` protocol, the pass
context, and the one resync clock.

A reconciler plans from a view of the store and the pass context (observing the kernel as it
needs), applies a plan, and describes a plan in the lines `meshctl diff` prints. What one
reconciler of a pass finds that a later one needs (the DNS ports it opened, the published
ports another process holds) travels in the `PassContext`, never in a field set on another
object. Whether this pass reads the kernel in full (repairing drift behind the controller's
back) or trusts what each reconciler last saw or made is decided once, by the `ResyncClock`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from meshctl.view import ClusterView

Ports = tuple[int, int]  # the DNS server's (udp, tcp) ports in a task namespace


@dataclass
class PassContext:
    """One pass's facts, made fresh for each pass (and for `meshctl diff`).

    full: read everything from the kernel (ResyncClock), instead of trusting caches.
    wired: the tasks whose namespaces must exist (running, or not stopped yet).
    dns_ports: the DNS server's ports per task, as known when the pass began.
    The fields below are what the pass's reconcilers produce for later ones, in order:
    port_errors: why a published port is not published here, by service id (node);
    present: the task namespaces there are after the node's wiring (node);
    dns_added: ports opened in this pass, whose redirect rules follow (DNS endpoints);
    deadline: the wall-clock time by which the next pass is due (any; see `due`).
    """

    node: str
    node_id: str
    full: bool
    wired: frozenset[str] = frozenset()
    dns_ports: dict[str, Ports] = field(default_factory=dict)
    port_errors: dict[str, str] = field(default_factory=dict)
    present: frozenset[str] = frozenset()
    dns_added: dict[str, Ports] = field(default_factory=dict)
    deadline: float = float("inf")

    def due(self, when: float) -> None:
        """Ask for the next pass by `when` (wall-clock time) at the latest."""
        self.deadline = min(self.deadline, when)


P = TypeVar("P")


class Reconciler(Protocol[P]):
    """One feature's part of a pass.

    name: the part of the pass it is timed as (the reconcile histogram's `kind`).
    converges: whether a second plan right after a successful apply must be empty (kernel
    state must; processes, which start and stop in their own time, need not).
    A plan is falsy when there is nothing to do.
    """

    name: str
    converges: bool

    def plan(self, view: ClusterView, ctx: PassContext) -> P:
        """What to change, from the view and what this pass knows (reads the kernel)."""
        ...

    def apply(self, plan: P, ctx: PassContext) -> dict[str, str]:
        """Make the plan; returns what failed, by what users know (network, task id)."""
        ...

    def describe(self, plan: P) -> Iterator[str]:
        """One line per difference, as `meshctl diff` prints them."""
        ...


class ResyncClock:
    """Says whether a pass reads the kernel in full: the first pass, then once per period."""

    def __init__(self, period: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.period = period
        self._clock = clock
        self._last_full = -float("inf")

    def full(self) -> bool:
        """True at most once per period (and on the first call): this pass is a full one."""
        now = self._clock()
        if now - self._last_full < self.period:
            return False
        self._last_full = now
        return True
