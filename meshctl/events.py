"""The cluster's event log (`meshctl events`, as `docker events`): transitions of tasks,
services, networks, nodes and task health, and reconcile errors, kept in the store.

Events are derived from the store's own history: every controller follows the store (its
informer) and turns each change into the transitions it records (`derive`, a pure function of
the record before and after: a task's new history entries, a service scaled, a node's status
gone...). Only the leader writes them, as records of kind `event`, in txns of at most
store.changes.MAX_TXN_OPS puts. An event's name is its change's revision, key and index, so the
log is in the store's order, and a controller that takes the leadership over writes what it
saw in the last moments without doubling what its predecessor wrote. The leader prunes the log
to a window (default 1 hour) and a count (default 10,000). Controllers do not follow this
kind (their informers ignore it): writing an event wakes no pass.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from meshctl.model import (
    NETWORK,
    NODE,
    NODE_STATUS,
    SERVICE,
    TASK,
    MeshctlError,
    Network,
    Node,
    NodeStatus,
    Service,
    Task,
    ValidationError,
)
from meshctl.store import Delete, Event, Put, Record, Store, StoreError
from meshctl.store.changes import MAX_TXN_OPS
from meshctl.store.informer import Informer

log = logging.getLogger("meshctl.events")

EVENT = "event"
EventType = Literal["task", "service", "network", "node", "health", "reconcile"]
EVENT_TYPES: tuple[str, ...] = ("task", "service", "network", "node", "health", "reconcile")
DEFAULT_WINDOW = 3600.0
DEFAULT_LIMIT = 10_000
PRUNE_INTERVAL = 10.0  # seconds between the leader's looks at the log's size and age


@dataclass(frozen=True)
class MeshEvent:
    """One transition: what (type, action), of which object (name, id), where (node), when.

    revision is the store revision of the change it records; time is when it happened (a
    task's own history time) or when a controller saw the change.
    """

    revision: int
    time: float
    type: EventType
    action: str
    name: str
    id: str = ""
    node: str = ""
    attributes: dict[str, str] = field(default_factory=dict)
    key: str = ""  # the record's name in the store: set by derive

    def to_dict(self) -> dict[str, Any]:
        return {
            "time": self.time,
            "revision": self.revision,
            "type": self.type,
            "action": self.action,
            "name": self.name,
            "id": self.id,
            "node": self.node,
            "attributes": dict(self.attributes),
        }

    @classmethod
    def from_record(cls, record: Record) -> MeshEvent:
        data = record.value
        return cls(
            revision=int(data["revision"]),
            time=float(data["time"]),
            type=data["type"],
            action=str(data["action"]),
            name=str(data["name"]),
            id=str(data.get("id", "")),
            node=str(data.get("node", "")),
            attributes={str(k): str(v) for k, v in dict(data.get("attributes", {})).items()},
            key=record.name,
        )


# -- deriving events from changes (pure) -------------------------------------------------------


def derive(before: Record | None, event: Event, now: float) -> list[MeshEvent]:
    """The transitions one store change records (none for kinds without events). A record
    that cannot be read derives nothing: `meshctl store rm` is how it goes."""
    after = event.value
    old = before.value if before is not None else None
    try:
        derived = _DERIVERS[event.kind](old, after, now) if event.kind in _DERIVERS else []
    except (MeshctlError, KeyError, TypeError, ValueError):
        return []
    return [
        MeshEvent(
            event.revision,
            e.time,
            e.type,
            e.action,
            e.name,
            e.id,
            e.node,
            e.attributes,
            key=f"{event.revision:020d}-{event.kind}-{event.name}-{index}",
        )  # fmt: skip
        for index, e in enumerate(derived)
    ]


def _event(now: float, type_: EventType, action: str, name: str, id_: str = "",
           node: str = "", **attributes: object) -> MeshEvent:  # fmt: skip
    kept = {k: str(v) for k, v in attributes.items() if v not in (None, "")}
    return MeshEvent(0, now, type_, action, name, id_, node, kept)


def _task(old: dict[str, Any] | None, new: dict[str, Any] | None, now: float) -> list[MeshEvent]:
    if new is None:
        gone = Task.from_dict(old) if old is not None else None
        if gone is None:
            return []
        return [_event(now, "task", "remove", gone.name, gone.id, gone.node, service=gone.service)]
    task = Task.from_dict(new)
    if old is None:
        return [_event(now, "task", "create", task.name, task.id, task.node, service=task.service,
                       slot=task.slot, version=task.spec_version)]  # fmt: skip
    was = Task.from_dict(old)
    out: list[MeshEvent] = []
    stopping = was.desired_state != task.desired_state
    previous = was.history[-1].state if was.history else was.state
    for entry in _new_entries(was, task):
        if entry.state != previous:
            action = entry.state
        elif stopping:
            action, stopping = "stop", False
        else:
            action = "update"
        previous = entry.state
        out.append(
            _event(entry.time, "task", action, task.name, task.id, task.node,
                   service=task.service, message=entry.message,
                   desired_state=task.desired_state if action == "stop" else None,
                   exit_code=task.exit_code if action in ("failed", "complete") else None)
        )  # fmt: skip
    if stopping:
        out.append(_event(now, "task", "stop", task.name, task.id, task.node,
                          service=task.service, desired_state=task.desired_state))  # fmt: skip
    if task.health != was.health and task.health != "none":
        out.append(_event(now, "health", task.health, task.name, task.id, task.node,
                          service=task.service, was=was.health))  # fmt: skip
    return out


def _new_entries(was: Task, task: Task) -> Sequence[Any]:
    """The history entries a write added: those after the last one the task had before."""
    if not was.history:
        return task.history
    last = was.history[-1]
    for index in range(len(task.history) - 1, -1, -1):
        if task.history[index] == last:
            return task.history[index + 1 :]
    return [e for e in task.history if e.time > last.time]


def _service(old: dict[str, Any] | None, new: dict[str, Any] | None, now: float) -> list[MeshEvent]:
    if new is None:
        gone = Service.from_dict(old) if old is not None else None
        return [_event(now, "service", "remove", gone.name, gone.id)] if gone else []
    service = Service.from_dict(new)
    if old is None:
        return [_event(now, "service", "create", service.name, service.id,
                       replicas=service.replicas, version=service.version)]  # fmt: skip
    was = Service.from_dict(old)
    out = []
    if was.replicas != service.replicas:
        out.append(_event(now, "service", "scale", service.name, service.id,
                          replicas=service.replicas, was=was.replicas))  # fmt: skip
    if was.version != service.version:
        out.append(_event(now, "service", "update", service.name, service.id,
                          version=service.version))  # fmt: skip
    return out


def _network(old: dict[str, Any] | None, new: dict[str, Any] | None, now: float) -> list[MeshEvent]:
    if (old is None) == (new is None):
        return []
    net = Network.from_dict(new if new is not None else old)  # type: ignore[arg-type]
    action = "create" if old is None else "remove"
    return [_event(now, "network", action, net.name, net.id, driver=net.driver, subnet=net.subnet)]


def _node(old: dict[str, Any] | None, new: dict[str, Any] | None, now: float) -> list[MeshEvent]:
    if new is None:
        gone = Node.from_dict(old) if old is not None else None
        return [_event(now, "node", "remove", gone.name, gone.id)] if gone else []
    node = Node.from_dict(new)
    if old is None:
        return [_event(now, "node", "join", node.name, node.id, address=node.address)]
    was = Node.from_dict(old)
    if (was.availability, was.labels) == (node.availability, node.labels):
        return []
    labels = ",".join(f"{k}={v}" for k, v in sorted(node.labels.items()))
    return [_event(now, "node", "update", node.name, node.id, availability=node.availability,
                   labels=labels)]  # fmt: skip


def _status(old: dict[str, Any] | None, new: dict[str, Any] | None, now: float) -> list[MeshEvent]:
    """A node's status: up and down with its lease; its reconcile errors as they start and end."""
    was = NodeStatus.from_dict(old) if old is not None else None
    status = NodeStatus.from_dict(new) if new is not None else None
    name = (status or was).node  # type: ignore[union-attr]
    if status is None:
        return [_event(now, "node", "down", name, node=name)]
    out = [] if was is not None else [_event(now, "node", "ready", name, node=name)]
    was = was or NodeStatus(name)
    if status.message != was.message:
        action = "degraded" if status.message else "recovered"
        out.append(_event(now, "reconcile", action, name, node=name,
                          message=status.message or was.message))  # fmt: skip
    for part, why in sorted(status.errors.items()):
        if was.errors.get(part) != why:
            out.append(_event(now, "reconcile", "error", part, node=name, error=why))
    for part in sorted(set(was.errors) - set(status.errors)):
        out.append(_event(now, "reconcile", "resolved", part, node=name, error=was.errors[part]))
    return out


_DERIVERS: dict[
    str, Callable[[dict[str, Any] | None, dict[str, Any] | None, float], list[MeshEvent]]
] = {
    TASK: _task,
    SERVICE: _service,
    NETWORK: _network,
    NODE: _node,
    NODE_STATUS: _status,
}


# -- the log in the store (a controller) -------------------------------------------------------


class EventLog:
    """One controller's part: derive events from its informer's changes (any thread), write
    them while it leads (the pass), prune the log (the leader, every PRUNE_INTERVAL)."""

    def __init__(
        self,
        store: Store,
        *,
        window: float = DEFAULT_WINDOW,
        limit: int = DEFAULT_LIMIT,
        keep: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.window = window
        self.limit = limit
        self.keep = keep  # how long a follower keeps what it derived, for a takeover
        self._clock = clock
        self._pending: deque[tuple[float, MeshEvent]] = deque(maxlen=limit)
        self._lock = threading.Lock()
        self._leading = False
        self._last_prune = -float("inf")
        self._failing = False

    def observe(self, changes: Iterable[tuple[Record | None, Event]]) -> None:
        """Derive the events of changes the informer applied (its thread)."""
        now = self._clock()
        derived = [(now, e) for before, event in changes for e in derive(before, event, now)]
        if derived:
            with self._lock:
                self._pending.extend(derived)

    def flush(self, leading: bool) -> None:
        """Write what was derived if this controller leads; else keep only the last `keep`
        seconds of it (what a new leader writes after a takeover)."""
        now = self._clock()
        with self._lock:
            if not leading:
                while self._pending and self._pending[0][0] < now - self.keep:
                    self._pending.popleft()
                self._leading = False
                return
            batch = [e for _, e in self._pending]
        try:
            done: set[str] = set()
            if not self._leading and batch:
                written = {r.name for r in self.store.list(EVENT)}  # by its predecessor
                done = {e.key for e in batch if e.key in written}
            todo = [e for e in batch if e.key not in done]
            for start in range(0, len(todo), MAX_TXN_OPS):
                chunk = todo[start : start + MAX_TXN_OPS]
                self.store.txn([Put(EVENT, e.key, e.to_dict()) for e in chunk])
                done |= {e.key for e in chunk}
                self._forget(done)
            self._forget(done)
            self._leading = True
            if self._failing:
                log.info("writing events again")
            self._failing = False
        except StoreError as err:
            if not self._failing:
                log.warning("cannot write events (kept for the next pass): %s", err)
            self._failing = True
            return
        if now - self._last_prune >= PRUNE_INTERVAL:
            self._last_prune = now
            self.prune(now)

    def _forget(self, keys: set[str]) -> None:
        """Drop written events from the front of the queue (derived ones only join its end)."""
        with self._lock:
            while self._pending and self._pending[0][1].key in keys:
                self._pending.popleft()

    def prune(self, now: float) -> int:
        """Delete events older than the window and the oldest beyond the limit; how many."""
        try:
            records = self.store.list(EVENT)
            old = [r for r in records if float(r.value.get("time", 0)) < now - self.window]
            excess = records[: max(0, len(records) - self.limit)]
            doomed = sorted({r.name for r in old} | {r.name for r in excess})
            for start in range(0, len(doomed), MAX_TXN_OPS):
                self.store.txn([Delete(EVENT, n) for n in doomed[start : start + MAX_TXN_OPS]])
        except StoreError as err:
            log.warning("cannot prune events: %s", err)
            return 0
        return len(doomed)


# -- reading the log (the CLI) -----------------------------------------------------------------

FILTER_KEYS = ("type", "action", "name", "id", "node", "service", "network")


def parse_filters(texts: Iterable[str]) -> dict[str, set[str]]:
    """`--filter KEY=VALUE` options: one key given several times matches any of its values;
    different keys must all match (as docker events does)."""
    filters: dict[str, set[str]] = {}
    for text in texts:
        key, eq, value = text.partition("=")
        if not eq or key not in FILTER_KEYS or not value:
            raise ValidationError(
                f"invalid --filter {text!r}: write KEY=VALUE, KEY one of {', '.join(FILTER_KEYS)}"
            )
        if key == "type" and value not in EVENT_TYPES:
            raise ValidationError(
                f"invalid --filter {text!r}: the types are {', '.join(EVENT_TYPES)}"
            )
        filters.setdefault(key, set()).add(value)
    return filters


def matches(event: MeshEvent, filters: Mapping[str, set[str]]) -> bool:
    """Whether an event passes every filter. service= also matches a service's own events,
    network= a network's and the reconcile errors of that network."""
    for key, values in filters.items():
        if key == "service":
            own = event.name if event.type == "service" else None
            if own not in values and event.attributes.get("service") not in values:
                return False
        elif key == "network":
            if event.type not in ("network", "reconcile") or event.name not in values:
                return False
        elif getattr(event, key) not in values:
            return False
    return True


def read_events(store: Store) -> list[MeshEvent]:
    """Every event in the log, oldest first (unreadable records are skipped)."""
    return list(_decoded(store.list(EVENT)))


def follow_events(store: Store, until: float | None = None) -> Iterator[MeshEvent]:
    """The events in the log, oldest first, then each new one as it is written, until the
    clock passes `until` (None: for ever; a past time: only those in the log).

    New ones come through an Informer, which also re-lists when the store compacted the
    history it needed: an event written meanwhile is still given, once."""
    if until is not None and time.time() >= until:
        yield from read_events(store)
        return
    store.revision()  # an unreachable store fails here, at once, as a read would
    arrived: queue.Queue[list[Event]] = queue.Queue()
    informer = Informer(store, arrived.put).start()
    try:
        while not informer.wait_for(0, timeout=1.0):  # its first list
            if until is not None and time.time() >= until:
                return
        listed = informer.snapshot().of(EVENT)
        seen = {record.name for record in listed}
        yield from _decoded(listed)
        while until is None or time.time() < until:
            wait = 1.0 if until is None else max(0.0, min(1.0, until - time.time()))
            try:
                batch = arrived.get(timeout=wait)
            except queue.Empty:
                continue
            fresh = [e for e in batch if e.kind == EVENT and e.type == "put" and e.name not in seen]
            seen.update(e.name for e in fresh)
            yield from _decoded(
                Record(e.kind, e.name, e.value or {}, e.revision, e.revision) for e in fresh
            )
    finally:
        informer.stop()


def _decoded(records: Iterable[Record]) -> Iterator[MeshEvent]:
    """The events of records, unreadable ones skipped."""
    for record in records:
        try:
            yield MeshEvent.from_record(record)
        except (KeyError, TypeError, ValueError):
            continue
