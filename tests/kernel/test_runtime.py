"""Task processes on the real kernel: namespaces, files, logs, stop, adopt after the starter died,
and exec into a running task."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kernel import netns
from meshctl.runtime import (
    TaskProcess,
    TaskProcessSpec,
    adopt,
    exec_argv,
    read_start_time,
    rotate_log,
    rotated_paths,
    start,
)
from tests.conftest import scaled
from tests.kernel.mesh import wait_for

pytestmark = pytest.mark.root

TaskRunner = Callable[..., TaskProcess]


@pytest.fixture
def task_ns(netns_factory: Callable[[str], str]) -> str:
    ns = netns_factory("task")
    subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
    return ns


def make_spec(ns: str, tmp_path: Path, *command: str, **extra: object) -> TaskProcessSpec:
    return TaskProcessSpec(
        task_name="web.1",
        netns=ns,
        command=command,
        log_path=str(tmp_path / "logs" / "web.1.log"),
        files_dir=str(tmp_path / "files" / "web.1"),
        **extra,  # type: ignore[arg-type]
    )


@pytest.fixture
def run_task(task_ns: str, tmp_path: Path) -> Iterator[TaskRunner]:
    """Start tasks in task_ns; every one is stopped and its pidfd closed after the test."""
    started: list[TaskProcess] = []

    def run(*command: str, **extra: object) -> TaskProcess:
        proc = start(make_spec(task_ns, tmp_path, *command, **extra))
        started.append(proc)
        return proc

    try:
        yield run
    finally:
        for proc in started:
            proc.stop(0)
            proc.close()


def log_of(tmp_path: Path) -> str:
    return (tmp_path / "logs" / "web.1.log").read_text()


def processes_in(ns: str) -> list[int]:
    """PIDs whose network namespace is ns (zombies included: they have no ns link, skipped)."""
    target = netns.inode(ns)
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.stat(f"/proc/{pid}/ns/net").st_ino == target:
                pids.append(int(pid))
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return pids


def test_task_runs_with_its_name_resolv_conf_hosts_netns_and_clean_env(
    run_task: TaskRunner, task_ns: str, tmp_path: Path
) -> None:
    host_files = {p: Path(p).read_bytes() for p in ("/etc/resolv.conf", "/etc/hosts")}
    host_name = socket.gethostname()
    script = (
        'echo "hostname=$(hostname)"; echo "pid=$$"; echo "stdin=$(readlink /proc/$$/fd/0)"; '
        'echo "netns=$(stat -L -c %i /proc/self/ns/net)"; '
        "echo ---resolv; cat /etc/resolv.conf; echo ---hosts; cat /etc/hosts; echo ---env; env"
    )
    proc = run_task("/bin/sh", "-c", script, env=(("GREETING", "hello world"),))

    assert proc.wait(scaled(5)), "the task should have finished"
    assert proc.exit_code() == 0
    log = log_of(tmp_path)
    head, _, rest = log.partition("---resolv\n")
    resolv, _, rest = rest.partition("---hosts\n")
    hosts, _, env = rest.partition("---env\n")
    assert "hostname=web.1" in head
    # Every stage exec()s the next, so the PID we hold is the task's own.
    assert f"pid={proc.pid}" in head
    assert "stdin=/dev/null" in head
    assert f"netns={netns.inode(task_ns)}" in head
    assert resolv == "nameserver 127.0.0.11\noptions ndots:0\n"
    assert any(line.split()[-1] == "web.1" for line in hosts.splitlines() if line.strip())
    env_vars = dict(line.split("=", 1) for line in env.splitlines() if "=" in line)
    assert env_vars["GREETING"] == "hello world"
    assert env_vars["HOSTNAME"] == "web.1"
    assert "PYTEST_CURRENT_TEST" not in env_vars, "the controller's environment leaked in"
    # The host keeps its own files and name.
    assert {p: Path(p).read_bytes() for p in host_files} == host_files
    assert socket.gethostname() == host_name


def test_hosts_lists_the_given_addresses(task_ns: str, tmp_path: Path) -> None:
    from meshctl.runtime import hosts_text

    spec = make_spec(
        task_ns, tmp_path, "cat", "/etc/hosts", hosts=hosts_text("web.1", ("10.0.1.5",))
    )
    proc = start(spec)
    try:
        assert proc.wait(scaled(5))
    finally:
        proc.stop(0)
        proc.close()
    assert "10.0.1.5\tweb.1" in log_of(tmp_path)


def test_exit_code_is_reported_and_wait_fd_wakes_an_event_loop(run_task: TaskRunner) -> None:
    proc = run_task("/bin/sh", "-c", f"sleep {scaled(0.3)}; exit 3")
    assert not proc.exited()
    assert proc.exit_code() is None

    async def until_readable() -> None:
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        loop.add_reader(proc.wait_fd(), done.set_result, None)
        try:
            await asyncio.wait_for(done, scaled(5))
        finally:
            loop.remove_reader(proc.wait_fd())

    asyncio.run(until_readable())
    assert proc.exited()
    assert proc.exit_code() == 3


def test_stdout_and_stderr_are_appended_to_the_log(run_task: TaskRunner, tmp_path: Path) -> None:
    run_task("/bin/sh", "-c", "echo first").wait(scaled(5))
    run_task("/bin/sh", "-c", "echo to-stdout; echo to-stderr >&2").wait(scaled(5))
    assert log_of(tmp_path).splitlines() == ["first", "to-stdout", "to-stderr"]


def test_missing_command_ends_the_task_with_a_message_in_the_log(
    run_task: TaskRunner, tmp_path: Path
) -> None:
    proc = run_task("/no/such/program")
    assert proc.wait(scaled(5))
    assert proc.exit_code() == 127
    assert "/no/such/program" in log_of(tmp_path)


def test_stop_sends_sigterm_first(run_task: TaskRunner) -> None:
    proc = run_task("sleep", "60")
    began = time.monotonic()
    assert proc.stop(grace=scaled(10)) == -signal.SIGTERM
    assert time.monotonic() - began < scaled(5)  # well before the grace period ends


def test_stop_kills_a_task_that_ignores_sigterm_after_the_grace_period(
    run_task: TaskRunner, task_ns: str, tmp_path: Path
) -> None:
    # The ignored TERM is inherited by the sleep children too: the whole group must be killed.
    proc = run_task("/bin/sh", "-c", 'trap "" TERM; echo ready; while :; do sleep 0.1; done')
    wait_for(lambda: "ready" in log_of(tmp_path), 5, "the task to trap TERM")
    began = time.monotonic()
    code = proc.stop(grace=scaled(1.0))
    took = time.monotonic() - began
    assert code == -signal.SIGKILL
    assert scaled(1.0) <= took < scaled(4.0)
    wait_for(lambda: processes_in(task_ns) == [], 5, "no process left in the task")


def test_failed_setup_raises_and_leaves_no_process(task_ns: str, tmp_path: Path) -> None:
    from kernel.errors import KernelError

    # The kernel refuses hostnames over 64 bytes: the setup fails before the command runs.
    with pytest.raises(KernelError, match="see .*web.1.log"):
        start(make_spec(task_ns, tmp_path, "sleep", "60", hostname="h" * 70))
    assert processes_in(task_ns) == []


def test_task_with_a_missing_namespace_is_refused(tmp_path: Path) -> None:
    from kernel.errors import NotFound

    with pytest.raises(NotFound, match="does not exist"):
        start(make_spec("mt-no-such-ns", tmp_path, "true"))


STARTER = """
import sys
from meshctl.runtime import TaskProcessSpec, start
spec = TaskProcessSpec(task_name="web.1", netns=sys.argv[1], command=tuple(sys.argv[4:]),
                       log_path=sys.argv[2], files_dir=sys.argv[3])
