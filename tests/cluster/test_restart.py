"""Controller restarts in a cluster (#27): each node's controller crashed and restarted, then
stopped and started as an upgrade does, while a client task on every node asks the service's
name and gets it through its VIP (across the overlay). Nothing a user sees may change: no
failed query or request, no task replaced, the node never down to the leader."""

from __future__ import annotations

import contextlib
import json
import signal
import time
from functools import partial

import pytest

from tests.cluster.faults import status_deletes, taken_over
from tests.cluster.harness import Cluster
from tests.cluster.workloads import live, wait_live, web
from tests.conftest import scaled
from tests.kernel.mesh import wait_for
from tests.kernel.restart_loops import Loops

pytestmark = [pytest.mark.root, pytest.mark.cluster]

GAP = 2.0  # seconds with no controller on the node


def _slots(cluster: Cluster) -> dict[str, tuple[str, str, int]]:
    """Every running task by name: its id, node and pid."""
    return {
        t["name"]: (t["id"], t["node"], t["pid"])
        for service in ("web", "client")
        for t in live(cluster, service)
    }


def _reaches(cluster: Cluster, task_id: str, url: str) -> bool:
    get = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-m", "5", url]
    return cluster.in_task(task_id, *get).stdout == "200"


def test_restarting_every_controller_loses_nothing_and_replaces_nothing(cluster: Cluster) -> None:
    web(cluster, 6)
    web(cluster, 3, name="client")  # the scheduler spreads them: one on each node
    wait_live(cluster, "web", 6, 60)
    clients = wait_live(cluster, "client", 3, 60)
    assert sorted(t["node"] for t in clients) == ["node1", "node2", "node3"]
    inspect = cluster.cli("service", "inspect", "web", "--format", "json").stdout
    vip = json.loads(inspect)["networks"][0]["vip"]
    for task in clients:  # every client reaches the VIP before the loops begin
        reaches = partial(_reaches, cluster, task["id"], f"http://{vip}/")
        wait_for(reaches, 60, f"{task['name']} to reach web's VIP")
    before = _slots(cluster)
    since = cluster.call_store(lambda store: store.revision())

    with contextlib.ExitStack() as loops_of:
        loops = [
            loops_of.enter_context(Loops(t["pid"], "web", vip, f"http://{vip}/")) for t in clients
        ]
        for node in cluster.nodes:
            for sig in (signal.SIGKILL, signal.SIGTERM):
                for each in loops:
                    wait_for(partial(each.answered, 2), 30, "the loops to answer")
                cluster.stop_controller(node, sig)
                time.sleep(scaled(GAP))
                cluster.start_controller(node)
                wait_for(partial(taken_over, cluster, node), 30, f"{node}'s new controller")
                for each in loops:
                    wait_for(partial(each.answered, 4), 30, f"the loops after {node} restarted")
                failures = [f for each in loops for f in each.failures]
                assert failures == [], f"after {node}'s controller got {sig.name}"
                assert status_deletes(cluster, since) == [], f"{node} looked down ({sig.name})"
    assert _slots(cluster) == before
