"""The desired-state store: a small, etcd-shaped key-value API that every part of meshctl uses.

Keys are (kind, name), values JSON-able dicts. One global revision grows with every write, so
callers can compare-and-swap on a key's mod_revision and watch every change after a revision.
Leases make keys that vanish when their owner stops renewing them (node liveness, leadership).
Two implementations: embedded SQLite (the default, one host) and etcd (a cluster).
"""

from __future__ import annotations

import builtins
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Protocol, Self, TypeVar

if TYPE_CHECKING:
    from meshctl.store.etcd_access import EtcdAccess

DEFAULT_STATE_DIR = "/var/lib/meshctl"
STATE_DIR_ENV = "MESHCTL_STATE_DIR"
STATE_DB = "state.db"

# A stored value: a dict that survives a JSON round trip.
Value = dict[str, Any]
EventType = Literal["put", "delete"]


@dataclass(frozen=True)
class Record:
    """One stored key: its value, the revision that created it and the one that last changed it."""

    kind: str
    name: str
    value: Value
    create_revision: int
    mod_revision: int


@dataclass(frozen=True)
class Event:
    """One change in the store's history; value is None for a delete."""

    revision: int
    type: EventType
    kind: str
    name: str
    value: Value | None


@dataclass(frozen=True)
class Put:
    """A write inside a txn. expect: None unconditional, 0 must not exist, N mod_revision is N.

    lease: 0 for a key that stays, else a lease id from grant_lease (the key goes with it).
    """

    kind: str
    name: str
    value: Value
    expect: int | None = None
    lease: int = 0


@dataclass(frozen=True)
class Delete:
    """A delete inside a txn, expect as for Put; a missing key with expect None is a no-op."""

    kind: str
    name: str
    expect: int | None = None


@dataclass(frozen=True)
class Check:
    """A compare inside a txn that writes nothing: the key's mod_revision is expect (0: absent).

    It makes a txn depend on a record it does not change (an allocation on a network that a
    concurrent `network rm` could delete)."""

    kind: str
    name: str
    expect: int


Op = Put | Delete | Check


@dataclass(frozen=True)
class Snapshot:
    """Every record of the store at one revision, by kind (each list sorted by name)."""

    revision: int
    records: dict[str, builtins.list[Record]]

    def of(self, kind: str) -> builtins.list[Record]:
        return self.records.get(kind, [])


class StoreError(Exception):
    """The store could not do what was asked; the message says what to do next."""


class Conflict(StoreError):
    """A compare-and-swap failed: the key is not at the revision the caller expected.

    expect is what the caller asked for (0: must not exist); actual is the key's mod_revision
    now (0: it does not exist). `exists` tells "already exists" from "changed meanwhile".
    """

    def __init__(self, kind: str, name: str, expect: int, actual: int) -> None:
        self.kind = kind
        self.name = name
        self.expect = expect
        self.actual = actual
        if expect == 0:
            detail = f"already exists (revision {actual})"
        elif actual == 0:
            detail = f"does not exist (expected revision {expect})"
        else:
            detail = f"changed meanwhile (revision {actual}, expected {expect}); read it again"
        super().__init__(f"{kind} {name} {detail}")

    @property
    def exists(self) -> bool:
        return self.actual != 0


class Compacted(StoreError):
    """The history asked for is gone: list the current state again and watch from its revision."""

    def __init__(self, revision: int, compacted: int) -> None:
        self.revision = revision
        self.compacted = compacted
        super().__init__(
            f"store history up to revision {compacted} was compacted, cannot watch from "
            f"{revision}; list again and watch from the current revision"
        )


class Unavailable(StoreError):
    """The store cannot be reached now (etcd down or cut off); the caller may retry later."""


class LeaseExpired(StoreError):
    """A write named a lease that has expired (or never existed): grant a new one."""

    def __init__(self, lease: int) -> None:
        self.lease = lease
        super().__init__(f"lease {lease:x} has expired; its keys are gone")


