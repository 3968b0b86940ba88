"""The resync clock and the pass context every reconciler shares."""

from __future__ import annotations

from meshctl.reconcile import PassContext, ResyncClock


def test_the_clock_says_full_first_then_once_per_period() -> None:
    now = [100.0]
    clock = ResyncClock(10.0, clock=lambda: now[0])
    assert clock.full()  # the first pass reads everything
    now[0] += 9.99
    assert not clock.full()
    now[0] += 0.01
    assert clock.full()  # a period after the last full one
    assert not clock.full()  # and only once: the next pass trusts the caches again
    now[0] += 25.0
    assert clock.full()
    now[0] += 5.0
    assert not clock.full()  # a period counts from the last full pass, not a fixed grid


def test_the_deadline_is_the_earliest_asked_for() -> None:
    ctx = PassContext("node1", "n1", full=False)
    assert ctx.deadline == float("inf")
    ctx.due(50.0)
    ctx.due(80.0)
    assert ctx.deadline == 50.0
    ctx.due(20.0)
    assert ctx.deadline == 20.0
