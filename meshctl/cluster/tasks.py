"""Task records: made and dropped by the leader for a service's slots, stopped, forgotten.

A task record is made pending and unassigned, with an address on every network of its
service's current spec (claimed in the same txn); the leader places it on a node. A task that
must go is dropped at once if no node has it (its record deleted, its addresses released), or
else sent to `shutdown` (or `removed`, its service gone): its node's controller stops it and
then forgets it (forget_task). Steps that grow with a service's replicas are cut into txns of
at most store.changes.MAX_TXN_OPS operations, each whole on its own.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator, Sequence
from functools import partial
from typing import TypeVar

from meshctl import ipam
from meshctl.model import TASK, DesiredState, MeshctlError, Network, Service, Task, from_record
from meshctl.store import Conflict, Delete, Put, Store, retry_conflicts
from meshctl.store.changes import MAX_TXN_OPS, Changes, networks_by_name

log = logging.getLogger("meshctl.cluster.tasks")
T = TypeVar("T")


def addresses_for(
    changes: Changes, task: Task, wanted: list[str], networks: dict[str, Network]
) -> dict[str, str]:
    """The task's address on each wanted network (kept where it has one); others released."""
    owner = ipam.task_owner(task.id)
    for network in set(task.addresses) - set(wanted):
        if network in networks:
            changes.release(networks[network], [owner])
    return {
        name: task.addresses.get(name)
        or changes.allocate(networks[name], owner, f"task {task.name}")
        for name in wanted
    }


def _batches(items: Sequence[T], per: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), per):
        yield items[start : start + per]


def create_tasks(store: Store, wanted: Sequence[tuple[Service, int]]) -> list[Task]:
    """New pending, unassigned tasks for these (service, slot) pairs, with their addresses.

    Raises AddressExhausted (after the batches before it were written) when a network has no
    address left for one.
    """
    made: list[Task] = []
    for service, slots in _by_service(wanted):
        # One put and one claim per network a task; a check and the ipam hint per network.
        networks = len(service.networks)
        per = max(1, (MAX_TXN_OPS - 2 * networks) // (1 + networks))
        for batch in _batches(slots, per):
            made += retry_conflicts(
                partial(_create_batch, store, service, batch),
                f"making tasks of service {service.name}",
            )
    return made


def _create_batch(store: Store, service: Service, slots: Sequence[int]) -> list[Task]:
    changes = Changes(store)
    known = networks_by_name(store)
    wanted = [a.network for a in service.networks]
    now = time.time()
    made = []
    for slot in slots:
        task = Task(service.name, service.id, slot, service.version, created_at=now,
                    updated_at=now)  # fmt: skip
        task = dataclasses.replace(task, addresses=addresses_for(changes, task, wanted, known))
        changes.ops.append(Put(TASK, task.id, task.to_dict(), expect=0))
        made.append(task)
    changes.commit()
    return made


def _by_service(wanted: Sequence[tuple[Service, int]]) -> list[tuple[Service, list[int]]]:
    grouped: dict[str, tuple[Service, list[int]]] = {}
    for service, slot in wanted:
        grouped.setdefault(service.id, (service, []))[1].append(slot)
    return list(grouped.values())


def drop_task(changes: Changes, task: Task, revision: int, networks: dict[str, Network]) -> None:
    """Delete a task record no node runs, releasing its addresses (into `changes`)."""
    changes.ops.append(Delete(TASK, task.id, expect=revision))
    for network in task.addresses:
        if network in networks:
            changes.release(networks[network], [ipam.task_owner(task.id)])


def drop_tasks(store: Store, tasks: Sequence[tuple[Task, int]]) -> int:
    """Drop records of tasks no node runs (task, its revision), in batches; how many went (a
    task that changed meanwhile, say placed on a node, is left for the next pass)."""
    dropped = 0
    for batch in _batches(tasks, MAX_TXN_OPS // 3):
        changes = Changes(store)
        networks = networks_by_name(store)
        for task, revision in batch:
            drop_task(changes, task, revision, networks)
        try:
            changes.commit()
        except Conflict:
            continue
        dropped += len(batch)
    return dropped


def stop_task(store: Store, task: Task, revision: int, goal: DesiredState, why: str) -> bool:
    """Send a task its node runs to `goal` (shutdown or removed), saying why; False if it
    changed meanwhile."""
    stopped = dataclasses.replace(task, desired_state=goal).with_event(time.time(), task.state, why)
    try:
        store.put(TASK, task.id, stopped.to_dict(), expect=revision)
    except Conflict:
        return False
    return True


def forget_task(store: Store, task_id: str) -> None:
    """Delete a torn-down task's record and release its addresses (its controller calls this)."""

    def attempt() -> None:
        record = store.get(TASK, task_id)
        if record is None:
            return
        changes = Changes(store)
        drop_task(changes, from_record(Task, record), record.mod_revision, networks_by_name(store))
        changes.commit()

    retry_conflicts(attempt, f"forgetting task {task_id}")


def create_or_report(store: Store, wanted: Sequence[tuple[Service, int]]) -> tuple[int, str]:
    """create_tasks, turning a refusal into a one-line reason (the leader reports it as its
    node's error): (tasks made, "" or why not all)."""
    try:
        return len(create_tasks(store, wanted)), ""
    except MeshctlError as err:
        log.warning("cannot make tasks: %s", err)
        return 0, str(err)
