"""The leader's part of a pass: keep every service's slots filled (and no more), move tasks off
down and draining nodes, roll updates, place what is pending. Every controller runs it; only
the one holding the leader key (or taking it while it is free) does anything."""

from __future__ import annotations

import time
from collections.abc import Callable

from meshctl.cluster import orchestrator, scheduler, updater
from meshctl.cluster.membership import Membership
from meshctl.events import EventLog
from meshctl.store import Store
from meshctl.view import ClusterView

ORCHESTRATION_ROUNDS = 3  # make, move, place: a replacement is placed in the pass that made it


class Leader:
    """The orchestration rounds of a pass, as one store writer, and the event log the leader
    writes at the end of each pass (`flush_events`).

    fresh: the view after this controller's own writes reached its copy of the store."""

    name = "orchestrate"

    def __init__(
        self,
        store: Store,
        membership: Membership,
        events: EventLog,
        fresh: Callable[[], ClusterView],
    ) -> None:
        self.store = store
        self.membership = membership
        self.events = events
        self.fresh = fresh
        self.started = time.monotonic()
        self.leading = False

    def write(self, view: ClusterView) -> tuple[bool, dict[str, str]]:
        """True if the store changed, and what failed ("tasks": why some could not be made,
        placed or rolled). Each step works on the view after the previous one's writes; a
        task made by one (a replacement) is placed in the same pass. A leader that has just
        started gives nodes without a live controller one lease period to come back before it
        judges them down."""
        self.leading = self.membership.lead(view.leader)
        if not self.leading:
            return False, {}
        settled = time.monotonic() - self.started > self.membership.ttl
        changed = False
        errors: dict[str, str] = {}
        for _ in range(ORCHESTRATION_ROUNDS):
            made, problem = orchestrator.apply(self.store, view, orchestrator.plan(view))
            if made:
                view = self.fresh()
            decisions = scheduler.plan(view, judge_down=settled)
            moved, unmade = scheduler.apply(self.store, view, decisions)
            if moved:
                view = self.fresh()
            rolled, stuck = updater.roll(self.store, view)
            if rolled:
                view = self.fresh()
            if problem or unmade or stuck:
                errors["tasks"] = "; ".join(p for p in (problem, unmade, stuck) if p)
            changed |= made or moved or rolled
            if not (made or moved or rolled):
                break
        return changed, errors

    def flush_events(self) -> None:
        """Write the events derived from the store's changes if this node leads (else keep
        the last few, for a takeover)."""
        self.events.flush(self.leading)
