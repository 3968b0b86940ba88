"""The desired-state store: compare-and-swap, txn, watch, compaction, leases, concurrency.

Every protocol test runs on each store: the SQLite file, a real etcd (one server for the run, a
key prefix per test) and the same over TLS with an etcd login whose role allows only its prefix
(#26). Revisions are compared relative to where a test started, since
etcd's revision is the server's. The concurrency tests use real OS processes, as several CLIs
and a controller do.
"""

from __future__ import annotations

import multiprocessing
import stat
import threading
import time
import uuid
from collections.abc import Iterator
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

import pytest

from meshctl.store import (
    Check,
    Compacted,
    Conflict,
    Delete,
    Event,
    LeaseExpired,
    Put,
    Record,
    Store,
    StoreError,
    default_store_url,
    open_store,
    resolve_state_dir,
)
from meshctl.store.etcd import EtcdAccess, EtcdStore, parse_etcd_url
from meshctl.store.sqlite import SqliteStore
from tests.conftest import scaled
from tests.etcd import EtcdServer
from tests.unit.conftest import TlsEtcd

Target = tuple[str, EtcdAccess | None]  # what open_store takes: a URL and its TLS and login


@pytest.fixture(params=["sqlite", "etcd", "etcd-tls"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Target:
    """An empty store: a new SQLite file, a new key prefix on the run's etcd, or one on the
    run's etcd over TLS with a login."""
    if request.param == "sqlite":
        return default_store_url(str(tmp_path / "state")), None
    if request.param == "etcd":
        server: EtcdServer = request.getfixturevalue("etcd_server")
        prefix = f"/test-{uuid.uuid4().hex[:12]}"
        request.addfinalizer(lambda: server.clear(prefix + "/"))
        return server.url(prefix), None
    tls: TlsEtcd = request.getfixturevalue("etcd_tls")
    url = tls.url()
    request.addfinalizer(lambda: tls.server.clear(parse_etcd_url(url)[1] + "/"))
    return url, tls.access


@pytest.fixture
def store(target: Target) -> Iterator[Store]:
    with open_store(*target) as opened:
        yield opened


@pytest.fixture
def db_path(tmp_path: Path) -> str:
    return str(tmp_path / "state" / "state.db")


def test_put_get_list_and_revisions(store: Store) -> None:
    base = store.revision()
    assert store.get("service", "web") is None
    web = store.put("service", "web", {"replicas": 2})
    store.put("service", "api", {"replicas": 1})
    store.put("network", "web", {"subnet": "10.0.1.0/24"})
    updated = store.put("service", "web", {"replicas": 3})

    assert (web.create_revision, web.mod_revision) == (base + 1, base + 1)
    assert (updated.create_revision, updated.mod_revision) == (base + 1, base + 4)
    assert store.get("service", "web") == updated
    assert store.revision() == base + 4
    assert [r.name for r in store.list("service")] == ["api", "web"]
    assert [r.value for r in store.list("network")] == [{"subnet": "10.0.1.0/24"}]
    assert store.list("task") == []


def test_list_by_name_prefix_and_snapshot(store: Store) -> None:
    store.put("address", "net1/10.0.0.2", {"owner": "a"})
    store.put("address", "net1/10.0.0.3", {"owner": "b"})
    store.put("address", "net10/10.0.0.2", {"owner": "c"})
    store.put("network", "net1", {})
    assert [r.name for r in store.list("address", "net1/")] == ["net1/10.0.0.2", "net1/10.0.0.3"]
    assert len(store.list("address", "net1")) == 3
    snap = store.snapshot()
    assert snap.revision == store.revision()
    assert [r.name for r in snap.of("address")] == [r.name for r in store.list("address")]
    assert [r.name for r in snap.of("network")] == ["net1"]
    assert snap.of("task") == []


def test_create_of_existing_key_conflicts_and_names_it(store: Store) -> None:
    first = store.put("service", "web", {"image": "a"}, expect=0)
    with pytest.raises(Conflict, match="service web already exists") as caught:
        store.put("service", "web", {"image": "b"}, expect=0)
    assert caught.value.exists
    rev = first.mod_revision
    assert store.get("service", "web") == Record("service", "web", {"image": "a"}, rev, rev)


def test_update_with_stale_revision_conflicts(store: Store) -> None:
    first = store.put("service", "web", {"replicas": 1})
    second = store.put("service", "web", {"replicas": 2}, expect=first.mod_revision)
    with pytest.raises(Conflict, match="changed meanwhile"):
        store.put("service", "web", {"replicas": 9}, expect=first.mod_revision)
    with pytest.raises(Conflict, match="does not exist") as caught:
        store.put("service", "api", {"replicas": 9}, expect=second.mod_revision)
    assert not caught.value.exists
    assert store.get("service", "web") == second
    assert store.get("service", "api") is None


def test_delete_semantics(store: Store) -> None:
    web = store.put("service", "web", {})
    assert store.delete("service", "missing") is False
    assert store.revision() == web.mod_revision  # a no-op delete adds no revision
    with pytest.raises(Conflict):
        store.delete("service", "web", expect=web.mod_revision + 5)
    assert store.get("service", "web") is not None
    assert store.delete("service", "web", expect=web.mod_revision) is True
    assert store.get("service", "web") is None
    with pytest.raises(Conflict):
        store.delete("service", "web", expect=web.mod_revision)


def _events(store: Store, after: int) -> list[Event]:
    """Every event after revision `after` up to now (watch returns them in batches)."""
    events: list[Event] = []
    now = store.revision()
    while after < now:
        batch = store.watch(after, timeout=scaled(2))
        assert batch, f"no events between {after} and {now}"
        events += batch
        after = batch[-1].revision
    return events


def test_txn_is_all_or_nothing(store: Store) -> None:
    store.put("ipam", "10.0.1.5", {"task": "old.1"})
    before = store.revision()
    ops = [
        Put("service", "web", {"replicas": 2}, expect=0),
        Put("task", "web.1", {"ip": "10.0.1.4"}, expect=0),
        Put("ipam", "10.0.1.5", {"task": "web.2"}, expect=0),  # taken: the whole txn fails
    ]
    with pytest.raises(Conflict, match="ipam 10.0.1.5 already exists"):
        store.txn(ops)
    assert store.revision() == before
    assert store.get("service", "web") is None
    assert store.get("task", "web.1") is None

    revision = store.txn([*ops[:2], Delete("ipam", "10.0.1.5"), Delete("ipam", "nothing")])
    assert revision == before + 1
    assert [(e.type, e.kind, e.name, e.revision) for e in _events(store, before)] == [
        ("put", "service", "web", revision),
        ("put", "task", "web.1", revision),
        ("delete", "ipam", "10.0.1.5", revision),
    ]
    task = store.get("task", "web.1")
    assert task is not None and task.create_revision == revision


def test_check_makes_a_txn_depend_on_a_key_it_does_not_write(store: Store) -> None:
    network = store.put("network", "front", {"subnet": "10.0.1.0/24"})
    store.txn([Check("network", "front", network.mod_revision), Put("address", "a", {})])
    assert store.get("address", "a") is not None
    store.delete("network", "front")
    with pytest.raises(Conflict, match="network front does not exist"):
        store.txn([Check("network", "front", network.mod_revision), Put("address", "b", {})])
    assert store.get("address", "b") is None
    before = store.revision()
    store.txn([Check("network", "front", 0)])  # a txn of checks only writes nothing
    assert store.revision() == before


def test_txn_rejects_a_key_named_twice(store: Store) -> None:
    before = store.revision()
    with pytest.raises(ValueError, match="each key once"):
        store.txn([Put("service", "web", {}), Delete("service", "web")])
    assert store.revision() == before


def test_watch_returns_history_then_times_out(store: Store) -> None:
    base = store.revision()
    store.put("service", "web", {"replicas": 1})
    store.delete("service", "web")
    assert _events(store, base) == [
        Event(base + 1, "put", "service", "web", {"replicas": 1}),
        Event(base + 2, "delete", "service", "web", None),
    ]
    started = time.monotonic()
    assert store.watch(base + 2, timeout=0.3) == []
    assert 0.3 <= time.monotonic() - started < 0.3 + scaled(1)


def _watch_once(store: Store, revision: int, seen: list[tuple[float, list[Event]]]) -> None:
    events = store.watch(revision, timeout=scaled(5))
    seen.append((time.monotonic(), events))


def test_watcher_sees_another_connections_write_within_100ms(target: Target) -> None:
    """The controller's connection sees a CLI's commit within 100 ms of it."""
    with open_store(*target) as watcher, open_store(*target) as writer:
        for i in range(6):
            seen: list[tuple[float, list[Event]]] = []
            thread = threading.Thread(target=_watch_once, args=(watcher, watcher.revision(), seen))
            thread.start()
            # The watcher is blocked, polling; vary when the write lands within its poll cycle.
            time.sleep(0.02 + 0.037 * i)
            writer.put("service", f"web{i}", {"n": i})
            committed = time.monotonic()
            thread.join(timeout=scaled(5))
            ((when, events),) = seen
            assert [e.name for e in events] == [f"web{i}"]
            late = when - committed
            assert late < scaled(0.1), f"watcher saw the change after {late:.3f}s"


def test_compacted_history_asks_for_a_relist(db_path: str) -> None:
    with SqliteStore(db_path, history=3) as store:
        for i in range(10):
            store.put("task", f"t{i}", {})
        assert [e.revision for e in store.watch(7, timeout=1)] == [8, 9, 10]
        with pytest.raises(Compacted, match="list again") as caught:
            store.watch(6, timeout=1)
        assert caught.value.compacted == 7
        assert len(store.list("task")) == 10  # compaction drops history, never state


def test_etcd_compaction_is_reported_not_swallowed(etcd_server: EtcdServer) -> None:
    """etcd cancels a watch from a compacted revision; etcd3gw drops that, the store must not."""
    with open_store(etcd_server.url(f"/test-{uuid.uuid4().hex[:12]}")) as store:
        assert isinstance(store, EtcdStore)
        base = store.revision()
        for i in range(10):
            store.put("task", f"t{i}", {})
        store.compact(base + 7)
        assert [e.revision for e in store.watch(base + 7, timeout=2)] == [
            base + 8,
            base + 9,
            base + 10,
        ]
        with pytest.raises(Compacted, match="list again") as caught:
            store.watch(base + 5, timeout=2)
        assert caught.value.compacted == base + 7
        assert len(store.list("task")) == 10


def test_etcd_snapshot_in_pages_is_one_revision_and_a_watch_after_it_misses_nothing(
    etcd_server: EtcdServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A snapshot larger than a page is read at the first page's revision. The pages after
    the first were read at the revision each header carried (the store's current one), and
    the snapshot claimed the last: a write to a key of the first page between two pages was
    in neither the snapshot nor the watch that went on after it, and a controller kept that
    task out of its load balancer for good."""
    import meshctl.store.etcd as etcd_module

    monkeypatch.setattr(etcd_module, "PAGE", 2)
    with open_store(etcd_server.url(f"/test-{uuid.uuid4().hex[:12]}")) as store:
        assert isinstance(store, EtcdStore)
        for i in range(6):
            store.put("task", f"t{i}", {"state": "assigned"})
        post, pages = store._post, []

        def post_and_write_between_pages(path: str, body: dict[str, Any]) -> dict[str, Any]:
            result = post(path, body)
            if path == "/kv/range" and body.get("limit") == 2:
                pages.append(body)
                if len(pages) == 1:  # after the first page: t0, in it, changes
                    key = etcd_module._b64(store._key("task", "t0"))
                    post("/kv/put", {"key": key, "value": etcd_module._b64('{"state": "running"}')})
            return result

        monkeypatch.setattr(store, "_post", post_and_write_between_pages)
        snapshot = store.snapshot()
        monkeypatch.setattr(store, "_post", post)
        assert len(pages) > 2
        assert len({p["revision"] for p in pages[1:]}) == 1  # every page after the first: one
        (t0,) = [r for r in snapshot.of("task") if r.name == "t0"]
        assert t0.value == {"state": "assigned"}  # as it was at the snapshot's revision
        events = store.watch(snapshot.revision, timeout=scaled(2))
        assert [(e.name, e.value) for e in events] == [("t0", {"state": "running"})]


def test_state_survives_reopen(db_path: str) -> None:
    with SqliteStore(db_path) as store:
        store.put("network", "front", {"subnet": "10.0.9.0/24"})
        store.put("network", "back", {"subnet": "10.0.8.0/24"})
    with SqliteStore(db_path) as store:
        assert store.revision() == 2
        assert [r.name for r in store.list("network")] == ["back", "front"]
        assert store.put("network", "x", {}).mod_revision == 3


def test_files_are_private(tmp_path: Path) -> None:
    state_dir = tmp_path / "new" / "meshctl"
    with open_store(default_store_url(str(state_dir))) as store:
        store.put("service", "web", {"env": {"SECRET": "x"}})
        assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
        files = {p.name: stat.S_IMODE(p.stat().st_mode) for p in state_dir.iterdir()}
    assert files == {"state.db": 0o600, "state.db-wal": 0o600, "state.db-shm": 0o600}


def test_leased_keys_go_when_the_lease_expires_and_stay_while_kept_alive(store: Store) -> None:
    kept = store.grant_lease(2)
    lost = store.grant_lease(1)
    store.put("node-alive", "n1", {"up": True}, lease=kept)
    store.put("node-alive", "n2", {"up": True}, lease=lost, expect=0)
    with pytest.raises(Conflict):  # a live key blocks a second owner
        store.put("node-alive", "n2", {"up": True}, expect=0)
    base = store.revision()
    deadline = time.monotonic() + scaled(4)
    while time.monotonic() < deadline and store.get("node-alive", "n2") is not None:
        assert store.keep_alive(kept)
        time.sleep(0.3)
    assert store.get("node-alive", "n2") is None, "the lapsed lease's key is still there"
    assert store.get("node-alive", "n1") is not None
    deleted = [e for e in _events(store, base) if e.type == "delete"]
    assert [(e.kind, e.name) for e in deleted] == [("node-alive", "n2")]
    assert not store.keep_alive(lost)
    with pytest.raises(LeaseExpired):
        store.put("node-alive", "n3", {}, lease=lost)
    store.revoke_lease(kept)
    assert store.get("node-alive", "n1") is None
    store.revoke_lease(kept)  # a second revoke is a no-op


def test_threads_share_one_store(store: Store) -> None:
    def create(i: int) -> None:
        for j in range(10):
            store.put("task", f"t{i}.{j}", {}, expect=0)

    threads = [threading.Thread(target=create, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(store.list("task")) == 80


Outcome = tuple[str, int, object]


def _create_service(
    target: Target, name: str, owner: int, start: Barrier, results: Queue[Outcome]
) -> None:
    """One 'meshctl service create' in its own process: open the store, then create at once."""
    start.wait()
    try:
        with open_store(*target) as store:
            record = store.put("service", name, {"owner": owner}, expect=0)
        results.put(("ok", owner, record.mod_revision))
    except Conflict as err:
        results.put(("conflict", owner, str(err)))
    except Exception as err:  # reported to the test instead of lost in a child's stderr
        results.put(("error", owner, repr(err)))


def _race(target: Target, names: list[str]) -> list[Outcome]:
    """Start one process per name on a fresh store, all released together."""
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(len(names))
    results: Queue[Outcome] = ctx.Queue()
    procs = [
        ctx.Process(target=_create_service, args=(target, name, i, start, results))
        for i, name in enumerate(names)
    ]
    for proc in procs:
        proc.start()
    try:
        outcomes = [results.get(timeout=scaled(60)) for _ in procs]
    finally:
        for proc in procs:
            proc.join(timeout=scaled(10))
            if proc.is_alive():
                proc.kill()
    return outcomes


def test_20_processes_create_distinct_services_all_stored(target: Target) -> None:
    with open_store(*target) as store:
        base = store.revision()
    outcomes = _race(target, [f"svc{i}" for i in range(20)])
    assert [o for o in outcomes if o[0] != "ok"] == []
    with open_store(*target) as store:
        assert sorted(r.name for r in store.list("service")) == sorted(f"svc{i}" for i in range(20))
        revisions = sorted(r.mod_revision for r in store.list("service"))
        assert revisions == list(range(base + 1, base + 21))


def test_20_processes_create_the_same_service_exactly_one_wins(target: Target) -> None:
    with open_store(*target) as store:
        base = store.revision()
    outcomes = _race(target, ["web"] * 20)
    winners = [o for o in outcomes if o[0] == "ok"]
    losers = [o for o in outcomes if o[0] == "conflict"]
    assert len(winners) == 1 and len(losers) == 19, outcomes
    assert all("service web already exists" in str(o[2]) for o in losers)
    with open_store(*target) as store:
        (web,) = store.list("service")
        assert web.value == {"owner": winners[0][1]}
        assert store.revision() == base + 1


def test_state_dir_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MESHCTL_STATE_DIR", raising=False)
    assert resolve_state_dir(None) == "/var/lib/meshctl"
    monkeypatch.setenv("MESHCTL_STATE_DIR", str(tmp_path / "env"))
    assert resolve_state_dir(None) == str(tmp_path / "env")
    assert resolve_state_dir(str(tmp_path / "cli")) == str(tmp_path / "cli")
    assert default_store_url("/var/lib/meshctl") == "sqlite:///var/lib/meshctl/state.db"


def test_open_store_urls(tmp_path: Path) -> None:
    with open_store(f"sqlite:///{tmp_path}/a.db") as store:  # SQLAlchemy's four slashes
        store.put("node", "n1", {})
    with open_store(f"sqlite://{tmp_path}/a.db") as store:
        assert store.get("node", "n1") is not None
    assert parse_etcd_url("etcd://10.0.0.1:2379") == ([("10.0.0.1", 2379)], "/meshctl")
    assert parse_etcd_url("etcd://a,b:4001/x/y/") == ([("a", 2379), ("b", 4001)], "/x/y")
    assert parse_etcd_url("http://a:1/p") == ([("a", 1)], "/p")  # etcd://'s synonym
    assert parse_etcd_url("https://a,[::1]:2/") == ([("a", 2379), ("::1", 2)], "/meshctl")
    for bad in ("etcd://", "etcd://a:notaport", "etcd://a,,b"):
        with pytest.raises(StoreError, match="HOST:PORT"):
            parse_etcd_url(bad)
    with pytest.raises(StoreError, match="absolute path"):
        open_store("sqlite://state.db")
    with pytest.raises(StoreError, match="use sqlite:///.*https://HOST:PORT"):
        open_store("mysql://db/meshctl")


def test_a_conflict_is_tried_again_after_a_growing_random_pause(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Retries made at once all lose to a writer that keeps writing (the leader placing tasks
    while a create claims addresses on the same network): each waits a random pause, growing."""
    import meshctl.store as store_module
    from meshctl.store import Conflict, retry_conflicts

    pauses: list[float] = []
    monkeypatch.setattr(store_module.time, "sleep", pauses.append)
    outcomes = iter([Conflict("service", "web", 3, 4)] * 3 + [None])

    def attempt() -> str:
        failure = next(outcomes)
        if failure is not None:
            raise failure
        return "done"

    assert retry_conflicts(attempt, "creating web") == "done"
    assert len(pauses) == 3
    assert all(0 <= p <= store_module.RETRY_PAUSE * 2**i for i, p in enumerate(pauses))

    def always_moved() -> str:
        raise Conflict("service", "web", 3, 4)

    pauses.clear()
    with pytest.raises(StoreError, match="creating web: the store kept changing meanwhile"):
        retry_conflicts(always_moved, "creating web")
    assert len(pauses) == store_module.RETRY_ATTEMPTS - 1  # none after the last attempt
    assert max(pauses) <= store_module.RETRY_PAUSE_CAP
