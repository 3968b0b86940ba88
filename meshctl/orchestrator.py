"""Which task records a service needs: a pure function of the service and its current tasks.

The operations layer calls it in the same store transaction as the service change; the
controller later runs, rolls and tears down what the records say.
"""

from __future__ import annotations

from collections.abc import Iterable

from meshctl.model import Service, Task


def plan_tasks(service: Service, existing: Iterable[Task]) -> tuple[list[Task], list[Task]]:
    """(to_create, to_remove) so the service has exactly one live task per slot 1..replicas.

    Live tasks are those of this service with desired state `running`; the others are already
    on their way out and are ignored. New tasks are pending, unassigned and without addresses
    (the caller allocates them); to_remove lists live tasks in slots above replicas, and all but
    the oldest task of a slot that somehow has several.
    """
    live = sorted(
        (t for t in existing if t.service_id == service.id and t.desired_state == "running"),
        key=lambda t: (t.slot, t.created_at, t.id),
    )
    kept: dict[int, Task] = {}
    to_remove: list[Task] = []
    for task in live:
        if task.slot > service.replicas or task.slot in kept:
            to_remove.append(task)
        else:
            kept[task.slot] = task
    to_create = [
        Task(
            service=service.name,
            service_id=service.id,
            slot=slot,
            spec_version=service.version,
        )
        for slot in range(1, service.replicas + 1)
        if slot not in kept
    ]
    return to_create, to_remove
