"""Rolling updates: replace a service's tasks that run an older spec, one at a time, new first.

For each service with tasks behind its version: if a replacement is under way (a current task
sharing a slot with an old one), wait until it runs (and is healthy, when the service has a
check), then send the old one to shutdown; otherwise start the next replacement. The store is
the only state, so the next leader takes the next step and a restart loses nothing.
"""

from __future__ import annotations

import logging

from meshctl import tasks
from meshctl.controller.view import ClusterView
from meshctl.model import Service, Task
from meshctl.store import Store

log = logging.getLogger("meshctl.updater")


def roll(store: Store, view: ClusterView) -> bool:
    """Take the next step of every rolling update; True if the store changed."""
    changed = False
    for service in view.services.values():
        changed |= _step(store, view, service)
    return changed


def _ready(task: Task, service: Service) -> bool:
    return task.state == "running" and (service.health is None or task.health == "healthy")


def _step(store: Store, view: ClusterView, service: Service) -> bool:
    live = [
        t
        for t in view.tasks.values()
        if t.service_id == service.id and t.desired_state == "running"
    ]
    stale = sorted((t for t in live if t.spec_version < service.version), key=lambda t: t.slot)
    if not stale:
        return False
    current = {t.slot: t for t in live if t.spec_version == service.version}
    under_way = [t for t in stale if t.slot in current]
    if under_way:
        old = under_way[0]
        if not _ready(current[old.slot], service):
            return False  # one at a time: wait for the new task before touching the next
        revision = view.task_revisions[old.id]
        if not tasks.stop_task(store, old, revision, "shutdown", "replaced by an update"):
            return False
        log.info("rolling update service=%s replaced task=%s", service.name, old.name)
        return True
    tasks.create_tasks(store, [(service, stale[0].slot)])
    log.info("rolling update service=%s started a new task for %s", service.name, stale[0].name)
    return True
