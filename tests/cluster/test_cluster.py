"""The cluster through the CLI (#15): nodes on one etcd, placement, node loss, drain, an etcd
outage and compaction, on real namespaces with real controllers. Traffic across nodes (the
overlay networks these services are on by default) is tested in test_overlay.py.
"""

from __future__ import annotations

import dataclasses
import json
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from tests.cluster.harness import Cluster
from tests.cluster.workloads import live, nodes, wait_live, web
from tests.kernel.mesh import wait_for

pytestmark = [pytest.mark.root, pytest.mark.cluster]

TTL = 4.0  # the nodes' lease here: node loss is noticed within it


@pytest.fixture
def short() -> Iterator[Cluster]:
    """Three nodes whose leases last TTL seconds."""
    with Cluster(nodes=3, controller_args=("--node-ttl", f"{TTL:g}s")) as made:
        yield made


def test_three_nodes_ready_and_a_service_spread_two_per_node(cluster: Cluster) -> None:
    shown = nodes(cluster)
    assert {n: v["state"] for n, v in shown.items()} == dict.fromkeys(cluster.nodes, "ready")
    assert sum(v["leader"] for v in shown.values()) == 1
    assert {n: v["address"] for n, v in shown.items()} == {
        n: h.address for n, h in cluster.nodes.items()
    }
    table = cluster.cli("node", "ls", node="node3").stdout
    assert re.search(r"node2 +\w+ +10\.99\.0\.12 +ready +active", table), table
    web(cluster, 6)
    tasks = wait_live(cluster, "web", 6)
    assert Counter(t["node"] for t in tasks) == dict.fromkeys(cluster.nodes, 2)
    # Every task answers on its node, from a task of the same node (a bridge network).
    for task in tasks:
        probe = cluster.in_task(task["id"], "curl", "-s", "--max-time", "3", "http://127.0.0.1/")
        assert probe.stdout.strip().endswith(task["name"]), probe


def test_constraints_place_on_matching_nodes_or_say_why_not(cluster: Cluster) -> None:
    cluster.cli("node", "update", "--label-add", "zone=b", "node2")
    assert nodes(cluster)["node2"]["labels"] == {"zone": "b"}
    web(cluster, 3, "--constraint", "node.labels.zone==b")
    assert {t["node"] for t in wait_live(cluster, "web", 3)} == {"node2"}
    web(cluster, 2, "--constraint", "node.labels.zone==c", name="nowhere")

    def pending_with_reason() -> bool:
        tasks = cluster.ps("nowhere")
        return len(tasks) == 2 and all(
            t["state"] == "pending"
            and t["node"] == ""
            and t["error"] == "no suitable node: 0 of 3 match node.labels.zone==c"
            for t in tasks
        )

    wait_for(pending_with_reason, 20, "both tasks pending, saying why")
    shown = cluster.cli("service", "ps", "nowhere").stdout
    assert "no suitable node: 0 of 3 match node.labels.zone==c" in shown
    cluster.cli("node", "update", "--label-add", "zone=c", "node3")
    assert {t["node"] for t in wait_live(cluster, "nowhere", 2)} == {"node3"}


@pytest.mark.parametrize("victim", ["leader", "other"])
def test_a_lost_nodes_tasks_run_elsewhere_and_come_back_once(short: Cluster, victim: str) -> None:
    cluster = short
    web(cluster, 6)
    wait_live(cluster, "web", 6)
    leader = next(n for n, v in nodes(cluster).items() if v["leader"])
    lost = leader if victim == "leader" else next(n for n in cluster.nodes if n != leader)
    asker = next(n for n in cluster.nodes if n != lost)
    old = {t["id"]: t for t in live(cluster, "web") if t["node"] == lost}
    assert len(old) == 2
    cluster.kill_controller(lost)
    cluster.cut(lost)
    killed = time.monotonic()

    def moved() -> list[dict[str, Any]] | None:
        tasks = live(cluster, "web", node=asker)
        fresh = [t for t in tasks if t["id"] not in old]
        ok = len(tasks) == 6 and all(t["node"] != lost for t in fresh) and len(fresh) == 6 - 2 + 2
        return tasks if ok and not any(t["node"] == lost for t in tasks) else None

    # The lease runs out within TTL; the leader (a new one, if the lost node led) replaces
    # the tasks at once; then they start. The budget: TTL + 2 s to replace, and their start.
    wait_for(moved, TTL + 2 + 8, f"node {lost}'s tasks replaced on the others")
    replaced_at = time.monotonic() - killed
    shown = nodes(cluster, node=asker)
    assert shown[lost]["state"] == "down"
    assert sum(v["leader"] for v in shown.values()) == 1 and not shown[lost]["leader"]
    ps = {t["id"]: t for t in cluster.ps("web", node=asker)}
    assert all(ps[i]["desired_state"] == "shutdown" for i in old), ps
    assert all(ps[i]["problem"] == f"node {lost} is down" for i in old), ps

    # Back: the old copies are stopped and forgotten, each slot runs exactly once.
    cluster.heal(lost)
    cluster.start_controller(lost)
    cluster.wait_registered()

    def once_each() -> bool:
        tasks = cluster.ps("web", node=asker)
        running = [t for t in tasks if t["state"] == "running" and t["desired_state"] == "running"]
        return (
            not any(t["id"] in old for t in tasks)
            and sorted(t["slot"] for t in running) == [1, 2, 3, 4, 5, 6]
            and len(tasks) == 6
        )

    wait_for(once_each, 40, "the old copies gone and every slot running once")
    for task_id in old:
        gone = cluster.in_node(lost, "ip", "netns", "pids", f"mesh-t-{task_id}")
        assert gone.returncode != 0 or gone.stdout.strip() == "", gone
    print(f"replaced within {replaced_at:.1f}s of the kill (TTL {TTL:g}s)")


