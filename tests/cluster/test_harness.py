"""The cluster harness itself: its namespaces reach each other over the underlay and only there,
its controllers register and run a service created through the CLI, its failure switches work,
and close() leaves nothing behind, also after a start that failed halfway."""

from __future__ import annotations

import os
import subprocess
from typing import Any

import pytest

from kernel import netns
from meshctl.store import Compacted, Unavailable
from tests.cluster.harness import Cluster
from tests.conftest import TEST_NETNS_PREFIX
from tests.kernel.mesh import wait_for

pytestmark = [pytest.mark.root, pytest.mark.cluster]

REPLY = "echo HTTP/1.0 200 OK; echo; hostname"


def _pings(cluster: Cluster, netns_name: str, address: str) -> bool:
    argv = ["nsenter", f"--net={netns.path(netns_name)}", "--", "ping", "-c1", "-W1", address]
    return subprocess.run(argv, capture_output=True, check=False).returncode == 0


def _start_time(pid: int) -> str | None:
    """A process's start time (pid and start time name it for good); None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return None
    return None if fields[0] == "Z" else fields[19]


def _web(cluster: Cluster, replicas: int) -> list[dict[str, Any]]:
    """A network and an HTTP service made through the CLI in node1, once its tasks all run."""
    cluster.cli("network", "create", "front")
    cluster.cli("service", "create", "--name", "web", "--replicas", str(replicas),
                "--network", "front", "--", "socat", "TCP-LISTEN:80,reuseaddr,fork",
                f"SYSTEM:{REPLY}")  # fmt: skip

    def running() -> list[dict[str, Any]] | None:
        tasks = [t for t in cluster.ps("web") if t["state"] == "running"]
        return tasks if len(tasks) == replicas else None

    return wait_for(running, 60, f"{replicas} running tasks of web", interval=0.5)  # type: ignore[no-any-return]


def test_hosts_reach_each_other_and_etcd_over_the_underlay_only(cluster: Cluster) -> None:
    hosts = [cluster.client, *cluster.nodes.values()]
    for host in hosts:
        for other in [cluster.etcd_host, *hosts]:
            assert _pings(cluster, host.netns, other.address), f"{host.netns} → {other.address}"
    # Each node's default route goes via the underlay gateway (a controller's advertise address).
    route = cluster.in_node("node2", "ip", "route", "get", "192.0.2.1").stdout
    assert f"via {cluster.gateway} dev eth0 src {cluster.nodes['node2'].address}" in route
    # The root namespace holds no address, route or leg on the underlay.
    root = subprocess.run(["ip", "-o", "addr", "show", "to", str(cluster.subnet)],
                          capture_output=True, text=True, check=True)  # fmt: skip
    assert root.stdout == ""


def test_each_controller_registers_its_node(cluster: Cluster) -> None:
    records = cluster.node_records()
    assert sorted(records) == ["node1", "node2", "node3"]
    assert all(record["id"] for record in records.values())
    assert len({record["id"] for record in records.values()}) == 3
    for node in cluster.nodes.values():  # each controller runs in its node's namespace
        assert os.stat(f"/proc/{node.pid}/ns/net").st_ino == netns.inode(node.netns)


def test_a_service_created_through_the_cli_is_stored_assigned_and_runs(cluster: Cluster) -> None:
    tasks = _web(cluster, 3)
    assert {t["node"] for t in tasks} <= set(cluster.nodes)
    for task in tasks:
        # The task's process runs in its own namespace and answers HTTP with its name there.
        assert os.stat(f"/proc/{task['pid']}/ns/net").st_ino == netns.inode(f"mesh-t-{task['id']}")
        reply = cluster.in_task(task["id"], "curl", "-s", "--max-time", "5", "http://127.0.0.1/")
        assert reply.stdout.strip() == task["name"]
    # Every node's CLI reads the same store.
    assert [t["id"] for t in cluster.ps("web", node="node3")] == [t["id"] for t in tasks]


def test_failure_switches(cluster: Cluster) -> None:
    node3 = cluster.nodes["node3"].address
    cluster.cut("node3")
    assert not _pings(cluster, cluster.nodes["node1"].netns, node3)
    assert not _pings(cluster, cluster.nodes["node3"].netns, cluster.etcd_host.address)
    cluster.heal("node3")
    wait_for(lambda: _pings(cluster, cluster.nodes["node1"].netns, node3), 10, "node3 back")

    pid = cluster.nodes["node2"].pid
    assert pid is not None
    cluster.kill_controller("node2")
    assert _start_time(pid) is None and cluster.nodes["node2"].pid is None
    cluster.start_controller("node2")
    assert cluster.nodes["node2"].pid not in (None, pid)

    before = cluster.node_records()
    cluster.stop_etcd()
    with pytest.raises(Unavailable):
        cluster.node_records()
    cluster.start_etcd()
    assert cluster.node_records().keys() == before.keys()  # the same data

    cluster.cli("network", "create", "back")
    cluster.compact()
    with pytest.raises(Compacted):
        cluster.call_store(lambda store: store.watch(1, timeout=1))


def _everything(cluster: Cluster) -> tuple[list[str], dict[int, str | None], list[str]]:
    """What a running cluster with web's 3 tasks holds: namespaces (its own, the tasks' and the
    LB namespaces), processes (etcd, controllers, tasks) by start time, and directories."""
    tasks = _web(cluster, 3)
    node_ids = [r["id"] for r in cluster.node_records().values()]
    namespaces = [*cluster.made, *(f"mesh-t-{t['id']}" for t in tasks)]
    namespaces += [ns for i in node_ids for ns in netns.list_namespaces(f"mesh-lb-{i[:8]}-")]
    assert len(namespaces) == 6 + 3 + 3  # one LB namespace per node
    pids = [cluster.etcd_pid, *(n.pid for n in cluster.nodes.values()), *(t["pid"] for t in tasks)]
    processes = {pid: _start_time(pid) for pid in pids if pid is not None}
    assert None not in processes.values() and len(processes) == 1 + 3 + 3
    dirs = [cluster.base_dir, *(n.state_dir for n in cluster.nodes.values())]
    assert all(os.path.isdir(d) for d in dirs)
    return namespaces, processes, dirs


def _assert_gone(namespaces: list[str], processes: dict[int, str | None], dirs: list[str]) -> None:
    assert [ns for ns in namespaces if netns.exists(ns)] == []
    assert [pid for pid, start in processes.items() if _start_time(pid) == start] == []
    assert [d for d in dirs if os.path.exists(d)] == []


def test_close_removes_everything_and_twice_is_harmless() -> None:
    with Cluster(nodes=3) as cluster:
        made = _everything(cluster)
    _assert_gone(*made)
    cluster.close()


def test_close_finds_the_controllers_namespaces_by_their_links_without_etcd() -> None:
    with Cluster(nodes=3) as cluster:
        made = _everything(cluster)
        cluster.stop_etcd()  # no task ids from the store: the legs on the nodes name them
    _assert_gone(*made)


def test_close_after_a_controller_failed_to_start_removes_everything() -> None:
    cluster = Cluster(nodes=2, controller_args=["--no-such-option"])
    with pytest.raises(RuntimeError, match=r"the controller of node[12] exited"):
        cluster.start()
    assert netns.list_namespaces(cluster.prefix) == []
    assert cluster.etcd.process is not None and cluster.etcd.process.poll() is not None
    assert not os.path.exists(cluster.base_dir)
    cluster.close()


def test_start_refuses_a_namespace_name_it_did_not_make_and_keeps_it() -> None:
    prefix = f"{TEST_NETNS_PREFIX}taken-"
    subprocess.run(["ip", "netns", "add", f"{prefix}node2"], check=True)
    try:
        with pytest.raises(RuntimeError, match=f"ip netns add {prefix}node2"):
            Cluster(nodes=3, prefix=prefix).start()
        assert netns.list_namespaces(prefix) == [f"{prefix}node2"]
    finally:
        netns.delete(f"{prefix}node2")
