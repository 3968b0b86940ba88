"""A controller restart, crash or upgrade, is invisible to the tasks (#27): they keep their
processes, their queries to 127.0.0.11 and their connections through a VIP are answered through
the gap, and the next controller reprograms nothing."""

from __future__ import annotations

import json
import os
import signal
import time
from functools import partial

import pytest

from meshctl.naming import task_dir
from tests.cluster.workloads import HTTP
from tests.conftest import scaled
from tests.kernel.mesh import Mesh, wait_for
from tests.kernel.restart_loops import Loops

pytestmark = [pytest.mark.root]

GAP = 2.0  # seconds with no controller at all


def _dns_ports(mesh: Mesh, task_ids: list[str]) -> dict[str, list[int]]:
    ports = {}
    for task_id in task_ids:
        with open(os.path.join(task_dir(mesh.state_dir, task_id), "dns-ports")) as f:
            ports[task_id] = json.load(f)
    return ports


def _answers(mesh: Mesh, task_id: str, url: str) -> bool:
    get = mesh.in_task(task_id, "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", url)
    return get.stdout == "200"


def test_a_restart_loses_no_query_and_no_request_and_replaces_nothing(mesh: Mesh) -> None:
    mesh.cli("network", "create", "front", "--subnet", "10.58.0.0/24")
    mesh.cli("service", "create", "--name", "web", "--network", "front", "--replicas", "2",
             "--detach", "--", *HTTP)  # fmt: skip
    mesh.cli("service", "create", "--name", "client", "--network", "front", "--detach",
             "--", "sleep", "infinity")  # fmt: skip
    mesh.start_controller()
    mesh.wait_running("web", 2)
    (client,) = mesh.wait_running("client", 1)
    inspect = json.loads(mesh.cli("service", "inspect", "web", "--format", "json").stdout)
    vip = inspect["networks"][0]["vip"]
    wait_for(lambda: mesh.dig(client, "web") == [vip], 20, "web's VIP in the client's DNS")
    for task in mesh.running("web"):  # each server listens before the loops begin
        url = f"http://{task['addresses']['front']}/"
        wait_for(partial(_answers, mesh, client["id"], url), 20, f"{task['name']} to listen")
    # DNS answers from the first pass's records, the VIP only once the LB is programmed later
    # in that pass: the loops begin when the VIP answers too.
    wait_for(partial(_answers, mesh, client["id"], f"http://{vip}/"), 20, "web via its VIP")
    tasks = {t["id"]: t["pid"] for name in ("web", "client") for t in mesh.running(name)}
    ports = _dns_ports(mesh, list(tasks))

    with Loops(client["pid"], "web", vip, f"http://{vip}/") as loops:
        for sig in (signal.SIGKILL, signal.SIGTERM):  # a crash, then a stop as an upgrade does
            wait_for(partial(loops.answered, 4), 20, "the loops to answer")
            stopped = time.monotonic()
            mesh.stop_controller(sig)
            time.sleep(scaled(GAP))
            gap = (stopped, time.monotonic())
            mesh.start_controller()
            wait_for(lambda: mesh.endpoint("/readyz")[0] == 200, 30, "the new controller ready")
            wait_for(partial(loops.answered, 8), 30, "the loops to answer again")
            assert loops.failures == []
            # Connections go through the kernel's VIP all along; a query waits in its socket.
            assert loops.during("curl", *gap) >= 2, "no request while no controller ran"
            assert loops.during("dig", *gap) >= 1, "no query while no controller ran"
        time.sleep(scaled(1))
    assert loops.failures == []
    assert {t["id"]: t["pid"] for n in ("web", "client") for t in mesh.running(n)} == tasks
    assert _dns_ports(mesh, list(tasks)) == ports  # the same sockets: no redirect rewritten