proc = start(spec)
print(proc.pid, proc.start_time, flush=True)
sys.stdin.read()  # until killed
"""


def test_task_outlives_its_starter_and_is_adopted_with_the_same_pid(
    task_ns: str, tmp_path: Path
) -> None:
    log = tmp_path / "logs" / "web.1.log"
    starter = subprocess.Popen(
        [
            sys.executable,
            "-c",
            STARTER,
            task_ns,
            str(log),
            str(tmp_path / "files"),
            "/bin/sh",
            "-c",
            "while :; do echo tick; sleep 0.1; done",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert starter.stdout is not None
        pid_text, start_text = starter.stdout.readline().split()
        pid, start_time = int(pid_text), int(start_text)
        starter.send_signal(signal.SIGKILL)  # the controller dies hard
        starter.wait(scaled(5))

        # The task keeps running and writing, under the same PID.
        assert read_start_time(pid) == start_time
        size = log.stat().st_size
        wait_for(lambda: log.stat().st_size > size, 5, "the task to write on")

        assert adopt(pid, start_time + 1) is None, "a different start time is another process"
        proc = adopt(pid, start_time)
        assert proc is not None
        try:
            assert proc.pid == pid
            assert not proc.exited()
            began = time.monotonic()
            # Not our child: the exit is seen through the pidfd, the code is unknown.
            assert proc.stop(grace=scaled(5)) is None
            assert time.monotonic() - began < scaled(4)  # before the grace period ends
            assert proc.exited()
        finally:
            proc.close()
        wait_for(lambda: processes_in(task_ns) == [], 5, "no process left in the task")
    finally:
        starter.kill()
        starter.wait()


def test_adopt_of_a_finished_process_is_none(run_task: TaskRunner) -> None:
    proc = run_task("true")
    proc.wait(scaled(5))
    start_time = proc.start_time
    proc.exit_code()  # reaps it
    assert adopt(proc.pid, start_time) is None


def test_exec_runs_inside_the_task_with_its_files_env_and_exit_code(
    run_task: TaskRunner, task_ns: str
) -> None:
    proc = run_task("sleep", "60", env=(("GREETING", "hi"),))

    def run(*argv: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            exec_argv(task_ns, proc.pid, list(argv)),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=scaled(10),
        )

    assert run("hostname").stdout == "web.1\n"
    assert run("sh", "-c", "exit 3").returncode == 3
    assert run("cat", "/etc/resolv.conf").stdout.startswith("nameserver 127.0.0.11\n")
    assert run("cat", stdin="from stdin\n").stdout == "from stdin\n"
    assert run("sh", "-c", 'echo "$GREETING"').stdout == "hi\n"
    inode = run("stat", "-L", "-c", "%i", "/proc/self/ns/net").stdout.strip()
    assert inode == str(netns.inode(task_ns))


def test_exec_into_a_gone_task_says_so(run_task: TaskRunner, task_ns: str) -> None:
    from kernel.errors import NotFound

    proc = run_task("true")
    proc.wait(scaled(5))
    proc.exit_code()
    with pytest.raises(NotFound, match="not running"):
        exec_argv(task_ns, proc.pid, ["hostname"])


def test_the_log_of_a_writing_task_is_rotated_without_loss_of_order_or_holes(
    run_task: TaskRunner, tmp_path: Path
) -> None:
    """The task writes its log itself (O_APPEND) while the controller rotates it: its writes go
    on at the start of the emptied file (no hole of NULs), at most `keep` files exist, and the
    lines kept, read oldest file first, are in the order written (copytruncate may lose a few
    written between copy and truncation, never reorder them)."""
    lines = 3000
    run_task(
        "sh", "-c",
        f'i=0; while [ $i -lt {lines} ]; do echo "line $i"; i=$((i+1)); '
        '[ $((i % 100)) = 0 ] && sleep 0.02; done; echo done; sleep 60',
    )  # fmt: skip
    log = tmp_path / "logs" / "web.1.log"
    rotations = 0
    deadline = time.monotonic() + scaled(30)
    while "done" not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < deadline, "the task did not finish writing"
        rotations += rotate_log(str(log), 2000, 3)
        time.sleep(0.005)
    assert rotations >= 5
    kept = sorted(p.name for p in log.parent.iterdir())
    assert kept == ["web.1.log", "web.1.log.1", "web.1.log.2"]
    texts = [Path(p).read_bytes() for p in [*rotated_paths(str(log), 3), str(log)]]
    assert all(b"\0" not in text and len(text) <= 4000 for text in texts)
    numbers = [int(line.split()[1]) for line in b"".join(texts).decode().splitlines()[:-1]]
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)
    assert numbers[-1] == lines - 1
