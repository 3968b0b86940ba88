"""The embedded store: one SQLite file in WAL mode, shared safely by several CLIs and a controller.

Writes run in BEGIN IMMEDIATE transactions, so a compare-and-swap check and its write are one
atomic step across processes. Every write appends to an events table (the watch history), which
is compacted to the last `history` revisions; watchers poll the revision every few milliseconds.
Leases expire by the wall clock, which every process on the host shares: any store object that
writes, watches or reads next deletes an expired lease's keys, as etcd's leader would.
"""

from __future__ import annotations

import builtins
import json
import os
import random
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from meshctl.store import (
    ClosedOnExit,
    Compacted,
    Conflict,
    Delete,
    Event,
    LeaseExpired,
    Op,
    Put,
    Record,
    Snapshot,
    StoreError,
    Value,
)

# Statements one by one: executescript() would commit the surrounding transaction.
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    "INSERT OR IGNORE INTO meta (key, value) VALUES ('revision', 0), ('compacted', 0)",
    """CREATE TABLE IF NOT EXISTS kv (
        kind TEXT NOT NULL,
        name TEXT NOT NULL,
        value TEXT NOT NULL,
        create_revision INTEGER NOT NULL,
        mod_revision INTEGER NOT NULL,
        PRIMARY KEY (kind, name)
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS events (
        id INTEGER PRIMARY KEY,
        revision INTEGER NOT NULL,
        type TEXT NOT NULL,
        kind TEXT NOT NULL,
        name TEXT NOT NULL,
        value TEXT
    )""",
    "CREATE INDEX IF NOT EXISTS events_revision ON events (revision)",
    """CREATE TABLE IF NOT EXISTS leases (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        ttl REAL NOT NULL,
        expires REAL NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS leases_expires ON leases (expires)",
)
# Files made before leases existed get the column on open.
_KV_LEASE = "ALTER TABLE kv ADD COLUMN lease INTEGER NOT NULL DEFAULT 0"


class SqliteStore(ClosedOnExit):
    """The Store protocol on one SQLite file; one connection per instance, shared by its threads.

    history is how many revisions of events stay watchable; busy_timeout how long a write waits
    for another process's write; poll_interval how often watch() looks for a new revision.
    """

    distributed = False  # one host's file

    def __init__(
        self,
        path: str,
        *,
        history: int = 10_000,
        busy_timeout: float = 30.0,
        poll_interval: float = 0.002,
    ) -> None:
        self.path = path
        self._history = history
        self._busy_timeout = busy_timeout
        self._poll_interval = poll_interval
        # sqlite3 connections are not safe to use from two threads at once: serialize.
        self._lock = threading.Lock()
        self._written = threading.Condition()  # notified after each of this object's commits
        _create_private_file(path)
        try:
            self._db = sqlite3.connect(
                path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as err:
            raise self._error(err) from err
        try:
            self._setup()
        except BaseException:
            self._db.close()
            raise

    def _setup(self) -> None:
        """Switch to WAL (readers never block the writer) and create the tables if missing."""
        mode = self._enable_wal()
        if mode != "wal":
            raise StoreError(
                f"store {self.path}: SQLite cannot use WAL mode there (got {mode!r}); "
                "put the state dir on a local filesystem"
            )
        with self._transaction() as db:
            for statement in _SCHEMA:
                db.execute(statement)
            columns = {row[1] for row in db.execute("PRAGMA table_info(kv)")}
            if "lease" not in columns:
                db.execute(_KV_LEASE)

    def _enable_wal(self) -> str:
        """Set WAL mode and return the mode SQLite settled on.

        Processes opening a new file at once race to convert it, and SQLite reports the losers
        busy at once instead of waiting; so retry, jittered, until busy_timeout.
        """
        deadline = time.monotonic() + self._busy_timeout
        while True:
            try:
                with self._lock:
                    return str(self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0])
            except sqlite3.Error as err:
                if "locked" not in str(err) or time.monotonic() > deadline:
                    raise self._error(err) from err
            time.sleep(random.uniform(0.001, 0.02))

    # -- reads ---------------------------------------------------------------------------------

    def get(self, kind: str, name: str) -> Record | None:
        self._expire_due()
        with self._reading() as db:
            row = db.execute(
                "SELECT value, create_revision, mod_revision FROM kv WHERE kind = ? AND name = ?",
                (kind, name),
            ).fetchone()
        if row is None:
            return None
        return Record(kind, name, _decode(self.path, kind, name, row[0]), row[1], row[2])

    def list(self, kind: str, prefix: str = "") -> builtins.list[Record]:
        self._expire_due()
        with self._reading() as db:
            rows = db.execute(
                "SELECT name, value, create_revision, mod_revision FROM kv WHERE kind = ? "
                "AND substr(name, 1, ?) = ? ORDER BY name",
                (kind, len(prefix), prefix),
            ).fetchall()
        return [
            Record(kind, name, _decode(self.path, kind, name, value), c, m)
            for name, value, c, m in rows
        ]

    def snapshot(self) -> Snapshot:
        self._expire_due()
        records: dict[str, builtins.list[Record]] = {}
        with self._reading() as db:
            db.execute("BEGIN")  # one read transaction: one revision
            try:
                revision = _meta(db, "revision")
                rows = db.execute(
                    "SELECT kind, name, value, create_revision, mod_revision FROM kv "
                    "ORDER BY kind, name"
                ).fetchall()
            finally:
                db.execute("COMMIT")
        for kind, name, value, c, m in rows:
            records.setdefault(kind, []).append(Record(kind, name, json.loads(value), c, m))
        return Snapshot(revision, records)

    def revision(self) -> int:
        with self._reading() as db:
            return _meta(db, "revision")

    def events_since(self, revision: int) -> builtins.list[Event]:
        with self._reading() as db:
            # One read transaction: the compaction mark and the events come from one snapshot.
            db.execute("BEGIN")
            try:
                compacted = _meta(db, "compacted")
                rows = db.execute(
                    "SELECT revision, type, kind, name, value FROM events WHERE revision > ? "
                    "ORDER BY id",
                    (revision,),
                ).fetchall()
            finally:
                db.execute("COMMIT")
        if revision < compacted:
            raise Compacted(revision, compacted)
        return [
            Event(rev, typ, kind, name, _decode(self.path, kind, name, value) if value else None)
            for rev, typ, kind, name, value in rows
        ]

    def watch(self, from_revision: int, *, timeout: float) -> builtins.list[Event]:
        deadline = time.monotonic() + timeout
        while True:
            # The revision is one indexed row: cheap enough to poll every few milliseconds.
            self._expire_due()
            if self.revision() > from_revision:
                return self.events_since(from_revision)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            # Another process's write is seen at the next poll; this object's own writes wake
            # the watcher at once (the controller's writes, a bench driving it).
            with self._written:
                self._written.wait(min(self._poll_interval, remaining))

    # -- writes --------------------------------------------------------------------------------

    def put(
        self, kind: str, name: str, value: Value, *, expect: int | None = None, lease: int = 0
    ) -> Record:
        revision, before = self._apply([Put(kind, name, value, expect, lease)])
        prior = before[(kind, name)]
        # Give back what get() would: the value after its JSON round trip.
        stored = json.loads(_encode(value))
        return Record(kind, name, stored, prior[0] if prior else revision, revision)

    def delete(self, kind: str, name: str, *, expect: int | None = None) -> bool:
        _, before = self._apply([Delete(kind, name, expect)])
        return before[(kind, name)] is not None

    def txn(self, ops: Sequence[Op]) -> int:
        revision, _ = self._apply(ops)
        return revision

    def _apply(
        self, ops: Sequence[Op]
    ) -> tuple[int, dict[tuple[str, str], tuple[int, int] | None]]:
        """Check every op's expect, then write them all at one new revision (or nothing).

        Returns the store's revision after the txn and each key's (create, mod) revisions before.
        """
        keys = [(op.kind, op.name) for op in ops]
        if len(set(keys)) != len(keys):
            raise ValueError(f"a txn may name each key once; got {keys}")
        # Serialize before locking: a bad value fails without holding the write lock.
        encoded = [_encode(op.value) if isinstance(op, Put) else None for op in ops]
        with self._transaction() as db:
            self._expire(db)
            before = {key: _revisions(db, *key) for key in keys}
            for op, key in zip(ops, keys, strict=True):
                prior = before[key]
                actual = prior[1] if prior else 0
                if op.expect is not None and op.expect != actual:
                    raise Conflict(op.kind, op.name, op.expect, actual)
            for op in ops:
                if isinstance(op, Put) and op.lease and not _lease_alive(db, op.lease):
                    raise LeaseExpired(op.lease)
            # Deleting a missing key changes nothing: no event, and no revision if nothing else.
            changes = [
                (op, key, value)
                for op, key, value in zip(ops, keys, encoded, strict=True)
                if isinstance(op, Put) or (isinstance(op, Delete) and before[key] is not None)
            ]
            revision = _meta(db, "revision")
            if not changes:
                return revision, before
            revision += 1
            for op, key, value in changes:
                prior = before[key]
                if isinstance(op, Put):
                    db.execute(
                        "INSERT OR REPLACE INTO kv VALUES (?, ?, ?, ?, ?, ?)",
                        (*key, value, prior[0] if prior else revision, revision, op.lease),
                    )
                else:
                    db.execute("DELETE FROM kv WHERE kind = ? AND name = ?", key)
                _record_event(db, revision, "put" if isinstance(op, Put) else "delete", key, value)
            self._commit_revision(db, revision)
        self._notify()
        return revision, before

    def _commit_revision(self, db: sqlite3.Connection, revision: int) -> None:
        db.execute("UPDATE meta SET value = ? WHERE key = 'revision'", (revision,))
        self._compact(db, revision)

    def _notify(self) -> None:
        with self._written:
            self._written.notify_all()

    # -- leases --------------------------------------------------------------------------------

    def grant_lease(self, ttl: float) -> int:
        if ttl <= 0:
            raise ValueError(f"a lease needs a ttl above 0, not {ttl}")
        with self._transaction() as db:
            self._expire(db)
            cursor = db.execute(
                "INSERT INTO leases (ttl, expires) VALUES (?, ?)", (ttl, time.time() + ttl)
            )
            lease = cursor.lastrowid
        assert lease
        return lease

    def keep_alive(self, lease: int) -> bool:
        with self._transaction() as db:
            expired = self._expire(db)
            cursor = db.execute(
                "UPDATE leases SET expires = ? + ttl WHERE id = ?", (time.time(), lease)
            )
            alive = cursor.rowcount == 1
        if expired:
            self._notify()
        return alive

    def revoke_lease(self, lease: int) -> None:
        with self._transaction() as db:
            db.execute("UPDATE leases SET expires = 0 WHERE id = ?", (lease,))
            expired = self._expire(db)
        if expired:
            self._notify()

    def _expire_due(self) -> None:
        """Expire leases whose time is up, if any (a cheap indexed look when none is)."""
        with self._reading() as db:
            due = db.execute(
                "SELECT 1 FROM leases WHERE expires <= ? LIMIT 1", (time.time(),)
            ).fetchone()
        if due:
            with self._transaction() as db:
                self._expire(db)
            self._notify()

    def _expire(self, db: sqlite3.Connection) -> bool:
        """Inside a write transaction: delete the expired leases and their keys, at one new
        revision with an event per key; True if any key went."""
        now = time.time()
        leases = [row[0] for row in db.execute("SELECT id FROM leases WHERE expires <= ?", (now,))]
        if not leases:
            return False
        marks = ",".join("?" * len(leases))
        keys = db.execute(
            f"SELECT kind, name FROM kv WHERE lease IN ({marks}) ORDER BY kind, name", leases
        ).fetchall()
        db.execute(f"DELETE FROM leases WHERE id IN ({marks})", leases)
        if not keys:
            return False
        revision = _meta(db, "revision") + 1
        db.execute(f"DELETE FROM kv WHERE lease IN ({marks})", leases)
        for key in keys:
            _record_event(db, revision, "delete", key, None)
        self._commit_revision(db, revision)
        return True

    def _compact(self, db: sqlite3.Connection, revision: int) -> None:
        """Forget events older than the last `history` revisions, so the log stays bounded."""
        horizon = revision - self._history
        if horizon > _meta(db, "compacted"):
            db.execute("DELETE FROM events WHERE revision <= ?", (horizon,))
            db.execute("UPDATE meta SET value = ? WHERE key = 'compacted'", (horizon,))

    # -- connection ----------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        """The connection for reads, under the lock, with SQLite errors made readable."""
        with self._lock:
            try:
                yield self._db
            except sqlite3.Error as err:
                raise self._error(err) from err

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction holding SQLite's write lock from the start: checks see no race."""
        with self._lock:
            db = self._db
            try:
                db.execute("BEGIN IMMEDIATE")
                try:
                    yield db
                    db.execute("COMMIT")
                finally:
                    if db.in_transaction:
                        db.execute("ROLLBACK")
            except sqlite3.Error as err:
                raise self._error(err) from err

    def _error(self, err: sqlite3.Error) -> StoreError:
        """A StoreError for a SQLite failure that says what to do about it."""
        corrupt = _corrupt(self.path, err)
        if corrupt is not None:
            return corrupt
        text = str(err)
        if "locked" in text or "busy" in text:
            return StoreError(
                f"store {self.path} is busy: another meshctl held it for over "
                f"{self._busy_timeout:g}s; try again"
            )
        if "unable to open" in text or "readonly" in text:
            return StoreError(
                f"cannot open store {self.path} ({text}); run as root or pass a writable "
                "--state-dir"
            )
        return StoreError(f"store {self.path}: {text}")