class ClosedOnExit:
    """`with store:` closes the store at the end of the block."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Store(Protocol):
    """Desired state: get, list, put and delete with compare-and-swap, atomic txn, watch, leases.

    To follow the store without missing a change: snap = snapshot(), then loop on
    watch(snap.revision) and move on to the last event's revision (meshctl.store.informer does
    this, and re-lists when the history it needs was compacted).
    """

    # True when several hosts share the store (etcd): networks span nodes by default.
    distributed: bool

    def get(self, kind: str, name: str) -> Record | None:
        """The record of a key, None if absent."""
        ...

    def list(self, kind: str, prefix: str = "") -> builtins.list[Record]:
        """All records of a kind (whose name starts with prefix), sorted by name."""
        ...

    def snapshot(self) -> Snapshot:
        """Every record at one revision: what a reconcile pass reads."""
        ...

    def revision(self) -> int:
        """The store's current revision (0 for an empty store that was never written)."""
        ...

    def put(
        self, kind: str, name: str, value: Value, *, expect: int | None = None, lease: int = 0
    ) -> Record:
        """Write a key at a new revision; raise Conflict when expect does not hold."""
        ...

    def delete(self, kind: str, name: str, *, expect: int | None = None) -> bool:
        """Delete a key; True if it existed. Raise Conflict when expect does not hold."""
        ...

    def txn(self, ops: Sequence[Op]) -> int:
        """Apply all ops at one new revision or none (Conflict); return the store's revision.

        Every op's expect is checked against the state before the txn; a key may appear only
        once. A txn that changes nothing (only checks, deletes of missing keys) adds no revision.
        """
        ...

    def watch(self, from_revision: int, *, timeout: float) -> builtins.list[Event]:
        """Block until there are events after from_revision and return them, oldest first (not
        necessarily all of them: watch again from the last one's revision); [] on timeout.
        Compacted if that history is gone."""
        ...

    def grant_lease(self, ttl: float) -> int:
        """A new lease that expires ttl seconds from now unless kept alive; its id (never 0)."""
        ...

    def keep_alive(self, lease: int) -> bool:
        """Renew a lease for its whole ttl; False if it expired already (its keys are gone)."""
        ...

    def revoke_lease(self, lease: int) -> None:
        """End a lease now: its keys are deleted. A missing lease is a no-op."""
        ...

    def close(self) -> None:
        """Release the store's connections; the object is unusable afterwards."""
        ...

    def __enter__(self) -> Store: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


RETRY_ATTEMPTS = 20
RETRY_PAUSE = 0.005  # seconds: the first retry's longest pause; it doubles up to the cap
RETRY_PAUSE_CAP = 0.25
T = TypeVar("T")


def retry_conflicts(attempt: Callable[[], T], what: str) -> T:
    """Run a read-compute-txn attempt again while another writer wins the compare-and-swap.

    Every operation that reads records and writes them back is one such attempt: it reads,
    validates and writes in one txn whose expects name what it read, so racing writers never
    half-apply and the loser decides again on fresh data.
    """
    for tries in range(RETRY_ATTEMPTS):
        try:
            return attempt()
        except Conflict:
            if tries == RETRY_ATTEMPTS - 1:
                break
            # A pause of random length, growing: a writer that keeps writing the same records
            # (the leader placing tasks on the network whose addresses a create claims) would
            # otherwise win every retry made at once, all in a few milliseconds.
            time.sleep(random.uniform(0, min(RETRY_PAUSE_CAP, RETRY_PAUSE * 2**tries)))
    raise StoreError(f"{what}: the store kept changing meanwhile; try again")


def resolve_state_dir(cli_value: str | None) -> str:
    """The state dir as an absolute path: --state-dir, else $MESHCTL_STATE_DIR, else the default."""
    chosen = cli_value or os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR
    return os.path.abspath(chosen)


def default_store_url(state_dir: str) -> str:
    """The --store default: the SQLite file state.db in the state directory."""
    return "sqlite://" + os.path.join(os.path.abspath(state_dir), STATE_DB)


def open_store(url: str, access: EtcdAccess | None = None) -> Store:
    """Open the store a --store URL names: sqlite:///abs/path/state.db, or
    etcd://HOST:PORT[,HOST:PORT...][/PREFIX] (keys under PREFIX, default /meshctl; http:// is
    the same), or https://… for etcd over TLS with the certificates and login of access."""
    if access is not None and not url.startswith("https://"):
        raise StoreError(
            f"--cacert, --cert, --key, --user and --password-file are for an https:// store, "
            f"not {url!r}"
        )
    if url.startswith("sqlite://"):
        path = url.removeprefix("sqlite://")
        if not path.startswith("/"):
            raise StoreError(
                f"store URL {url!r} needs an absolute path, like sqlite:///var/lib/meshctl/state.db"
            )
        from meshctl.store.sqlite import SqliteStore

        # sqlite:////abs (SQLAlchemy's spelling) names the same file as sqlite:///abs.
        return SqliteStore("/" + path.lstrip("/"))
    if url.startswith(("etcd://", "http://", "https://")):
        from meshctl.store.etcd import EtcdStore, parse_etcd_url

        if url.startswith("https://") and access is None:
            raise StoreError(f"store URL {url!r} is TLS: give --cacert, --cert and --key")
        endpoints, prefix = parse_etcd_url(url)
        return EtcdStore(endpoints, prefix, access=access)
    raise StoreError(
        f"store URL {url!r} is not understood; use sqlite:///<absolute path to state.db>, "
        "etcd://HOST:PORT[,HOST:PORT...] or https://HOST:PORT[,HOST:PORT...] (TLS)"
    )
