"""The controller on a real kernel: tasks in namespaces, isolation, supervision, restart, exec.

Each test builds a node namespace and a state dir of its own, drives meshctl through its CLI
like a user, and looks at the kernel and at real packets. The Mesh fixture removes all of it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from kernel import netns
from meshctl import naming
from tests.conftest import scaled
from tests.kernel.mesh import Mesh, wait_for

# Not in the QEMU lane: these test tasks, supervision, exec, attach and updates, and reach tasks
# at their own addresses, never through a VIP; the LB backend's paths through a whole
# controller are test_service_discovery's, test_ingress's and test_router's ipvs tests.
pytestmark = pytest.mark.root

# A task that answers every TCP connection on port 80 with its own host name (the task name).
NAME_SERVER = ["socat", "TCP-LISTEN:80,reuseaddr,fork", "SYSTEM:hostname"]


def _create(mesh: Mesh, name: str, network: str, replicas: int, *extra: str) -> None:
    mesh.cli("service", "create", "--name", name, "--network", network, "--replicas",
             str(replicas), "--restart-delay", "0s", "--stop-grace-period", "2s", *extra,
             "--detach", "--", *NAME_SERVER)  # fmt: skip


def _tcp(mesh: Mesh, task_id: str, address: str) -> subprocess.CompletedProcess[str]:
    # The handshake is the kernel's alone (fast on any machine); the answer comes from a process
    # the server forks, so waiting for it (-t after stdin's end, -T idle) scales.
    wait = scaled(5)
    return mesh.in_task(
        task_id, "socat", f"-t{wait:g}", f"-T{wait:g}", "-", f"TCP:{address}:80,connect-timeout=5"
    )


def _ping(mesh: Mesh, task_id: str, address: str) -> int:
    return mesh.in_task(task_id, "ping", "-c1", "-W1", address).returncode


def test_tasks_reach_their_network_and_nothing_else(mesh: Mesh) -> None:
    mesh.cli("network", "create", "front", "--subnet", "10.51.0.0/24")
    mesh.cli("network", "create", "back", "--subnet", "10.52.0.0/24")
    _create(mesh, "web", "front", 2)
    _create(mesh, "db", "back", 1)
    mesh.start_controller()
    web = mesh.wait_running("web", 2)
    (db,) = mesh.wait_running("db", 1)
    web1, web2 = sorted(web, key=lambda t: t["slot"])
    assert web1["addresses"] == {"front": web1["addresses"]["front"]}
    # The task holds its address on eth0 inside its own namespace.
    shown = mesh.in_task(web1["id"], "ip", "-4", "-o", "addr", "show", "eth0").stdout
    assert f"{web1['addresses']['front']}/24" in shown
    # Same network: ping and TCP work, and the answer is the other task's name.
    assert _ping(mesh, web1["id"], web2["addresses"]["front"]) == 0
    answer = wait_for(lambda: _tcp(mesh, web1["id"], web2["addresses"]["front"]).stdout, 10, "tcp")
    assert answer.strip() == "web.2"
    # Another network: nothing gets through, in either direction.
    assert _ping(mesh, web1["id"], db["addresses"]["back"]) != 0
    assert _tcp(mesh, web1["id"], db["addresses"]["back"]).stdout == ""
    assert _ping(mesh, db["id"], web1["addresses"]["front"]) != 0
    assert _tcp(mesh, db["id"], web1["addresses"]["front"]).stdout == ""


def test_killed_task_is_restarted_and_ps_shows_the_history(mesh: Mesh) -> None:
    mesh.cli("network", "create", "front", "--subnet", "10.53.0.0/24")
    _create(mesh, "web", "front", 1)
    mesh.start_controller()
    (task,) = mesh.wait_running("web", 1)
    old_pid = task["pid"]
    killed_at = time.monotonic()
    os.kill(old_pid, signal.SIGKILL)

    def restarted() -> dict | None:  # type: ignore[type-arg]
        running = mesh.running("web")
        return running[0] if running and running[0]["pid"] not in (None, old_pid) else None

    again = wait_for(restarted, 10, "a new process for web.1")
    # Restart delay 0 s: the first restart waits only the minimal back-off.
    assert time.monotonic() - killed_at < scaled(1.5)
    assert again["id"] == task["id"] and again["restarts"] == 1
    assert [e["state"] for e in again["history"]][-2:] == ["failed", "running"]
    assert again["history"][-2]["message"] == "exit code 137"
    table = mesh.cli("service", "ps", "web").stdout
    assert "\\_ web.1" in table and "exit code 137" in table
    # Still reachable: the new process runs in the same namespace with the same address.
    answer = wait_for(
        lambda: _tcp(mesh, again["id"], again["addresses"]["front"]).stdout, 10, "tcp"
    )
    assert answer.strip() == "web.1"


def test_scale_to_zero_and_remove_leaves_nothing(mesh: Mesh) -> None:
    mesh.cli("network", "create", "front", "--subnet", "10.54.0.0/24")
    _create(mesh, "web", "front", 3)
    mesh.start_controller()
    tasks = mesh.wait_running("web", 3)
    pids = [t["pid"] for t in tasks]
    ids = [t["id"] for t in tasks]
    assert mesh.in_node("iptables-legacy-save").stdout.count("meshctl:") > 0
    mesh.cli("service", "scale", "web=0", "--detach")
    wait_for(lambda: mesh.ps("web") == [], 15, "all tasks gone")
    mesh.cli("service", "rm", "web")
    mesh.cli("network", "rm", "front")

    def nothing_left() -> bool:
        links = mesh.in_node("ip", "-o", "link").stdout
        rules = mesh.in_node("iptables-legacy-save").stdout
        return "mesh" not in links and "MESH" not in rules and "meshctl" not in rules

    wait_for(nothing_left, 10, "no mesh links or rules in the node")
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}"), f"task process {pid} still runs"
    for task_id in ids:
        assert not netns.exists(f"mesh-t-{task_id}")
    assert not os.listdir(os.path.join(mesh.state_dir, "tasks"))


def test_controller_restart_adopts_tasks_and_catches_up(mesh: Mesh) -> None:
    mesh.cli("network", "create", "front", "--subnet", "10.55.0.0/24")
    _create(mesh, "web", "front", 2)
    mesh.start_controller()
    before = {t["id"]: t["pid"] for t in mesh.wait_running("web", 2)}
    mesh.stop_controller(signal.SIGKILL)
    mesh.cli("service", "scale", "web=3", "--detach")  # while no controller runs
    mesh.start_controller()
    after = {t["id"]: t["pid"] for t in mesh.wait_running("web", 3)}
    for task_id, pid in before.items():
        assert after[task_id] == pid, "a running task was restarted instead of adopted"
    for task in mesh.running("web"):
        assert task["restarts"] == 0


def test_exec_runs_inside_the_task(mesh: Mesh) -> None:
    mesh.cli("network", "create", "front", "--subnet", "10.56.0.0/24")
    _create(mesh, "web", "front", 1)
    mesh.start_controller()
    mesh.wait_running("web", 1)
    assert mesh.cli("exec", "web.1", "--", "hostname").stdout.strip() == "web.1"
    assert mesh.cli("exec", "web.1", "--", "cat", "/etc/resolv.conf").stdout == (
        "nameserver 127.0.0.11\noptions ndots:0\n"
    )
    assert mesh.cli("exec", "web.1", "--", "sh", "-c", "exit 3", check=False).returncode == 3
    missing = mesh.cli("exec", "nope.1", "--", "true", check=False)
    assert missing.returncode == 1 and len(missing.stderr.strip().splitlines()) == 1


def test_attached_namespace_reaches_tasks_and_detach_removes_it(mesh: Mesh) -> None:
    mesh.cli("network", "create", "front", "--subnet", "10.57.0.0/24")
    _create(mesh, "web", "front", 1)
    mesh.start_controller()
    (task,) = mesh.wait_running("web", 1)
    # A namespace another runtime made, held by its process, with nothing in it but lo.
    holder = subprocess.Popen(["unshare", "--net", "sleep", "300"])
    try:
        wait_for(
            lambda: os.readlink(f"/proc/{holder.pid}/ns/net") != os.readlink("/proc/self/ns/net"),
            5,
            "unshare",
        )
        ns = f"/proc/{holder.pid}/ns/net"
        before = subprocess.run(
            ["nsenter", f"--net={ns}", "ip", "-o", "link"], capture_output=True, text=True
        ).stdout
        out = mesh.cli(
            "container",
            "attach",
            "--pid",
            str(holder.pid),
            "--name",
            "legacy",
            "--network",
            "front",
            "--format",
            "json",
        ).stdout
        attached = json.loads(out)
        address = attached["address"]

        def in_ns(*argv: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                ["nsenter", f"--net={ns}", *argv],
                capture_output=True,
                text=True,
                timeout=scaled(10),
            )

        wait_for(
            lambda: address in in_ns("ip", "-4", "-o", "addr").stdout, 10, "the attached address"
        )
        assert in_ns("ping", "-c1", "-W1", task["addresses"]["front"]).returncode == 0
        assert (
            in_ns(
                "socat",
                f"-t{scaled(2):g}",
                f"-T{scaled(2):g}",
                "-",
                f"TCP:{task['addresses']['front']}:80",
            ).stdout.strip()
            == "web.1"
        )
        assert _ping(mesh, task["id"], address) == 0
        mesh.cli("container", "detach", "legacy")
        wait_for(
            lambda: in_ns("ip", "-o", "link").stdout == before,
            10,
            "the veth gone from the namespace",
        )
        # By its own name: a bridge's name is `mesh` and the network's hex id, which may begin
        # with "c" as well (any "meshc" failed one run in 16).
        node_end = f": {naming.container_veth(attached['id'])}"
        wait_for(
            lambda: node_end not in mesh.in_node("ip", "-o", "link").stdout,
            10,
            "the node end gone",
        )
        assert mesh.cli("container", "ls", "--format", "json").stdout.strip() == "[]"
    finally:
        holder.kill()
        holder.wait()


def test_update_rolls_one_task_at_a_time_new_before_old(mesh: Mesh) -> None:
    mesh.cli("network", "create", "front", "--subnet", "10.58.0.0/24")
    _create(mesh, "web", "front", 2)
    mesh.start_controller()
    old = {t["id"] for t in mesh.wait_running("web", 2)}
    mesh.cli("service", "update", "web", "--env", "RELEASE=2", "--detach")
    fewest_running = 2
    deadline = time.monotonic() + scaled(30)
    while time.monotonic() < deadline:
        tasks = mesh.ps("web")
        running = [t for t in tasks if t["state"] == "running"]
        fewest_running = min(fewest_running, len(running))
        if len(tasks) == 2 and all(
            t["spec_version"] == 2 and t["state"] == "running" for t in tasks
        ):
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"the update did not finish: {mesh.ps('web')}")
    assert fewest_running >= 2, "a task was stopped before its replacement ran"
    assert not old & {t["id"] for t in mesh.ps("web")}
    env = mesh.cli("exec", "web.1", "--", "sh", "-c", "echo $RELEASE").stdout
    assert env.strip() == "2"
