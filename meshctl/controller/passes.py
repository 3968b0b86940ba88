"""One pass of the controller: the store writers, then the reconcilers, in the order given.

The order is data (controller.build.PASS_ORDER says it and why). The runner times each part
for the reconcile histogram (`kind` is the reconciler's name; a kind that runs twice is
observed once with its total), merges what each part reports failing (each fails alone: a
broken network is reported, the others converge), and checks convergence in one place: after
a reconciler applied a plan without failures, a second plan must be empty. A part that raises
ends the pass (the loop reports it and retries).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client import Histogram

from meshctl.reconcile import PassContext, Reconciler, ResyncClock
from meshctl.view import ClusterView

log = logging.getLogger("meshctl.controller")


class StoreWriter(Protocol):
    """A part of the pass that writes the store before the reconcilers run (task ends, the
    leader's rounds, address claims): returns (whether the store changed, what failed)."""

    name: str

    def write(self, view: ClusterView) -> tuple[bool, dict[str, str]]: ...


@dataclass(frozen=True)
class PassResult:
    """What a pass saw and did: its last view, what failed by name, the next deadline."""

    view: ClusterView
    failures: dict[str, str]
    deadline: float


def reconcile(reconciler: Reconciler[Any], view: ClusterView, ctx: PassContext) -> dict[str, str]:
    """Plan, apply, and (if the plan changed something and nothing failed) check that a
    second plan is empty; returns what failed."""
    plan = reconciler.plan(view, ctx)
    failed = reconciler.apply(plan, ctx)
    if plan and reconciler.converges:
        residue = reconciler.plan(view, ctx)
        if residue and not failed:
            log.warning(
                "%s not converged after apply: %s",
                reconciler.name,
                "; ".join(reconciler.describe(residue)),
            )
    return failed


class PassRunner:
    """Runs passes over fixed writers and reconcilers, with one resync clock."""

    def __init__(
        self,
        writers: Sequence[StoreWriter],
        reconcilers: Sequence[Reconciler[Any]],
        clock: ResyncClock,
        histogram: Histogram,
    ) -> None:
        self.writers = tuple(writers)
        self.reconcilers = tuple(reconcilers)
        self.clock = clock
        self.histogram = histogram

    def run(
        self,
        read_view: Callable[[bool], ClusterView],
        context: Callable[[ClusterView, bool], PassContext],
        finish: Callable[[PassResult], str],
    ) -> PassResult:
        """One pass. read_view(wait): the store's view (wait: after our own writes reached
        it); context(view, full): this pass's context; finish(result): what the pass does
        last (report it), returning why it did not converge ("" when it did)."""
        started = time.perf_counter()
        parts = _Parts(self.histogram)
        try:
            result = self._run(read_view, context, parts)
            parts("pass").failed = finish(result)
            return result
        except BaseException:
            parts("pass").failed = True
            raise
        finally:
            parts("pass").spent = time.perf_counter() - started
            parts.observe()

    def _run(
        self,
        read_view: Callable[[bool], ClusterView],
        context: Callable[[ClusterView, bool], PassContext],
        parts: _Parts,
    ) -> PassResult:
        view = read_view(False)
        failures: dict[str, str] = {}
        for writer in self.writers:
            with parts(writer.name) as part:
                changed, failed = writer.write(view)
                part.failed = part.failed or failed
            failures |= failed
            if changed:
                view = read_view(True)
        ctx = context(view, self.clock.full())
        for reconciler in self.reconcilers:
            with parts(reconciler.name) as part:
                failed = reconcile(reconciler, view, ctx)
                part.failed = part.failed or failed
            failures |= failed
        deadline = min(ctx.deadline, time.time() + self.clock.period)
        return PassResult(view, failures, deadline)


class _Parts:
    """The time each kind of work took in one pass (a kind may run twice, as the node's), for
    the reconcile histogram: observed once per kind with its result, error if it raised or
    its `failed` was set (what it reports as failing)."""

    def __init__(self, histogram: Histogram) -> None:
        self.histogram = histogram
        self.parts: dict[str, _Part] = {}

    def __call__(self, kind: str) -> _Part:
        return self.parts.setdefault(kind, _Part())

    def observe(self) -> None:
        for kind, part in self.parts.items():
            result = "error" if part.failed else "success"
            self.histogram.labels(kind, result).observe(part.spent)


class _Part:
    def __init__(self) -> None:
        self.spent = 0.0
        self.failed: object = None

    def __enter__(self) -> _Part:
        self.started = time.perf_counter()
        return self

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        self.spent += time.perf_counter() - self.started
        self.failed = self.failed or kind is not None
