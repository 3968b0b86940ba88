"""The cluster acceptance on three VMs of Debian 12's stock kernel, balancing with IPVS.

Runs inside the first VM (node1; this VM's root namespace is that node) of the multi-VM lane,
tests/vm/cluster/run, never on the host: pytest collects this file only when given its path.
Every VM was provisioned by vagrant/provision.sh as a Vagrant box is (node1 also runs etcd),
its controller on `--lb-backend auto`. The tests run in order on one cluster and one 6-replica
service published on port 8000, with a client task on node1; the last powers a VM off.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kernel import netns
from meshctl.cli import output
from meshctl.cluster import nodes
from meshctl.commands.read import get_network, get_service, list_tasks
from meshctl.naming import lb_netns, task_netns
from meshctl.store import Store, open_store
from tests.cluster.workloads import HTTP
from tests.conftest import scaled
from tests.kernel.mesh import invoke_cli, wait_for

pytestmark = pytest.mark.root

PORT = 8000
# NAME=ADDRESS of every VM, this one first (tests/vm/cluster/boot's list, through node).
VMS = dict(pair.split("=", 1) for pair in os.environ.get("MESHCTL_VM_CLUSTER_VMS", "").split())
HERE = next(iter(VMS), "")


@pytest.fixture(scope="module")
def store() -> Iterator[Store]:
    """The cluster's etcd, as the CLI finds it ($MESHCTL_STORE, set for login shells)."""
    if not VMS:
        pytest.fail("no $MESHCTL_VM_CLUSTER_VMS: these run in the VMs of tests/vm/cluster/run")
    opened = open_store(os.environ["MESHCTL_STORE"])
    yield opened
    opened.close()


@pytest.fixture(scope="module")
def web(store: Store) -> None:
    """Network `front` (overlay, the default on etcd), `web` (6 HTTP servers answering with
    their task name, port 8000 published) and `client` (one idle task on this node)."""
    meshctl("network", "create", "front")
    meshctl("service", "create", "--name", "web", "--replicas", "6", "--network", "front",
            "--publish", f"{PORT}:80", "-d", "--", *HTTP)  # fmt: skip
    meshctl("service", "create", "--name", "client", "--network", "front",
            "--constraint", f"node.name=={HERE}", "-d", "--", "sleep", "infinity")  # fmt: skip


