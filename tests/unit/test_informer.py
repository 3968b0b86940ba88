"""The informer: a copy of the store that follows its watch, re-lists after compaction or an
outage and emits the deletions it missed (mark and sweep). Runs on both stores."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshctl.store import Event, Store, open_store
from meshctl.store.etcd import EtcdStore
from meshctl.store.informer import Informer, sweep
from meshctl.store.sqlite import SqliteStore
from tests.conftest import scaled
from tests.etcd import EtcdServer


@pytest.fixture(params=["sqlite", "etcd"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "sqlite":
        with SqliteStore(str(tmp_path / "state.db"), history=5) as opened:
            yield opened
        return
    server: EtcdServer = request.getfixturevalue("etcd_server")
    with open_store(server.url(f"/test-{uuid.uuid4().hex[:12]}")) as opened:
        yield opened


def compact(store: Store) -> None:
    """Make the history before now unwatchable, as each store does it."""
    if isinstance(store, EtcdStore):
        store.compact(store.revision())
    else:
        for i in range(10):  # history=5: ten more writes push the old ones out
            store.put("filler", f"f{i}", {})


class Recorder:
    def __init__(self) -> None:
        self.events: list[Event] = []
        self.lock = threading.Lock()

    def __call__(self, events: list[Event]) -> None:
        with self.lock:
            self.events += events

    def deletes(self) -> list[tuple[str, str]]:
        with self.lock:
            return [(e.kind, e.name) for e in self.events if e.type == "delete"]


def test_the_copy_follows_writes_and_reads_as_one_snapshot(store: Store) -> None:
    store.put("service", "web", {"replicas": 1})
    informer = Informer(store).start()
    try:
        assert informer.sync(scaled(5))
        assert [r.value for r in informer.snapshot().of("service")] == [{"replicas": 1}]
        record = store.put("service", "web", {"replicas": 2})
        store.put("task", "t1", {"slot": 1})
        assert informer.wait_for(store.revision(), 5)
        snap = informer.snapshot()
        assert snap.revision == store.revision()
        (web,) = snap.of("service")
        assert (web.value, web.mod_revision) == ({"replicas": 2}, record.mod_revision)
        store.delete("task", "t1")
        assert informer.sync(scaled(5))
        assert informer.snapshot().of("task") == []
    finally:
        informer.stop()


def test_a_relist_after_compaction_emits_the_deletions_it_missed(store: Store) -> None:
    for i in range(3):
        store.put("task", f"t{i}", {"slot": i})
    seen = Recorder()
    informer = Informer(store, seen).start()
    try:
        assert informer.sync(scaled(5))
    finally:
        informer.stop()  # the watch falls behind: nobody follows while this happens
    store.delete("task", "t0")
    store.put("task", "t1", {"slot": 10})
    store.put("task", "t9", {"slot": 9})
    compact(store)
    assert informer.revision < store.revision()
    informer.start()
    try:
        assert informer.sync(scaled(10))
        assert seen.deletes() == [("task", "t0")]
        tasks = {r.name: r.value for r in informer.snapshot().of("task")}
        assert tasks == {"t1": {"slot": 10}, "t2": {"slot": 2}, "t9": {"slot": 9}}
    finally:
        informer.stop()


def test_sweep_names_every_difference() -> None:
    from meshctl.store import Record, Snapshot

    old = {
        ("task", "a"): Record("task", "a", {}, 1, 1),
        ("task", "b"): Record("task", "b", {}, 2, 2),
    }
    new = Snapshot(
        9, {"task": [Record("task", "b", {"x": 1}, 2, 8), Record("task", "c", {}, 9, 9)]}
    )
    assert sweep(old, new) == [
        Event(9, "delete", "task", "a", None),
        Event(8, "put", "task", "b", {"x": 1}),
        Event(9, "put", "task", "c", {}),
    ]


def test_an_unreachable_store_keeps_the_copy_and_resyncs() -> None:
    """etcd stopped: the copy stays as it was, `connected` goes False; back: it resyncs."""
    with EtcdServer() as own:  # its own server: this test stops it
        url = own.url("/meshctl")
        with open_store(url) as store:
            store.put("service", "web", {"replicas": 1})
            informer = Informer(store).start()
            try:
                assert informer.sync(scaled(5))
                own.stop()
                deadline = time.monotonic() + scaled(10)
                while informer.connected and time.monotonic() < deadline:
                    time.sleep(0.1)
                assert not informer.connected
                assert [r.name for r in informer.snapshot().of("service")] == ["web"]
                own.start()
                deadline = time.monotonic() + scaled(15)
                while not informer.connected and time.monotonic() < deadline:
                    time.sleep(0.1)
                assert informer.connected
                store.put("service", "api", {"replicas": 1})
                assert informer.sync(scaled(5))
                assert [r.name for r in informer.snapshot().of("service")] == ["api", "web"]
            finally:
                informer.stop()
