"""Focused reproductions of product bugs that the property test (machine.py) found.

Each test failed while its bug was there and is an ordinary test since its fix; the property
test no longer steers clear of any of them. A new finding comes here marked
xfail(strict=True), so that the suite stays green until its fix lands and then fails (XPASS)
until the marker goes with the fix.

(F1, a traceback on SIGTERM from the old store watcher thread, went with main's informer; the
property test's check of the controller log for tracebacks covers it.)
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.kernel.mesh import Mesh, wait_for
from tests.property.machine import STABLE_RUN

pytestmark = pytest.mark.root

SLEEPER = ("--restart-delay", "0s", "--stop-grace-period", "1s", "--detach", "--", "sleep", "1d")


@pytest.fixture
def mesh(node_ns: str, tmp_path: Path) -> Iterator[Mesh]:
    m = Mesh(node_ns, str(tmp_path / "state"))
    try:
        yield m
    finally:
        m.close()


def _log(mesh: Mesh) -> str:
    with open(mesh.controller_log, errors="replace") as f:
        return f.read()


def test_f2_rolling_update_short_of_addresses_stops_nothing_else(mesh: Mesh) -> None:
    """A /29 holds gateway, LB address, VIP and two tasks, and one address is free, so
    `service update` is accepted (commands.service checks it has room for one). The first
    new task takes it; the old one is then told to stop, but the next pass made the second
    new task first (updater._step → tasks.create_tasks, before the supervisor stops
    anything), got AddressExhausted, and so did every pass after it ("reconcile pass failed;
    retrying"): the old task never stopped, its address never freed, and nothing else on the
    node was done any more. Now the update waits (reported) and the pass goes on."""
    mesh.cli("network", "create", "small", "--subnet", "10.78.1.0/29")
    mesh.cli("network", "create", "other", "--subnet", "10.78.2.0/24")
    mesh.cli("service", "create", "--name", "web", "--replicas", "2", "--network", "small",
             *SLEEPER)  # fmt: skip
    mesh.cli("service", "create", "--name", "api", "--replicas", "0", "--network", "other",
             *SLEEPER)  # fmt: skip
    mesh.start_controller()
    mesh.wait_running("web", 2)
    mesh.cli("service", "update", "web", "--env", "RELEASE=2", "--detach")
    wait_for(
        lambda: (
            not any(
                (t["slot"], t["spec_version"], t["desired_state"]) == (1, 1, "running")
                for t in mesh.ps("web")
            )
        ),
        20,
        "the first old task to be retired",
    )  # (where the update stalled; now it may be gone, and web.2 replaced, at once)
    # The controller goes on with other work meanwhile...
    mesh.cli("service", "scale", "api=1", "--detach")
    mesh.wait_running("api", 1)
    # ...and the update can finish: new before old, one at a time, with one spare address
    # (the second new task gets the first old task's address once that one has stopped).
    wait_for(
        lambda: sorted(t["spec_version"] for t in mesh.ps("web")) == [2, 2],
        30,
        "the rolling update to finish",
    )
    assert "Traceback" not in _log(mesh)


def test_f3_removing_a_task_converges_in_the_same_pass(mesh: Mesh) -> None:
    """Unwiring a task used to delete only its namespace, and the kernel tears the namespace
    (and with it the node end of its veth) down later, in a work queue, once nothing holds it:
    the pass's convergence check still saw the veth, now belonging to no namespace, and logged
    `node not converged after apply: delete_links=1` (and `meshctl diff` showed `- link
    meshv...` meanwhile) on every removal. Now its legs are deleted first, by name."""
    mesh.cli("network", "create", "front", "--subnet", "10.78.3.0/24")
    mesh.cli("service", "create", "--name", "web", "--replicas", "4", "--network", "front",
             *SLEEPER)  # fmt: skip
    mesh.start_controller()
    mesh.wait_running("web", 4)
    mesh.cli("service", "scale", "web=0", "--detach")
    wait_for(lambda: mesh.ps("web") == [], 20, "the tasks to be gone")
    mesh.wait_converged(20)
    assert "not converged" not in _log(mesh), _log(mesh)


def _events(mesh: Mesh, what: str) -> list[float]:
    """When the controller logged each line that holds what (Unix seconds)."""
    stamps = re.findall(r"^time=(\S+) .*" + re.escape(what), _log(mesh), re.MULTILINE)
    return [datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp() for s in stamps]


def test_f4_a_stable_run_resets_the_back_off_after_an_unhealthy_restart(
    mesh: Mesh, tmp_path: Path
) -> None:
    """supervisor.STABLE_RUN: a process that ran 10 s resets the restart back-off, however it
    ends. The reset used to happen only where the supervisor noticed a process that exited by
    itself; a task it stopped for being unhealthy was restarted with the back-off of every
    earlier failure, however long it had run healthy since. Here: sick for 6 restarts, healthy
    for 15 s, sick again: the next start follows the stop within a second, not 0.1 s x 2^6."""
    sick = tmp_path / "sick"
    mesh.cli("network", "create", "front", "--subnet", "10.78.4.0/24")
    mesh.cli("service", "create", "--name", "web", "--network", "front",
             "--health-cmd", f"test ! -e {sick}", "--health-interval", "200ms",
             "--health-retries", "1", *SLEEPER)  # fmt: skip
    mesh.start_controller()

    def healthy() -> bool:
        return [t["health"] for t in mesh.ps("web")] == ["healthy"]

    wait_for(healthy, 20, "web.1 healthy")
    sick.touch()
    # Counted in the log, where the times of the stop and the start below come from too.
    wait_for(lambda: len(_events(mesh, "task=web.1 started")) >= 7, 60, "six restarts")
    sick.unlink()
    wait_for(healthy, 30, "web.1 healthy again")
    # The run under test: past STABLE_RUN by a second, counted from the start the controller
    # logged (just after it took its own start time); the stop below comes later still.
    ran_since = _events(mesh, "task=web.1 started")[-1]
    time.sleep(max(0.0, ran_since + STABLE_RUN + 1 - time.time()))
    starts = len(_events(mesh, "task=web.1 started"))
    sick.touch()
    wait_for(lambda: len(_events(mesh, "task=web.1 started")) > starts, 30, "the next start")
    stopped = _events(mesh, "task=web.1 stopped")[-1]
    started = _events(mesh, "task=web.1 started")[-1]
    assert started - stopped < 1.0, f"restarted {started - stopped:.1f}s after it stopped"


# The stops of a task sick from its start that 20 s hold on a native host: after each the
# back-off doubles from 0.1 s, so the 8th comes about 17 s in and the 9th 13 s after that.
STOPS = 8


def test_f5_a_task_in_back_off_is_not_shown_running(mesh: Mesh, tmp_path: Path) -> None:
    """The pass that stops an unhealthy task writes its record right after starting the stop
    thread. The thread used to record the end itself: when it ended in between, the write saw
    no process and no exit yet, and then cleared the exit the thread had just recorded
    (Supervisor._write sets last_exit = None after its put): the exit was never written.
    `service ps` showed the task `running` with no pid for its whole back-off, the restart
    count missed the restart and the history the failure. Now the pass records every end."""
    sick = tmp_path / "sick"
    mesh.cli("network", "create", "front", "--subnet", "10.78.5.0/24")
    mesh.cli("service", "create", "--name", "web", "--network", "front",
             "--health-cmd", f"test ! -e {sick}", "--health-interval", "200ms",
             "--health-retries", "1", *SLEEPER)  # fmt: skip
    mesh.start_controller()
    mesh.wait_running("web", 1)
    sick.touch()
    seen: list[dict[str, Any]] = []
    # Watched for 20 s, or until the back-off after the STOPS-th stop has been seen for a second.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        (task,) = mesh.ps("web")
        if task["state"] == "running" and task["pid"] is None:
            seen.append(task)
        stops = _events(mesh, "task=web.1 stopped")
        if len(stops) >= STOPS and time.time() > stops[-1] + 1:
            break
        time.sleep(0.05)
    assert not seen, f"shown running without a process: {seen[0]}"
    starts = len(_events(mesh, "task=web.1 started"))
    (task,) = mesh.ps("web")
    assert task["restarts"] >= starts - 2, f"{starts} starts, {task['restarts']} restarts"
