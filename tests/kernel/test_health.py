"""Health probes on the real kernel: cmd, tcp and http against a real server inside a task's
namespace, and the monitor loop that moves a task between healthy and unhealthy."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kernel import netns
from meshctl.model import HealthCheck
from meshctl.runtime import (
    HealthState,
    ProbeResult,
    TaskProcess,
    TaskProcessSpec,
    monitor,
    probe_cmd,
    probe_http,
    probe_tcp,
    run_probe,
    start,
)
from tests.conftest import scaled
from tests.kernel.mesh import wait_for

pytestmark = pytest.mark.root

ADDRESS = "10.99.0.2"
# On the link's subnet but owned by no one: its ARP goes unanswered, so a connect there gets no
# answer at all (the kernel here has no dummy links, so a veth pair with one end bare stands in).
BLACKHOLE = "10.99.0.9"
HTTP_PORT = 8080
SILENT_PORT = 8082
CLOSED_PORT = 8081


@dataclass
class Task:
    ns: str
    proc: TaskProcess


def run(probe: Coroutine[Any, Any, ProbeResult]) -> ProbeResult:
    return asyncio.run(probe)


@pytest.fixture
def task(netns_factory: Callable[[str], str], tmp_path: Path) -> Iterator[Task]:
    """A task `web.1` serving HTTP on ADDRESS:8080 (a dir `sub/` answers 301 without its slash)
    and a silent listener on :8082 that accepts and never answers."""
    ns = netns_factory("health")
    for cmd in (
        "link set lo up",
        "link add mesh0 type veth peer name mesh1",
        f"addr add {ADDRESS}/24 dev mesh0",
        "link set mesh0 up",
        "link set mesh1 up",
    ):
        subprocess.run(["ip", "-n", ns, *cmd.split()], check=True)
    (tmp_path / "www" / "sub").mkdir(parents=True)
    server = (
        f"{sys.executable} -m http.server {HTTP_PORT} --bind {ADDRESS} "
        f"--directory {tmp_path / 'www'} & "
        f"exec socat TCP-LISTEN:{SILENT_PORT},bind={ADDRESS},reuseaddr,fork SYSTEM:'sleep 60'"
    )
    proc = start(
        TaskProcessSpec(
            task_name="web.1",
            netns=ns,
            command=("/bin/sh", "-c", server),
            log_path=str(tmp_path / "web.1.log"),
            files_dir=str(tmp_path / "files"),
        )
    )
    try:
        wait_for(lambda: run(probe_tcp(ns, ADDRESS, HTTP_PORT, scaled(1))).ok, 10, "HTTP up")
        wait_for(lambda: run(probe_tcp(ns, ADDRESS, SILENT_PORT, scaled(1))).ok, 10, "socat up")
        yield Task(ns, proc)
    finally:
        proc.stop(0)
        proc.close()


def test_http_2xx_and_3xx_are_healthy(task: Task) -> None:
    ok = run(probe_http(task.ns, ADDRESS, HTTP_PORT, "/", scaled(2)))
    assert ok.ok and " 200 " in ok.output
    redirect = run(probe_http(task.ns, ADDRESS, HTTP_PORT, "/sub", scaled(2)))
    assert redirect.ok and " 301 " in redirect.output


def test_http_404_is_unhealthy(task: Task) -> None:
    result = run(probe_http(task.ns, ADDRESS, HTTP_PORT, "/missing", scaled(2)))
    assert not result.ok
    assert " 404 " in result.output


def test_http_without_an_answer_times_out(task: Task) -> None:
    began = time.monotonic()
    result = run(probe_http(task.ns, ADDRESS, SILENT_PORT, "/", scaled(0.5)))
    assert not result.ok and "timed out" in result.output
    assert time.monotonic() - began < scaled(2)


def test_http_to_a_closed_port_is_unhealthy(task: Task) -> None:
    result = run(probe_http(task.ns, ADDRESS, CLOSED_PORT, "/", scaled(2)))
    assert not result.ok and "refused" in result.output.lower()


def test_tcp_connect_ok_refused_and_timeout(task: Task) -> None:
    assert run(probe_tcp(task.ns, ADDRESS, HTTP_PORT, scaled(2))).ok
    refused = run(probe_tcp(task.ns, ADDRESS, CLOSED_PORT, scaled(2)))
    assert not refused.ok and "refused" in refused.output.lower()
    began = time.monotonic()
    silent = run(probe_tcp(task.ns, BLACKHOLE, HTTP_PORT, scaled(0.5)))
    assert not silent.ok and "timed out" in silent.output
    assert time.monotonic() - began < scaled(2)


def test_tcp_probe_runs_in_the_task_namespace_not_ours(task: Task, node_ns: str) -> None:
    # The same address from another namespace has no route: the probe's namespace matters.
    result = run(probe_tcp(node_ns, ADDRESS, HTTP_PORT, scaled(1)))
    assert not result.ok


def test_cmd_runs_inside_the_task(task: Task) -> None:
    result = run(
        probe_cmd(
            task.ns,
            task.proc.pid,
            'test "$(hostname)" = web.1 && grep 127.0.0.11 /etc/resolv.conf',
            scaled(5),
        )
    )
    assert result.ok, result.output
    assert "nameserver 127.0.0.11" in result.output


def test_cmd_failure_keeps_its_output(task: Task) -> None:
    result = run(probe_cmd(task.ns, task.proc.pid, "echo database down; exit 1", scaled(5)))
    assert not result.ok
    assert result.output == "database down\n"


def test_cmd_timeout_kills_the_probe(task: Task) -> None:
    began = time.monotonic()
    result = run(probe_cmd(task.ns, task.proc.pid, "sleep 30; echo late", scaled(0.5)))
    assert not result.ok and "timed out" in result.output
    assert time.monotonic() - began < scaled(3)

    def probe_sleeps_left() -> bool:
        target = netns.inode(task.ns)
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                in_ns = os.stat(f"/proc/{pid}/ns/net").st_ino == target
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                continue
            if in_ns and cmdline == b"sleep\x0030\x00":
                return True
        return False

    wait_for(lambda: not probe_sleeps_left(), 3, "the probe's sleep to be killed")


def test_run_probe_follows_the_check(task: Task) -> None:
    checks = {
        HealthCheck(kind="http", port=HTTP_PORT, path="/", timeout=scaled(2)): True,
        HealthCheck(kind="http", port=HTTP_PORT, path="/nope", timeout=scaled(2)): False,
        HealthCheck(kind="tcp", port=HTTP_PORT, timeout=scaled(2)): True,
        HealthCheck(kind="tcp", port=CLOSED_PORT, timeout=scaled(2)): False,
        HealthCheck(kind="cmd", command="hostname | grep -qx web.1", timeout=scaled(5)): True,
    }
    for check, healthy in checks.items():
        result = run(run_probe(check, task.ns, task.proc.pid, ADDRESS))
        assert result.ok is healthy, (check, result)


def test_monitor_reports_healthy_unhealthy_and_healthy_again(task: Task, tmp_path: Path) -> None:
    flag = tmp_path / "ready"
    check = HealthCheck(
        kind="cmd", command=f"test -e {flag}", interval=scaled(0.1), timeout=scaled(2), retries=2
    )

    async def scenario() -> list[HealthState]:
        changes: asyncio.Queue[HealthState] = asyncio.Queue()

        async def on_change(state: HealthState, result: ProbeResult) -> None:
            await changes.put(state)

        watcher = asyncio.create_task(monitor(check, task.ns, task.proc.pid, ADDRESS, on_change))
        seen: list[HealthState] = []
        try:
            for toggle in (flag.touch, flag.unlink, flag.touch):
                toggle()
                seen.append(await asyncio.wait_for(changes.get(), scaled(10)))
        finally:
            watcher.cancel()
        return seen

    assert asyncio.run(scenario()) == ["healthy", "unhealthy", "healthy"]


def test_monitor_ends_when_the_task_process_is_gone(task: Task) -> None:
    """Its caller cancels a monitor only on its next pass after the process ended; a probe in
    between found the process gone (reaped) and the monitor died with NotFound, an exception
    nobody retrieved, logged as a traceback. It ends quietly now, reporting no change."""
    check = HealthCheck(kind="cmd", command="true", interval=scaled(0.1), timeout=scaled(2))
    task.proc.stop(0)  # ended and reaped, as the supervisor's stop does
    changes: list[HealthState] = []

    async def on_change(state: HealthState, result: ProbeResult) -> None:
        changes.append(state)

    async def watch() -> None:
        await asyncio.wait_for(
            monitor(check, task.ns, task.proc.pid, ADDRESS, on_change), scaled(10)
        )

    asyncio.run(watch())
    assert changes == []
