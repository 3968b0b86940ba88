"""A local copy of the whole store, kept current by one watch (Kubernetes' informer).

It lists everything once (one snapshot), then applies the watch's events. When the history it
needs is gone (the store compacted it while the watch was away) or the store was out of reach,
it lists again and compares with its copy: keys that vanished meanwhile are emitted as deletes
(mark and sweep, as Cilium and Calico do), changed ones as puts, so a consumer of events never
keeps something the store no longer has. Readers take a snapshot of the copy: one revision,
without a request to the store. While the store is unreachable, the copy stays as it was and
`connected` is False; the informer retries with a growing back-off and resyncs.

A record built from a watch event carries the event's revision as its mod_revision (what
compare-and-swaps need); its create_revision is kept from the copy, or that same revision.
Kinds in `ignore` (the event log, which only the CLI reads) are neither kept nor reported: a
write of theirs wakes no controller. For /metrics it counts its re-lists by reason and knows
when its copy was last known to hold everything in the store.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection

from meshctl.stats import Counts
from meshctl.store import Compacted, Event, Record, Snapshot, Store, StoreError

log = logging.getLogger("meshctl.informer")

Key = tuple[str, str]
Change = tuple[Record | None, Event]  # a key's record in the copy before the event, the event
WATCH_TIMEOUT = 1.0
BACKOFF_START = 0.2
BACKOFF_CAP = 5.0


def sweep(old: dict[Key, Record], new: Snapshot) -> list[Event]:
    """The events that take a copy `old` to the snapshot: deletes of keys gone, puts of keys
    new or changed (at the snapshot's revision)."""
    fresh = {(r.kind, r.name): r for records in new.records.values() for r in records}
    events = [
        Event(new.revision, "delete", kind, name, None)
        for kind, name in sorted(set(old) - set(fresh))
    ]
    events += [
        Event(record.mod_revision, "put", record.kind, record.name, record.value)
        for key, record in sorted(fresh.items())
        if key not in old or old[key].mod_revision != record.mod_revision
    ]
    return events


class Informer:
    """Follows a store from a thread of its own; on_events(events) is called for every batch
    applied (from that thread), deletes found by a re-list included; on_changes, if given,
    with each event and the record it replaced."""

    def __init__(
        self,
        store: Store,
        on_events: Callable[[list[Event]], None] = lambda events: None,
        *,
        ignore: Collection[str] = (),
        on_changes: Callable[[list[Change]], None] | None = None,
    ) -> None:
        self.store = store
        self._on_events = on_events
        self._on_changes = on_changes
        self._ignore = frozenset(ignore)
        self._records: dict[Key, Record] = {}
        self._revision = 0
        self._listed = False  # the copy holds a whole snapshot
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.connected = False
        self.error = ""
        self.relists = Counts()  # by reason: compacted, unreachable
        self.current_at = 0.0  # monotonic time the copy last held all the store had

    # -- reading -------------------------------------------------------------------------------

    @property
    def revision(self) -> int:
        with self._changed:
            return self._revision

    def snapshot(self) -> Snapshot:
        """The copy as a Snapshot (every record at the copy's revision)."""
        with self._changed:
            records: dict[str, list[Record]] = {}
            for (kind, _), record in sorted(self._records.items()):
                records.setdefault(kind, []).append(record)
            return Snapshot(self._revision, records)

    def wait_for(self, revision: int, timeout: float) -> bool:
        """Wait until the copy has reached revision (e.g. one's own write); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self._revision < revision or not self._listed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(remaining)
            return True

    def sync(self, timeout: float = 5.0) -> bool:
        """Wait until the copy holds everything written to the store so far."""
        try:
            return self.wait_for(self.store.revision(), timeout)
        except StoreError:
            return False

    # -- following -----------------------------------------------------------------------------

    def start(self) -> Informer:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="informer", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=WATCH_TIMEOUT + 5)

    def _run(self) -> None:
        backoff = BACKOFF_START
        relist = True
        while not self._stop.is_set():
            try:
                if relist:
                    self._relist()
                    relist = False
                asked = time.monotonic()
                events = self.store.watch(self.revision, timeout=WATCH_TIMEOUT)
                if events:
                    self._apply(events)
                # Nothing new: current now. Events: current at least as of the question.
                self.current_at = asked if events else time.monotonic()
                backoff = BACKOFF_START
            except Compacted as err:
                log.info("the store's history moved on (%s); listing again", err)
                self.relists.inc("compacted")
                relist = True
            except StoreError as err:
                if self.connected or not self.error:
                    log.warning("store unreachable, keeping the last state: %s", err)
                    self.relists.inc("unreachable")
                self.connected, self.error = False, str(err)
                relist = True
                self._stop.wait(backoff)
                backoff = min(backoff * 2, BACKOFF_CAP)

    def _relist(self) -> None:
        asked = time.monotonic()
        snapshot = self.store.snapshot()
        if self._ignore:
            kept = {k: rs for k, rs in snapshot.records.items() if k not in self._ignore}
            snapshot = Snapshot(snapshot.revision, kept)
        with self._changed:
            old = self._records
            events = sweep(old, snapshot) if self._listed else []
            self._records = {
                (r.kind, r.name): r for records in snapshot.records.values() for r in records
            }
            self._revision = snapshot.revision
            self._listed = True
            self._changed.notify_all()
        if not self.connected and self.error:
            log.info("store reachable again at revision %d", snapshot.revision)
        self.connected, self.error = True, ""
        self.current_at = asked
        if self._on_changes is not None and events:
            self._on_changes([(old.get((e.kind, e.name)), e) for e in events])
        self._on_events(events)  # also when empty: a fresh copy is news to one who waited

    def _apply(self, events: list[Event]) -> None:
        changes: list[Change] = []
        with self._changed:
            for event in events:
                if event.kind in self._ignore:
                    continue
                key = (event.kind, event.name)
                before = self._records.get(key)
                changes.append((before, event))
                if event.type == "delete" or event.value is None:
                    self._records.pop(key, None)
                    continue
                created = before.create_revision if before else event.revision
                self._records[key] = Record(
                    event.kind, event.name, event.value, created, event.revision
                )
            self._revision = max(self._revision, events[-1].revision)
            self._changed.notify_all()
        if not changes:
            return
        if self._on_changes is not None:
            self._on_changes(changes)
        self._on_events([event for _, event in changes])
