"""The event log: transitions derived from store changes (pure), written by the leader only,
taken over without doubles, pruned by age and count; the CLI's filters."""

from __future__ import annotations

import dataclasses
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meshctl.events import (
    EVENT,
    EventLog,
    MeshEvent,
    derive,
    matches,
    parse_filters,
    read_events,
)
from meshctl.model import (
    NODE_STATUS,
    SERVICE,
    TASK,
    NodeStatus,
    Service,
    Task,
    ValidationError,
)
from meshctl.store import Event, Record, Store
from meshctl.store.sqlite import SqliteStore
from tests.conftest import scaled


def change(kind: str, name: str, before: dict | None, after: dict | None, revision: int = 7):
    record = Record(kind, name, before, 1, 1) if before is not None else None
    return record, Event(revision, "put" if after is not None else "delete", kind, name, after)


def actions(events: list[MeshEvent]) -> list[tuple[str, str, str]]:
    return [(e.type, e.action, e.name) for e in events]


TASK0 = Task("web", "svc1", 1, 1, id="t1", created_at=1.0)


def test_a_task_write_records_each_new_history_entry_in_order() -> None:
    assigned = dataclasses.replace(TASK0, node="n1").with_event(2.0, "assigned", "to n1")
    running = assigned.with_event(3.0, "running", "started, pid 10")
    # One write that saw the process die and start again: two transitions, in order.
    restarted = dataclasses.replace(
        running.with_event(4.0, "failed", "exit code 137").with_event(5.0, "running", "pid 11"),
        exit_code=137,
    )
    assert actions(derive(*change(TASK, "t1", None, TASK0.to_dict()), now=9.0)) == [
        ("task", "create", "web.1")
    ]
    events = derive(*change(TASK, "t1", running.to_dict(), restarted.to_dict()), now=9.0)
    assert actions(events) == [("task", "failed", "web.1"), ("task", "running", "web.1")]
    assert [e.time for e in events] == [4.0, 5.0]  # the task's own times
    assert events[0].attributes == {
        "service": "web",
        "message": "exit code 137",
        "exit_code": "137",
    }
    assert events[0].node == "n1" and events[0].id == "t1"
    assert [e.key for e in events] == [f"{7:020d}-task-t1-0", f"{7:020d}-task-t1-1"]


def test_stop_health_and_removal_of_a_task() -> None:
    running = dataclasses.replace(TASK0, node="n1").with_event(3.0, "running", "pid 10")
    stopping = dataclasses.replace(running, desired_state="shutdown").with_event(
        4.0, "running", "scaled down"
    )
    events = derive(*change(TASK, "t1", running.to_dict(), stopping.to_dict()), now=9.0)
    assert actions(events) == [("task", "stop", "web.1")]
    assert events[0].attributes["desired_state"] == "shutdown"
    healthy = dataclasses.replace(running, health="healthy")
    events = derive(*change(TASK, "t1", running.to_dict(), healthy.to_dict()), now=9.0)
    assert actions(events) == [("health", "healthy", "web.1")]
    assert actions(derive(*change(TASK, "t1", healthy.to_dict(), None), now=9.0)) == [
        ("task", "remove", "web.1")
    ]


def test_services_networks_and_node_status_transitions() -> None:
    web = Service("web", ("sleep", "1"), replicas=1, id="s1")
    scaled = dataclasses.replace(web, replicas=3)
    assert actions(derive(*change(SERVICE, "web", web.to_dict(), scaled.to_dict()), 1.0)) == [
        ("service", "scale", "web")
    ]
    assert actions(derive(*change(SERVICE, "web", web.to_dict(), None), 1.0)) == [
        ("service", "remove", "web")
    ]
    up = NodeStatus("n1").to_dict()
    failing = NodeStatus("n1", errors={"front": "no address"}).to_dict()
    degraded = NodeStatus("n1", message="degraded: boom", errors={"front": "no address"})
    assert actions(derive(*change(NODE_STATUS, "n1", None, up), 1.0)) == [("node", "ready", "n1")]
    events = derive(*change(NODE_STATUS, "n1", up, failing), 1.0)
    assert actions(events) == [("reconcile", "error", "front")]
    assert events[0].attributes == {"error": "no address"} and events[0].node == "n1"
    assert actions(derive(*change(NODE_STATUS, "n1", failing, degraded.to_dict()), 1.0)) == [
        ("reconcile", "degraded", "n1")
    ]
    assert actions(derive(*change(NODE_STATUS, "n1", failing, up), 1.0)) == [
        ("reconcile", "resolved", "front")
    ]
    assert actions(derive(*change(NODE_STATUS, "n1", up, None), 1.0)) == [("node", "down", "n1")]


