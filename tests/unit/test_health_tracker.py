"""HealthTracker: Docker's rules for when a task is starting, healthy or unhealthy."""

from __future__ import annotations

from meshctl.model import HealthCheck
from meshctl.runtime.health import HealthTracker


def tracker(retries: int = 3, start_period: float = 0.0, interval: float = 5.0) -> HealthTracker:
    return HealthTracker(interval, retries, start_period, started_at=100.0)


def test_starts_in_starting_and_first_probe_is_one_interval_after_start() -> None:
    t = tracker(interval=5.0)
    assert t.state == "starting"
    assert not t.due(104.9)
    assert t.due(105.0)


def test_one_success_makes_healthy() -> None:
    t = tracker()
    assert t.record(True, 105.0) == "healthy"


def test_unhealthy_only_after_retries_failures_in_a_row() -> None:
    t = tracker(retries=3)
    assert t.record(False, 105.0) == "starting"
    assert t.record(False, 110.0) == "starting"
    assert t.record(False, 115.0) == "unhealthy"


def test_healthy_task_tolerates_fewer_than_retries_failures() -> None:
    t = tracker(retries=2)
    t.record(True, 105.0)
    assert t.record(False, 110.0) == "healthy"
    assert t.record(True, 115.0) == "healthy"  # the success resets the count
    assert t.record(False, 120.0) == "healthy"
    assert t.record(False, 125.0) == "unhealthy"


def test_unhealthy_task_returns_to_healthy_after_one_success() -> None:
    t = tracker(retries=1)
    assert t.record(False, 105.0) == "unhealthy"
    assert t.record(True, 110.0) == "healthy"
    assert t.record(False, 115.0) == "unhealthy"


def test_failures_in_start_period_do_not_count() -> None:
    t = tracker(retries=1, start_period=30.0)
    assert t.record(False, 105.0) == "starting"
    assert t.record(False, 129.9) == "starting"
    assert t.record(False, 130.0) == "unhealthy"


def test_success_in_start_period_makes_healthy_and_ends_the_grace() -> None:
    t = tracker(retries=1, start_period=30.0)
    assert t.record(True, 105.0) == "healthy"
    assert t.record(False, 110.0) == "unhealthy"


def test_next_probe_is_one_interval_after_each_result() -> None:
    t = tracker(interval=5.0)
    t.record(True, 107.5)
    assert not t.due(112.4)
    assert t.due(112.5)
    assert t.next_at == 112.5


def test_zero_retries_means_docker_default_of_three() -> None:
    t = tracker(retries=0)
    assert [t.record(False, 100.0 + 5 * i) for i in range(1, 4)] == [
        "starting",
        "starting",
        "unhealthy",
    ]


def test_for_check_takes_the_model_fields() -> None:
    check = HealthCheck(kind="tcp", port=80, interval=2.0, retries=1, start_period=10.0)
    t = HealthTracker.for_check(check, started_at=50.0)
    assert t.due(52.0) and not t.due(51.9)
    assert t.record(False, 55.0) == "starting"  # within the start period
    assert t.record(False, 60.0) == "unhealthy"
