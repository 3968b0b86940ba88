"""Rolling updates: replace a service's tasks that run an older spec, one at a time, new first.

For each service with tasks behind its version: if a replacement is under way (a current task
sharing a slot with an old one), wait until it runs (and is healthy, when the service has a
check), then send the old one to shutdown; otherwise start the next replacement. When no
address is free for the new task beside the old one, the update waits while a task of the
service is on its way out (its addresses come free), and otherwise stops the old task first, as
swarm's stop-first order does: the orchestrator fills the slot once its addresses are free. A
shortage is never an error of the pass: the node's other work goes on. The store is the only
state, so the next leader takes the next step and a restart loses nothing.
"""

from __future__ import annotations

import logging

from meshctl.cluster import tasks
from meshctl.ipam import AddressExhausted
from meshctl.model import Service, Task
from meshctl.store import Store
from meshctl.view import ClusterView

log = logging.getLogger("meshctl.updater")


def roll(store: Store, view: ClusterView) -> tuple[bool, str]:
    """Take the next step of every rolling update: (whether the store changed, "" or why
    updates are stuck)."""
    changed = False
    stuck = []
    for service in view.services.values():
        stepped, why = _step(store, view, service)
        changed |= stepped
        if why:
            stuck.append(why)
    return changed, "; ".join(stuck)


def _ready(task: Task, service: Service) -> bool:
    return task.state == "running" and (service.health is None or task.health == "healthy")


def _step(store: Store, view: ClusterView, service: Service) -> tuple[bool, str]:
    mine = [t for t in view.tasks.values() if t.service_id == service.id]
    live = [t for t in mine if t.desired_state == "running"]
    stale = sorted((t for t in live if t.spec_version < service.version), key=lambda t: t.slot)
    if not stale:
        return False, ""
    current = {t.slot: t for t in live if t.spec_version == service.version}
    under_way = [t for t in stale if t.slot in current]
    if under_way:
        old = under_way[0]
        if not _ready(current[old.slot], service):
            return False, ""  # one at a time: wait for the new task before touching the next
        revision = view.task_revisions[old.id]
        if not tasks.stop_task(store, old, revision, "shutdown", "replaced by an update"):
            return False, ""
        log.info("rolling update service=%s replaced task=%s", service.name, old.name)
        return True, ""
    old = stale[0]
    try:
        tasks.create_tasks(store, [(service, old.slot)])
    except AddressExhausted as err:
        return _stop_first(store, view, service, mine, old, str(err))
    log.info("rolling update service=%s started a new task for %s", service.name, old.name)
    return True, ""


def _stop_first(
    store: Store, view: ClusterView, service: Service, mine: list[Task], old: Task, why: str
) -> tuple[bool, str]:
    """No address for old's replacement beside it: (changed, "" or why the update is stuck).

    Wait while a task of the service is on its way out (its addresses come free soon) or a new
    task is not ready yet (one slot at a time); else stop old first. Unless old holds no
    address on some network of the new spec: stopping it would free none there.
    """
    if any(t.desired_state != "running" for t in mine):
        return False, ""
    if not all(_ready(t, service) for t in mine if t.spec_version == service.version):
        return False, ""
    if not all(a.network in old.addresses for a in service.networks):
        return False, f"the rolling update of service {service.name} is stuck: {why}"
    revision = view.task_revisions[old.id]
    reason = "replaced by an update, stopped first: no address for its replacement beside it"
    if not tasks.stop_task(store, old, revision, "shutdown", reason):
        return False, ""
    log.info("rolling update service=%s stopped task=%s first", service.name, old.name)
    return True, ""