def _create_private_file(path: str) -> None:
    """Create the state dir (0700) and the db file (0600) if missing; SQLite gives its -wal and
    -shm files the db file's mode, so the desired state is readable by root only."""
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    except OSError as err:
        raise StoreError(
            f"cannot open store {path} ({err.strerror}); run as root or pass a writable --state-dir"
        ) from err


def _corrupt(path: str, err: sqlite3.Error) -> StoreError | None:
    """The one-line error for a file SQLite cannot read as a database (random bytes, damaged
    pages); None for any other failure."""
    code = getattr(err, "sqlite_errorcode", 0) & 0xFF  # the primary code of an extended one
    if code not in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
        return None
    return StoreError(
        f"store {path} is corrupt ({err}); move it aside and recreate the state, or restore "
        "a backup"
    )


def _decode(path: str, kind: str, name: str, text: str) -> Value:
    """A stored value; a row that is not JSON is a one-line error naming it, not a traceback."""
    try:
        value: Value = json.loads(text)
        return value
    except (ValueError, RecursionError) as err:
        raise StoreError(
            f"store {path}: {kind} {name}: stored record is invalid (not JSON: {err}); "
            f"remove it with: meshctl store rm {kind} {name}"
        ) from None


def _meta(db: sqlite3.Connection, key: str) -> int:
    return int(db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0])


def _revisions(db: sqlite3.Connection, kind: str, name: str) -> tuple[int, int] | None:
    """(create_revision, mod_revision) of a key, None if absent."""
    row = db.execute(
        "SELECT create_revision, mod_revision FROM kv WHERE kind = ? AND name = ?", (kind, name)
    ).fetchone()
    return None if row is None else (row[0], row[1])


def _lease_alive(db: sqlite3.Connection, lease: int) -> bool:
    row = db.execute("SELECT expires FROM leases WHERE id = ?", (lease,)).fetchone()
    return row is not None and row[0] > time.time()


def _record_event(
    db: sqlite3.Connection, revision: int, kind: str, key: tuple[str, str], value: str | None
) -> None:
    db.execute(
        "INSERT INTO events (revision, type, kind, name, value) VALUES (?, ?, ?, ?, ?)",
        (revision, kind, *key, value),
    )


def _encode(value: Value) -> str:
    return json.dumps(value, sort_keys=True)
