"""What the leader's controller does to task records, for tests without a controller."""

from __future__ import annotations

import dataclasses

from meshctl.cluster import orchestrator
from meshctl.model import TASK, Task
from meshctl.store import Store
from meshctl.view import read_view


def settle(store: Store, rounds: int = 3) -> None:
    """The leader's slot keeping until there is nothing left to do (no placement)."""
    for _ in range(rounds):
        view = read_view(store)
        changed, problem = orchestrator.apply(store, view, orchestrator.plan(view))
        assert not problem, problem
        if not changed:
            return


def place(store: Store, task: Task, node: str = "node1", state: str = "running") -> Task:
    """What the leader and the node's controller do: the task placed on node, in `state`."""
    record = store.get(TASK, task.id)
    assert record is not None
    placed = dataclasses.replace(task, node=node, state=state)  # type: ignore[arg-type]
    store.put(TASK, task.id, placed.to_dict(), expect=record.mod_revision)
    return placed
