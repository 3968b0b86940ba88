"""The supervisor's bookkeeping of task processes, with stand-in processes (no kernel)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pytest

from meshctl.controller.supervisor import Local, Stop, Supervisor
from meshctl.model import Task
from meshctl.store.sqlite import SqliteStore
from tests.conftest import scaled


class ExitedProcess:
    """A task process that has ended, counting how often it is closed."""

    def __init__(self) -> None:
        self.closed = 0

    def exited(self) -> bool:
        return True

    def exit_code(self) -> int:
        return -15

    def stop(self, grace: float) -> int:
        return -15

    def close(self) -> None:
        self.closed += 1


def test_a_stop_in_flight_owns_the_process_and_the_pass_records_its_end(tmp_path: Path) -> None:
    """The pass must not record and close a process that a stop thread is stopping: the thread
    closed it a second time (EBADF), died, and the task was never forgotten. Nor may the thread
    change what the pass reads: a stop that ended while the pass wrote the task's record was
    lost, and the task shown `running` without a pid (F5). The thread hands back the exit code;
    the pass records it once the stop is done."""
    with SqliteStore(str(tmp_path / "state.db")) as store:
        supervisor = Supervisor(store, "node1", str(tmp_path))
        task = Task(service="web", service_id="s1", slot=2, spec_version=1)
        process = ExitedProcess()
        local = Local(process=cast(Any, process))
        supervisor._begin_stop(task, local, 1.0, "unhealthy")
        stop = local.stopping
        assert stop is not None
        assert stop.code.result(timeout=scaled(10)) == 143
        assert (process.closed, local.process, local.last_exit) == (0, process, None)

        supervisor._notice_exit(task, local)
        assert (process.closed, local.process, local.stopping) == (1, None, None)
        assert local.last_exit == (143, "unhealthy")

        local = Local(process=cast(Any, process), stopping=Stop("stopped"))  # not done yet
        supervisor._notice_exit(task, local)
        assert (process.closed, local.process, local.last_exit) == (1, process, None)

        local.stopping = None  # no stop in flight: the pass records the exit itself
        supervisor._notice_exit(task, local)
        assert (process.closed, local.process, local.last_exit) == (2, None, (143, "exit code 143"))


def test_each_pass_rotates_the_logs_of_the_nodes_tasks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tasks outlive the controller and write their logs themselves: the pass keeps them
    bounded (here the task cannot start, with no namespace: its log is rotated all the same)."""
    from meshctl import runtime
    from meshctl.commands.service import create_service
    from meshctl.model import Service
    from meshctl.runtime import task_log_path
    from meshctl.view import read_view
    from tests.unit.leader import settle

    monkeypatch.setattr(runtime, "LOG_MAX_BYTES", 20)
    with SqliteStore(str(tmp_path / "state.db")) as store:
        create_service(store, Service("web", ("true",)))
        settle(store)
        supervisor = Supervisor(store, "node1", str(tmp_path))
        (record,) = store.list("task")
        store.put("task", record.name, {**record.value, "node": "node1"})  # the leader placed it
        view = read_view(store)
        (task,) = view.tasks.values()
        log = Path(task_log_path(str(tmp_path), task.id))
        log.parent.mkdir(parents=True)
        log.write_text("twenty-five bytes of log\n")
        supervisor.step(view, set())
        assert (log.read_text(), (log.parent / "log.1").read_text()) == (
            "",
            "twenty-five bytes of log\n",
        )


def test_an_exit_is_written_before_anything_else_of_the_pass(tmp_path: Path) -> None:
    """record_changes (the first step of a pass) writes a task's end and nothing more: every
    node's load balancer follows that record, so it must not wait for the rest of the pass;
    the restart is step's (later in the same pass)."""
    from meshctl.commands.service import create_service
    from meshctl.model import Service
    from meshctl.view import read_view
    from tests.unit.leader import settle

    with SqliteStore(str(tmp_path / "state.db")) as store:
        create_service(store, Service("web", ("sleep", "1000")))
        settle(store)
        (record,) = store.list("task")
        placed = {**record.value, "node": "node1", "state": "running", "pid": 4242}
        store.put("task", record.name, {**placed, "start_time": 7})
        supervisor = Supervisor(store, "node1", str(tmp_path))
        process = ExitedProcess()
        supervisor.tasks[record.name] = Local(process=cast(Any, process), started_at=1.0)

        assert supervisor.record_changes(read_view(store))
        task = read_view(store).tasks[record.name]
        assert (task.state, task.exit_code, task.pid) == ("failed", 143, None)
        assert process.closed == 1
        local = supervisor.tasks[record.name]
        assert (local.process, local.last_exit) == (None, None)  # written; no restart yet
        assert not supervisor.record_changes(read_view(store))  # nothing new to say


def test_a_restarted_controller_adopts_the_process_its_task_directory_names(
    tmp_path: Path,
) -> None:
    """A controller killed after starting a task's process but before writing its record: the
    record names no process (or an older one), the task's directory names the new one, and
    the next controller adopts that one instead of starting another beside it."""
    import subprocess

    from meshctl import runtime

    child = subprocess.Popen(["sleep", "60"])
    try:
        start_time = runtime.read_start_time(child.pid)
        assert start_time is not None
        with SqliteStore(str(tmp_path / "store.db")) as store:
            supervisor = Supervisor(store, "node1", str(tmp_path))
            task = Task(service="web", service_id="s1", slot=1, spec_version=1, node="node1")
            process = runtime.adopt(child.pid, start_time)
            assert process is not None
            (tmp_path / "tasks" / task.id).mkdir(parents=True)
            runtime.write_process_file(supervisor.task_dir(task.id), process)
            process.close()

            class View:
                def tasks_on(self, node: str) -> list[Task]:
                    return [task] if node == "node1" else []

            supervisor.adopt(cast(Any, View()))
            adopted = supervisor.tasks[task.id].process
            assert adopted is not None and adopted.pid == child.pid
            adopted.close()
    finally:
        child.kill()
        child.wait()
