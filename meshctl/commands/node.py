"""`node update/rm`: a node's availability and labels, and forgetting a node that is down with
everything it held, each one store transaction."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

from meshctl import ipam
from meshctl.cluster.tasks import drop_task
from meshctl.commands.container import drop_container
from meshctl.model import (
    CONTAINER,
    NODE,
    NODE_STATUS,
    TASK,
    Availability,
    Container,
    Node,
    NotFoundError,
    Task,
    ValidationError,
    check_label,
    check_name,
    from_record,
)
from meshctl.store import Delete, Record, Store, retry_conflicts
from meshctl.store.changes import Changes, networks_by_name


def update_node(
    store: Store,
    name: str,
    *,
    availability: Availability | None = None,
    labels_add: Mapping[str, str] | None = None,
    labels_rm: Iterable[str] = (),
) -> Node:
    """Change a node's availability and labels (the leader moves tasks as they require)."""
    for key, value in (labels_add or {}).items():
        check_label(key, value)

    def attempt() -> Node:
        record = store.get(NODE, check_name(name, "node name"))
        if record is None:
            raise NotFoundError(f"node {name} not found; list nodes with: meshctl node ls")
        node = from_record(Node, record)
        labels = {**node.labels, **(labels_add or {})}
        for key in labels_rm:
            if key not in labels:
                raise ValidationError(f"node {name} has no label {key!r}; see meshctl node inspect")
            del labels[key]
        changed = dataclasses.replace(
            node, labels=labels, availability=availability or node.availability
        )
        store.put(NODE, name, changed.to_dict(), expect=record.mod_revision)
        return changed

    return retry_conflicts(attempt, f"updating node {name}")


def check_removable(store: Store, name: str) -> Record:
    """The record of a node that may be removed: it exists and is down."""
    record = store.get(NODE, check_name(name, "node name"))
    if record is None:
        raise NotFoundError(f"node {name} not found; list nodes with: meshctl node ls")
    if store.get(NODE_STATUS, name) is not None:
        raise ValidationError(
            f"node {name} is not down and cannot be removed; stop its controller first "
            f"(or drain it: meshctl node update --availability drain {name})"
        )
    return record


def remove_node(store: Store, name: str) -> Node:
    """Forget a node that is down: its record, the addresses its load balancers and its router
    held on every network, the records of the tasks it had (the leader has started their
    replacements elsewhere) and of the containers attached on it, with their addresses."""

    def attempt() -> Node:
        record = check_removable(store, name)
        node = from_record(Node, record)
        changes = Changes(store)
        networks = networks_by_name(store)
        for network in networks.values():
            changes.release(network, [ipam.lb_owner(name), ipam.router_owner(name)])
        for task_record in store.list(TASK):
            task = from_record(Task, task_record)
            if task.node == name:
                drop_task(changes, task, task_record.mod_revision, networks)
        for container_record in store.list(CONTAINER):
            container = from_record(Container, container_record)
            if container.node == name:
                drop_container(changes, container, container_record.mod_revision, networks)
        changes.ops.append(Delete(NODE, name, expect=record.mod_revision))
        changes.commit()
        return node

    return retry_conflicts(attempt, f"removing node {name}")