def test_unreadable_records_and_other_kinds_derive_nothing() -> None:
    assert derive(*change(TASK, "t1", None, {"bad": True}), 1.0) == []
    assert derive(*change("address", "x", None, {"owner": "t1"}), 1.0) == []


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return SqliteStore(str(tmp_path / "state.db"))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def task_changes(count: int, first_revision: int = 1) -> list[tuple[Record | None, Event]]:
    out = []
    for i in range(count):
        task = dataclasses.replace(TASK0, id=f"t{i}", slot=i + 1)
        out.append(change(TASK, task.id, None, task.to_dict(), first_revision + i))
    return out


def test_only_the_leader_writes_in_txns_etcd_takes(store: Store) -> None:
    clock = Clock()
    log = EventLog(store, clock=clock)
    log.observe(task_changes(300))
    log.flush(leading=False)
    assert read_events(store) == []
    log.flush(leading=True)
    events = read_events(store)
    assert len(events) == 300  # three txns: 120 + 120 + 60 puts
    assert [e.revision for e in events] == sorted(e.revision for e in events)


def test_a_follower_keeps_a_minute_and_a_new_leader_writes_no_doubles(store: Store) -> None:
    clock = Clock()
    old_leader, follower = EventLog(store, clock=clock), EventLog(store, clock=clock)
    early, late = task_changes(2, 1), task_changes(3, 10)
    for log in (old_leader, follower):
        log.observe(early)
    clock.now += 120
    for log in (old_leader, follower):
        log.observe(late)
    old_leader.flush(leading=True)
    follower.flush(leading=False)  # drops what is older than a minute
    before = {e.key: e for e in read_events(store)}
    store.delete(EVENT, sorted(before)[-1])  # the old leader died before writing its last
    follower.flush(leading=True)
    after = read_events(store)
    assert {e.key for e in after} == set(before)
    assert len(after) == 5


def test_the_leader_prunes_by_age_and_count(store: Store) -> None:
    clock = Clock()
    log = EventLog(store, window=60.0, limit=4, clock=clock)
    log.observe(task_changes(3, 1))
    clock.now += 100
    log.observe(task_changes(5, 10))
    log.flush(leading=True)  # the first flush prunes: 3 too old, 1 beyond the limit
    assert [e.revision for e in read_events(store)] == [11, 12, 13, 14]


def test_filters_match_as_docker_events_does() -> None:
    event = MeshEvent(1, 1.0, "task", "failed", "web.1", "t1", "n1", {"service": "web"})
    assert matches(event, parse_filters(["type=task", "service=web"]))
    assert matches(event, parse_filters(["action=running", "action=failed"]))
    assert not matches(event, parse_filters(["type=task", "node=n2"]))
    service = MeshEvent(1, 1.0, "service", "scale", "web", "s1")
    assert matches(service, parse_filters(["service=web"]))
    for bad in ("type", "colour=red", "type=container", "service="):
        with pytest.raises(ValidationError, match="invalid --filter"):
            parse_filters([bad])


def test_follow_gives_the_log_then_new_events_and_stops_at_until(tmp_path: Path) -> None:
    from meshctl.events import follow_events

    with SqliteStore(str(tmp_path / "state.db")) as store:
        store.put(EVENT, "a", MeshEvent(1, 1.0, "service", "create", "web").to_dict())
        followed = follow_events(store, until=time.time() + scaled(30))
        assert next(followed).name == "web"
        store.put(EVENT, "b", MeshEvent(2, 2.0, "service", "scale", "web").to_dict())
        store.put(SERVICE, "web", {"name": "web"})  # another kind: not an event
        assert next(followed).action == "scale"
        followed.close()  # the informer stops with it
        assert [e.action for e in follow_events(store, until=0.0)] == ["create", "scale"]


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_follower_stops_on_sigint_and_sigterm_even_when_started_with_them_ignored(
    tmp_path: Path, stop: signal.Signals
) -> None:
    """As a runner started with `nohup ... &` starts it: SIGINT (and here SIGTERM) ignored."""
    env = {**os.environ, "MESHCTL_STATE_DIR": str(tmp_path)}
    with SqliteStore(str(tmp_path / "state.db")):
        pass  # the store exists before the follower opens it

    def ignore_both() -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    follower = subprocess.Popen(
        [sys.executable, "-m", "meshctl", "events", "--format", "{{.Name}}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=ignore_both,
    )  # fmt: skip
    try:
        with SqliteStore(str(tmp_path / "state.db")) as store:
            deadline = time.monotonic() + scaled(30)
            assert follower.stdout is not None
            # Written until the follower shows one: then it is following, its handlers set.
            while time.monotonic() < deadline:
                event = MeshEvent(1, time.time() + 1, "service", "create", "web")
                store.put(EVENT, f"e{time.monotonic_ns()}", event.to_dict())
                ready, _, _ = select.select([follower.stdout], [], [], 0.2)
                if ready:
                    break
            assert follower.stdout.readline() == "web\n"
        follower.send_signal(stop)
        follower.wait(timeout=scaled(10))
    finally:
        follower.kill()
        _, err = follower.communicate()
    assert follower.returncode == 0, err
    assert "Traceback" not in err, err
