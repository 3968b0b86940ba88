"""Operating a controller (#20), as its users would: Prometheus' view of it through /metrics,
/healthz and /readyz over real HTTP, `meshctl events` during a scale and a kill, and a waiting
`service scale`/`create` that fails with the reason when a task cannot start."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import scaled, scaled_duration
from tests.kernel.mesh import MESHCTL, Mesh, breakable_iptables, wait_for

# Not in the QEMU lane: no metric here is the LB backend's own (kernel operations are summed over
# every subsystem), the broken tool is iptables', and events and scheduling never touch the
# kernel; the one request through a VIP is test_service_discovery's, whose ipvs tests ask more.
pytestmark = pytest.mark.root

WEB = ["socat", "TCP-LISTEN:80,reuseaddr,fork", "SYSTEM:hostname"]


def test_metrics_and_health_follow_a_scale_a_kill_traffic_and_a_broken_kernel(
    node_ns: str, tmp_path: Path
) -> None:
    tools, broken = breakable_iptables(tmp_path)
    mesh = Mesh(node_ns, str(tmp_path / "state"))
    mesh.env["PATH"] = f"{tools}:{os.environ['PATH']}"
    try:
        mesh.cli("network", "create", "front", "--subnet", "10.94.0.0/24")
        mesh.cli("service", "create", "--name", "web", "--network", "front", "-d",
                 "--health-cmd", "true", "--health-interval", scaled_duration(1),
                 "--restart-delay", "0.1s", "--", *WEB)  # fmt: skip
        # Nothing listens on the upstream: a forwarded name fails there, and is counted.
        mesh.start_controller("--upstream-dns", "127.0.0.1:5399")
        wait_for(lambda: mesh.endpoint("/readyz") == (200, "ok\n"), 30, "/readyz to say ok")
        assert mesh.endpoint("/healthz") == (200, "ok\n")
        assert mesh.metric("meshctl_controller_ready") == 1
        # Ready after the first pass that converged; the store changes it made are applied,
        # and their programming observed, by the next (a pass may take seconds under TCG).
        wait_for(lambda: mesh.metric("meshctl_network_programming_duration_seconds_count") > 0,
                 30, "a store change's programming observed")  # fmt: skip
        passes = mesh.metric("meshctl_reconcile_duration_seconds_count", kind="pass")
        programmed = mesh.metric("meshctl_network_programming_duration_seconds_count")
        writes = mesh.metric("meshctl_kernel_operations_total", op="write", result="ok")
        assert passes > 0 and programmed > 0 and writes > 0

        scaling = mesh.cli("service", "scale", "web=3", "--timeout", scaled_duration(60))
        assert "web: converged" in scaling.stderr  # it waited until then
        assert mesh.metric("meshctl_tasks", state="running") == 3
        assert mesh.metric("meshctl_reconcile_duration_seconds_count", kind="pass") > passes
        assert mesh.metric("meshctl_network_programming_duration_seconds_count") > programmed
        assert mesh.metric("meshctl_kernel_operations_total", op="write", result="ok") > writes
        assert mesh.metric("meshctl_task_health_transitions_total", to="healthy") >= 3
        assert mesh.metric("meshctl_leader") == 1

        # Real traffic: names and a VIP from inside a task, one name forwarded upstream.
        client = mesh.running("web")[0]
        dig = ["dig", "@127.0.0.11", f"+time={round(scaled(3))}", "+tries=1"]
        for name in ("web", "tasks.web", "web.2"):
            answer = mesh.in_task(client["id"], *dig, "+short", name)
            assert answer.stdout.strip().startswith("10.94.0."), answer
        forwarded = mesh.in_task(client["id"], *dig, "example.invalid")
        assert "status: SERVFAIL" in forwarded.stdout, forwarded
        vip = mesh.in_task(client["id"], *dig, "+short", "web").stdout.strip()
        wait = f"{scaled(5):g}"
        served = mesh.in_task(client["id"], "socat", f"-t{wait}", f"-T{wait}", "-", f"TCP:{vip}:80")
        assert served.stdout.startswith("web."), served
        assert mesh.metric("meshctl_dns_requests_total", proto="udp", type="A") >= 5
        assert mesh.metric("meshctl_dns_responses_total", rcode="NOERROR", source="local") >= 3
        assert mesh.metric("meshctl_dns_responses_total", rcode="SERVFAIL", source="forward") >= 1
        assert mesh.metric("meshctl_dns_upstream_failures_total", to="127.0.0.1:5399") >= 1
        assert mesh.metric("meshctl_dns_request_duration_seconds_count", type="A") >= 4

        # A killed task is restarted: the restart is counted, the running count comes back.
        os.kill(client["pid"], signal.SIGKILL)
        wait_for(lambda: mesh.metric("meshctl_task_restarts_total") >= 1, 30, "a restart")
        wait_for(lambda: mesh.metric("meshctl_tasks", state="running") == 3, 30, "3 running")
        assert mesh.endpoint("/healthz") == (200, "ok\n")

        # The firewall tool breaks and a rule goes behind the controller's back: the repair
        # fails at the next full resync, /healthz says why; a repaired tool brings it back.
        broken.touch()
        mesh.in_node("iptables-legacy", "-t", "filter", "-F", "MESH-FORWARD", check=True)

        def unhealthy() -> str | None:
            code, body = mesh.endpoint("/healthz")
            return body if code == 503 else None

        reason = wait_for(unhealthy, 30, "/healthz to answer 503")
        assert "broken for the test" in reason, reason
        assert mesh.metric("meshctl_controller_healthy") == 0
        asked = mesh.in_node(*MESHCTL, "controller", "health", env=mesh.env)
        assert asked.returncode == 1 and asked.stderr.startswith("Error: unhealthy: "), asked
        assert mesh.metric("meshctl_reconcile_duration_seconds_count", result="error") >= 1
        broken.unlink()
        ready = mesh.in_node(
            *MESHCTL, "controller", "health", "--wait", scaled_duration(30), env=mesh.env
        )
        assert ready.returncode == 0 and ready.stdout == "ok\n", ready
        assert mesh.metric("meshctl_controller_healthy") == 1
        mesh.wait_converged()
    finally:
        mesh.close()


def events_of(lines: list[str]) -> list[dict[str, object]]:
    return [json.loads(line) for line in lines if line.strip()]


def position(events: list[dict[str, object]], type_: str, action: str, name: str) -> int:
    for index, event in enumerate(events):
        if (event["type"], event["action"], event["name"]) == (type_, action, name):
            return index
    raise AssertionError(f"no event {type_} {action} {name} in {events}")


def first_line(process: subprocess.Popen[str], timeout: float) -> str:
    """The first line the process prints, or "" if none comes within timeout."""
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    return process.stdout.readline() if ready else ""


def test_events_show_a_scale_and_a_kill_in_order(mesh: Mesh) -> None:
    mesh.cli("network", "create", "front", "--subnet", "10.95.0.0/24")
    mesh.cli("service", "create", "--name", "web", "--network", "front", "-d",
             "--restart-delay", "0.1s", "--", *WEB)  # fmt: skip
    mesh.start_controller()
    (first,) = mesh.wait_running("web", 1)
    # Following from now on, as docker events; --since: from before it started listening.
    # Started with SIGINT ignored, as any runner started in the background (`nohup ... &`)
    # starts its children, so the test is the same however it was started: Ctrl-C still stops it.
    follower = subprocess.Popen(
        [*MESHCTL, "events", "--format", "json", "--filter", "service=web",
         "--since", f"{time.time():.3f}"],
        env=mesh.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )  # fmt: skip
    try:
        mesh.cli("service", "scale", "web=2", "--timeout", scaled_duration(60))
        os.kill(first["pid"], signal.SIGKILL)
        wait_for(lambda: any(t["pid"] not in (None, first["pid"]) and t["name"] == "web.1"
                             for t in mesh.running("web")), 30, "web.1 to run again")  # fmt: skip
        mesh.wait_running("web", 2)

        def follower_saw_the_restart() -> bool:
            stored = mesh.cli("events", "--since", "5m", "--until", "0s", "--format", "json")
            return sum(e["action"] == "running" and e["name"] == "web.1"
                       for e in events_of(stored.stdout.splitlines())) >= 2  # fmt: skip

        wait_for(follower_saw_the_restart, 30, "the restart in the event log")
    finally:
        # It has set its handlers once it prints: a signal before that would be ignored.
        head = first_line(follower, scaled(30))
        follower.send_signal(signal.SIGINT)
        try:
            follower.wait(timeout=scaled(15))
        finally:
            follower.kill()  # a follower that did not stop must not outlive the test
        assert follower.stdout is not None and follower.stderr is not None
        out, err = head + follower.stdout.read(), follower.stderr.read()
    assert follower.returncode == 0, err
    followed = events_of(out.splitlines())
    assert followed, err
    # In order: the scale, the new task's way to running; the kill, then the restart.
    scale = position(followed, "service", "scale", "web")
    made = position(followed, "task", "create", "web.2")
    assigned = position(followed, "task", "assigned", "web.2")
    running = position(followed, "task", "running", "web.2")
    assert scale < made < assigned < running
    failed = position(followed, "task", "failed", "web.1")
    assert followed[failed]["attributes"]["exit_code"] == "137"  # type: ignore[index]
    restarted = [i for i, e in enumerate(followed)
                 if (e["action"], e["name"]) == ("running", "web.1") and i > failed]  # fmt: skip
    assert restarted, followed
    # The same log, read after the fact from the store, filtered to the task type.
    stored = events_of(
        mesh.cli("events", "--since", "5m", "--until", "0s", "--format", "json",
                 "--filter", "type=task", "--filter", "name=web.1").stdout.splitlines()
    )  # fmt: skip
    actions = [e["action"] for e in stored]
    assert actions[:3] == ["create", "assigned", "running"]
    assert actions.index("failed") < len(actions) - 1 - actions[::-1].index("running")
    # (web was created before the controller started: that is not in the log.)
    table = mesh.cli("events", "--since", "5m", "--until", "0s", "--filter", "type=service")
    scale_line = f" service scale web (id={followed[scale]['id']}, replicas=2, was=1)"
    assert table.stdout.splitlines()[0].endswith(scale_line)


def test_a_waiting_scale_or_create_fails_with_the_reason_a_task_cannot_start(mesh: Mesh) -> None:
    os.makedirs(mesh.state_dir)
    mesh.start_controller()
    wait_for(lambda: mesh.endpoint("/readyz")[0] == 200, 30, "the controller to be ready")
    mesh.cli("service", "create", "--name", "api", "--constraint", "node.labels.zone==b", "-d",
             "--", "sleep", "3600")  # fmt: skip
    wait = scaled(3)
    scaling = mesh.cli("service", "scale", "api=2", "--timeout", f"{wait:g}s", check=False)
    assert scaling.returncode == 1
    assert "api.1: pending: no suitable node: 0 of 1 match node.labels.zone==b" in scaling.stderr
    assert scaling.stderr.rstrip().endswith(
        f"Error: api did not converge within {wait:g}s; see: meshctl service ps api"
    )
    created = mesh.cli("service", "create", "--name", "crash", "--restart-condition", "none",
                       "--", "sh", "-c", "exit 3", check=False)  # fmt: skip
    assert created.returncode == 1
    assert "crash.1: failed: exit code 3" in created.stderr
    assert "Error: crash cannot converge: a task ended for good; see: meshctl service ps crash" in (
        created.stderr
    )
    good = mesh.cli("service", "create", "--name", "fine", "--timeout", scaled_duration(60),
                    "--", "sleep", "3600")  # fmt: skip
    assert good.returncode == 0 and "fine: converged" in good.stderr