def test_drain_moves_tasks_with_no_slot_ever_at_zero(cluster: Cluster) -> None:
    web(cluster, 6)
    wait_live(cluster, "web", 6)
    gaps: list[str] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            slots = Counter(t["slot"] for t in live(cluster, "web", node="node2"))
            missing = [s for s in range(1, 7) if not slots[s]]
            if missing:
                gaps.append(f"slots {missing} had no running task")
            time.sleep(0.1)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        cluster.cli("node", "update", "--availability", "drain", "node1")

        def drained() -> bool:
            tasks = cluster.ps("web", node="node2")
            return not any(t["node"] == "node1" for t in tasks) and len(live(cluster, "web")) == 6

        wait_for(drained, 90, "node1 drained")
    finally:
        stop.set()
        watcher.join()
    assert gaps == []
    assert Counter(t["node"] for t in live(cluster, "web")) == {"node2": 3, "node3": 3}
    assert nodes(cluster)["node1"]["availability"] == "drain"
    cluster.cli("node", "update", "--availability", "active", "node1")
    cluster.cli("service", "scale", "web=7", "-d")
    assert Counter(t["node"] for t in wait_live(cluster, "web", 7))["node1"] == 1


def test_an_etcd_outage_fails_no_request_and_is_logged_once(cluster: Cluster) -> None:
    web(cluster, 2, "--constraint", "node.name==node1")
    web(cluster, 1, "--constraint", "node.name==node1", name="client")
    wait_live(cluster, "web", 2)
    (client,) = wait_live(cluster, "client", 1)
    vip = json.loads(cluster.cli("service", "inspect", "web", "--format", "json").stdout)
    address = vip["networks"][0]["vip"]
    failures: list[str] = []
    answers = Counter[str]()
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            got = cluster.in_task(client["id"], "curl", "-s", "--max-time", "2",
                                  f"http://{address}/")  # fmt: skip
            if got.returncode != 0:
                failures.append(f"curl exit {got.returncode}")
            else:
                answers[got.stdout.strip().splitlines()[-1]] += 1
            time.sleep(0.05)

    worker = threading.Thread(target=loop)
    worker.start()
    try:
        time.sleep(2)  # requests before it too: the count below (> 100) is over all three
        cluster.stop_etcd()
        time.sleep(30)  # the outage under test: past a lease, the store's retries at their cap
        cluster.start_etcd()
        time.sleep(3)  # requests go on while the controllers find the store back
    finally:
        stop.set()
        worker.join()
    assert failures == []
    assert sum(answers.values()) > 100 and len(answers) == 2, answers
    for node in cluster.nodes:
        said = cluster.logs(node).count("store unreachable, keeping the last state")
        assert said == 1, f"{node} logged the outage {said} times"
    cluster.cli("service", "scale", "web=3", "-d")  # a change after the outage is applied
    wait_live(cluster, "web", 3)


def test_a_controller_away_during_compaction_converges_with_no_stale_task(
    cluster: Cluster,
) -> None:
    web(cluster, 3, "--constraint", "node.name==node2")
    before = {t["id"] for t in wait_live(cluster, "web", 3)}
    cluster.stop_controller("node2")
    start = cluster.call_store(lambda store: store.revision())

    def churn(store: Any) -> int:
        """2,000 scale changes while node2 is away, ending at 2 replicas. Each but the last is
        the one write `service scale` makes (the service record, replicas and updated_at new);
        scale_services, which the last goes through, also checks it against the whole
        store first: a dozen reads a change, four fifths of this test's time."""
        from meshctl.commands.service import scale_services
        from meshctl.model import SERVICE, Service, from_record

        record = store.get(SERVICE, "web")
        for i in range(1999):
            changed = dataclasses.replace(
                from_record(Service, record), replicas=4 + i % 3, updated_at=time.time()
            )
            record = store.put(SERVICE, "web", changed.to_dict(), expect=record.mod_revision)
        scale_services(store, {"web": 2})
        return int(store.revision())

    end = cluster.call_store(churn)
    assert end - start >= 2000

    def retired() -> bool:
        on_node2 = [t for t in cluster.ps("web") if t["node"] == "node2"]
        down = nodes(cluster)["node2"]["state"] == "down"
        return down and not any(t["desired_state"] == "running" for t in on_node2)

    # Away until its lease ran out and the leader retired its tasks (their replacements wait
    # for it), as it was while the churn went through ops: a minute and more.
    wait_for(retired, 30, "node2 down and its tasks retired")
    cluster.compact()
    cluster.start_controller("node2")
    cluster.wait_registered()
    tasks = wait_live(cluster, "web", 2, timeout=90)
    assert {t["node"] for t in tasks} == {"node2"}

    def converged() -> bool:
        return cluster.cli("diff", "--node", "node2", node="node2", check=False).returncode == 0

    wait_for(converged, 60, "meshctl diff empty on node2")
    known = {t["id"] for t in cluster.ps("web")}
    for task_id in before - known:
        gone = cluster.in_node("node2", "ip", "netns", "pids", f"mesh-t-{task_id}")
        assert gone.returncode != 0, f"task {task_id} survived: {gone.stdout}"
    assert len(known) == 2
