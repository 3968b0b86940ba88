"""What a waiting `service create/scale/update/rm` shows and why it says a task is stuck."""

from __future__ import annotations

import dataclasses

from meshctl.commands.progress import STABLE, bars, progress, stuck, summary
from meshctl.model import HealthCheck, NodeStatus, Service, Task

WEB = Service("web", ("sleep", "1"), replicas=3, id="s1")
LIVE = {"n1": NodeStatus("n1")}


def task(slot: int, state: str = "running", **changes: object) -> Task:
    made = Task("web", "s1", slot, 1, id=f"t{slot}", node="n1", pid=100 + slot, created_at=slot)
    return dataclasses.replace(made, state=state, **changes)  # type: ignore[arg-type]


def test_a_slot_converges_once_its_task_has_kept_running() -> None:
    tasks = [task(1), task(2, "starting"), task(3, "pending", node="", pid=None,
             error="no suitable node: 0 of 1 match node.labels.zone==b")]  # fmt: skip
    seen = {("t1", 101): 0.0}
    early = progress("web", WEB, tasks, LIVE, seen, now=STABLE / 2)
    assert early.done == 0  # running, not yet for long: a crash loop would look converged
    later = progress("web", WEB, tasks, LIVE, seen, now=STABLE + 0.1)
    assert later.done == 1 and not later.converged
    assert summary(later) == "web: 1/3 running (2: starting, 3: pending)"
    assert stuck(later) == [
        "web.2: starting: not yet",
        "web.3: pending: no suitable node: 0 of 1 match node.labels.zone==b",
    ]
    lines = bars(later)
    assert lines[0] == "web: overall progress: 1 out of 3 tasks"
    assert lines[1].startswith("1/3: running   [" + "=" * 49 + ">]")
    assert lines[3].endswith("no suitable node: 0 of 1 match node.labels.zone==b")


def test_failed_and_unhealthy_tasks_say_so() -> None:
    checked = dataclasses.replace(WEB, replicas=2, health=HealthCheck("tcp", port=80))
    tasks = [
        task(1, "failed", exit_code=127, error="exit code 127", pid=None),
        task(2, health="unhealthy"),
    ]
    view = progress("web", checked, tasks, LIVE, {("t2", 102): 0.0}, now=100.0)
    assert stuck(view) == ["web.1: failed: exit code 127", "web.2: unhealthy: unhealthy"]
    assert not view.hopeless  # the restart policy (any) starts web.1 again
    never = dataclasses.replace(checked, restart=dataclasses.replace(checked.restart,
                                                                     condition="none"))  # fmt: skip
    assert progress("web", never, tasks, LIVE, {}, now=100.0).hopeless


def test_scaled_down_and_removed_services_wait_for_their_tasks_to_stop() -> None:
    one = dataclasses.replace(WEB, replicas=1)
    leaving = task(2, desired_state="shutdown")
    view = progress("web", one, [task(1), leaving], LIVE, {("t1", 101): 0.0}, now=100.0)
    assert not view.converged and stuck(view) == ["web.2: still running (stopping)"]
    stopped = dataclasses.replace(leaving, state="shutdown", pid=None)
    assert progress("web", one, [task(1), stopped], LIVE, {("t1", 101): 0.0}, 100.0).converged
    gone = progress("web", None, [leaving], LIVE, {}, now=100.0)
    assert summary(gone) == "web: removed, 1 task(s) still stopping"
    assert progress("web", None, [], LIVE, {}, now=100.0).converged


def test_a_task_on_a_down_node_says_so() -> None:
    view = progress("web", dataclasses.replace(WEB, replicas=1), [task(1, "starting")], {}, {}, 1)
    assert stuck(view) == ["web.1: starting: node n1 is down"]