def meshctl(*args: str) -> str:
    """The CLI as a user runs it on this VM, on the store of its login shell: in this process
    (click's runner), as tests/kernel/mesh.py runs it, since a Python start costs many seconds
    under TCG."""
    done = invoke_cli(list(args), dict(os.environ))
    if done.returncode != 0:
        raise AssertionError(f"meshctl {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


# Polls read the store in this process, as `node ls` and `service ps --format json` would print
# it: a CLI process takes seconds to start in a VM without KVM.
def node_list(store: Store) -> dict[str, dict[str, Any]]:
    return {v.node.name: output.node_json(v) for v in nodes.node_views(store)}


def live(store: Store, service: str) -> list[dict[str, Any]]:
    """The tasks of service that should run and do."""
    statuses = nodes.statuses(store)
    tasks = list_tasks(store, get_service(store, service))
    return [
        output.task_json(t, statuses)
        for t in tasks
        if t.desired_state == "running" and t.state == "running"
    ]


def wait_live(store: Store, service: str, count: int, timeout: float) -> list[dict[str, Any]]:
    def probe() -> list[dict[str, Any]] | None:
        tasks = live(store, service)
        return tasks if len(tasks) == count else None

    found: list[dict[str, Any]] = wait_for(probe, timeout, f"{count} running tasks of {service}",
                                           interval=1)  # fmt: skip
    return found


def http_get(address: str, port: int = 80, task_id: str | None = None) -> str | None:
    """GET / from this VM or from inside a task's network namespace (in this process: a curl
    per request costs seconds under TCG); the answer (a task name), None on no answer."""

    def get() -> str:
        conn = http.client.HTTPConnection(address, port, timeout=scaled(1))
        try:
            conn.request("GET", "/")
            return conn.getresponse().read().decode().strip()
        finally:
            conn.close()

    try:
        return netns.run_in(task_netns(task_id) if task_id else None, get)
    except (OSError, http.client.HTTPException):
        return None


def answered_by_all(
    address: str, port: int, names: set[str], task_id: str | None = None
) -> Counter[str | None]:
    """Ask until every name has answered (the load balancer may still be catching up), then
    once per name more: every request of that round must be answered by one of names."""
    seen: Counter[str | None] = Counter()

    def every_name() -> bool:
        seen[http_get(address, port, task_id)] += 1
        return names <= set(seen)

    wait_for(every_name, 12, f"answers from all of {sorted(names)} at {address}:{port}",
             interval=0.2)  # fmt: skip
    round_ = Counter(http_get(address, port, task_id) for _ in names)
    assert set(round_) <= names, round_
    return seen


def dig(task_id: str, name: str) -> list[str]:
    """The addresses the embedded DNS answers inside the task (127.0.0.11, redirected)."""
    got = subprocess.run(["nsenter", f"--net={netns.path(task_netns(task_id))}", "--", "dig",
                          "+short", f"+time={round(scaled(1))}", "+tries=1", "@127.0.0.11",
                          name], capture_output=True, text=True, timeout=scaled(3))  # fmt: skip
    return sorted(w for w in got.stdout.split() if re.fullmatch(r"[0-9.]+", w))


def ipvs_destinations(table: str) -> list[set[str]]:
    """The destination addresses of each virtual service in `ipvsadm -Ln` output."""
    services: list[set[str]] = []
    for line in table.splitlines():
        if re.match(r"(TCP|UDP|SCTP|FWM) ", line):
            services.append(set())
        elif found := re.match(r"\s+->\s+([0-9.]+):\d+\s", line):  # fwmark services: port 0
            services[-1].add(found[1])
    return services


def client_task(store: Store) -> dict[str, Any]:
    (client,) = wait_live(store, "client", 1, 30)
    assert client["node"] == HERE
    return client


def vip(store: Store, service: str) -> str:
    """The service's VIP on `front` (a published port adds one on `ingress`)."""
    (address,) = [a.vip for a in get_service(store, service).networks if a.network == "front"]
    assert address is not None
    return address


def test_three_vms_are_ready_nodes_balancing_with_ipvs(store: Store) -> None:
    def all_ready() -> bool:
        return {n: v["state"] for n, v in node_list(store).items()} == dict.fromkeys(VMS, "ready")

    # The other VMs may still be provisioning.
    wait_for(all_ready, 48, "every VM's node ready", interval=2)
    table = meshctl("node", "ls")
    print(table)
    shown = {v["name"]: v for v in json.loads(meshctl("node", "ls", "--format", "json"))}
    assert {n: (v["state"], v["address"], v["lb_backend"]) for n, v in shown.items()} == {
        n: ("ready", address, "ipvs") for n, address in VMS.items()
    }
    assert sum(v["leader"] for v in shown.values()) == 1
    for n, address in VMS.items():
        assert re.search(rf"^{n} +\w+ +{re.escape(address)} +ready +active", table, re.M), table


def test_six_replicas_spread_two_per_vm(store: Store, web: None) -> None:
    tasks = wait_live(store, "web", 6, 48)
    assert Counter(t["node"] for t in tasks) == dict.fromkeys(VMS, 2)


def test_a_vip_from_vm1_reaches_tasks_on_all_three_vms_through_ipvs(
    store: Store, web: None
) -> None:
    client = client_task(store)
    tasks = live(store, "web")
    answered_by_all(vip(store, "web"), 80, {t["name"] for t in tasks}, client["id"])
    # IPVS did it: one virtual service of this node's load balancer of `front` has exactly the
    # six tasks as destinations (`client`, also on `front`, has a virtual service of its own).
    node_id = node_list(store)[HERE]["id"]
    network_id = get_network(store, "front").id
    lb = lb_netns(node_id, network_id)
    table = subprocess.run(["ip", "netns", "exec", lb, "ipvsadm", "-Ln"], capture_output=True,
                           text=True, check=True).stdout  # fmt: skip
    assert {t["addresses"]["front"] for t in tasks} in ipvs_destinations(table), table


def test_dns_on_vm1_answers_for_tasks_on_the_other_vms(store: Store, web: None) -> None:
    client = client_task(store)
    tasks = live(store, "web")
    everyone = sorted(t["addresses"]["front"] for t in tasks)
    wait_for(lambda: dig(client["id"], "tasks.web") == everyone, 6, "tasks.web: all 6")
    assert dig(client["id"], "web") == [vip(store, "web")]
    remote = [t for t in tasks if t["node"] != HERE]
    assert len(remote) == 4
    for task in remote:
        assert dig(client["id"], task["name"]) == [task["addresses"]["front"]], task["node"]


def test_the_published_port_answers_on_every_vm(store: Store, web: None) -> None:
    names = {t["name"] for t in live(store, "web")}
    for address in VMS.values():
        answered_by_all(address, PORT, names)


def test_a_vm_powered_off_has_its_tasks_run_on_the_other_two(store: Store, web: None) -> None:
    victim = list(VMS)[-1]
    old = [t for t in live(store, "web") if t["node"] == victim]
    assert len(old) == 2
    # The lane (tests/vm/cluster/boot) kills the VM's QEMU when this file appears.
    request = Path(os.environ["MESHCTL_VM_CLUSTER_RESULTS"]) / f"power-off-{victim}"
    with open(request, "w") as f:
        os.fsync(f.fileno())
    off = time.monotonic()
    wait_for(lambda: node_list(store)[victim]["state"] == "down", 12, f"{victim} down", 1)
    down = time.monotonic() - off

    def moved() -> list[dict[str, Any]] | None:
        tasks = live(store, "web")
        return tasks if len(tasks) == 6 and all(t["node"] != victim for t in tasks) else None

    tasks: list[dict[str, Any]] = wait_for(moved, 30, f"{victim}'s tasks running elsewhere", 1)
    print(f"{victim} down {down:.0f}s and its tasks running elsewhere "
          f"{time.monotonic() - off:.0f}s after its power went")  # fmt: skip
    assert Counter(t["node"] for t in tasks) == {n: 3 for n in VMS if n != victim}
    answered_by_all(vip(store, "web"), 80, {t["name"] for t in tasks}, client_task(store)["id"])
