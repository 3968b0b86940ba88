"""The cluster acceptance on three VMs of Debian 12's stock kernel, balancing with IPVS.

Runs inside the first VM (node1; this VM's root namespace is that node) of the multi-VM lane,
tests/vm/cluster/run, never on the host: pytest collects this file only when given its path.
Every VM was provisioned by vagrant/provision.sh as a Vagrant box is: node1 founded the cluster
(`cluster init`: its CA and the store's member, mutual TLS with a login per node), the others
joined it with worker tokens (tests/vm/cluster/boot says why no more managers); each controller
on `--lb-backend auto`. The tests run in order on one cluster and one 6-replica service
published on port 8000, with a client task on node1; the last powers a worker's VM off.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import ssl
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kernel import netns
from meshctl.cli import output
from meshctl.cluster import nodes, pki
from meshctl.cluster.config import CLIENT_PORT, PEER_PORT, ClusterPaths
from meshctl.commands.cluster import open_cluster_store
from meshctl.commands.read import get_network, get_service, list_tasks
from meshctl.naming import lb_netns, task_netns
from meshctl.store import Store, resolve_state_dir
from meshctl.store.etcd import EtcdStore
from tests.cluster.workloads import HTTP
from tests.conftest import scaled
from tests.kernel.mesh import invoke_cli, wait_for

pytestmark = pytest.mark.root

PORT = 8000
# NAME=ADDRESS of every VM, this one first (tests/vm/cluster/boot's list, through node).
VMS = dict(pair.split("=", 1) for pair in os.environ.get("MESHCTL_VM_CLUSTER_VMS", "").split())
HERE = next(iter(VMS), "")
MANAGERS = 1  # the first VMs that are managers, each a member of the store (tests/vm/cluster/boot)


@pytest.fixture(scope="module")
def store() -> Iterator[Store]:
    """The cluster's store as the CLI on this node opens it: its state directory names the
    members, its certificate and login."""
    if not VMS:
        pytest.fail("no $MESHCTL_VM_CLUSTER_VMS: these run in the VMs of tests/vm/cluster/run")
    with open_cluster_store(resolve_state_dir(None)) as opened:
        yield opened


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

    # The other VMs may still be provisioning: they join once this one is ready.
    wait_for(all_ready, 96, "every VM's node ready", interval=2)
    table = meshctl("node", "ls")
    print(table)
    shown = {v["name"]: v for v in json.loads(meshctl("node", "ls", "--format", "json"))}
    assert {n: (v["state"], v["address"], v["lb_backend"]) for n, v in shown.items()} == {
        n: ("ready", address, "ipvs") for n, address in VMS.items()
    }
    assert sum(v["leader"] for v in shown.values()) == 1
    for n, address in VMS.items():
        assert re.search(rf"^{n} +\w+ +{re.escape(address)} +ready +active", table, re.M), table


def members(store: Store) -> list[tuple[str, int]]:
    """The client endpoints of the store's members."""
    assert isinstance(store, EtcdStore)
    return sorted(store.member_endpoints())


def test_the_managers_run_the_stores_members(store: Store) -> None:
    managers = list(VMS.values())[:MANAGERS]
    assert members(store) == sorted((address, CLIENT_PORT) for address in managers)


def health(address: str, port: int, context: ssl.SSLContext | None) -> str:
    """What an etcd port answers to GET /health, over TLS with context, else plain HTTP."""
    if context is None:
        conn: http.client.HTTPConnection = http.client.HTTPConnection(
            address, port, timeout=scaled(2)
        )
    else:
        conn = http.client.HTTPSConnection(address, port, timeout=scaled(2), context=context)
    try:
        conn.request("GET", "/health")
        reply = conn.getresponse()
        return f"{reply.status} {reply.read().decode(errors='replace').strip()}"
    finally:
        conn.close()


def refused(address: str, port: int, context: ssl.SSLContext | None) -> bool:
    """Whether the port refuses the client: the TLS handshake fails, or the connection closes,
    or (plain HTTP to a TLS port) Go's own 400 answers it."""
    try:
        answer = health(address, port, context)
    except (OSError, http.client.HTTPException):
        return True
    return context is None and answer.startswith("400 ")


def tls_context(ca: str, cert: bytes | None = None, key: bytes | None = None) -> ssl.SSLContext:
    """A client's TLS that trusts the cluster CA (so the server is the cluster's), presenting
    cert and key if given."""
    context = ssl.create_default_context(cafile=ca)
    context.check_hostname = False  # members are addressed by IP; the CA is what is checked
    if cert is not None and key is not None:
        with tempfile.TemporaryDirectory() as folder:
            cert_file, key_file = os.path.join(folder, "crt"), os.path.join(folder, "key")
            pki.write_public(cert_file, cert)
            pki.write_private(key_file, key)
            context.load_cert_chain(cert_file, key_file)
    return context


def test_an_outsider_is_refused_by_every_member_of_the_store(store: Store) -> None:
    """Plain HTTP, TLS without a client certificate and TLS with another CA's certificate: no
    answer from the client or the peer port of any member, nor a service stored through the
    old plain `etcd://` way in. This node's own certificate gets one (the probe works)."""
    paths = ClusterPaths(resolve_state_dir(None))
    with open(paths.cert, "rb") as f, open(paths.key, "rb") as g:
        own = tls_context(paths.ca_cert, f.read(), g.read())
    other_ca, other_key = pki.make_ca("an outsider's CA")
    stranger = tls_context(paths.ca_cert, *pki.make_node_cert(other_ca, other_key, node=HERE,
                           role="manager", addresses=[VMS[HERE]], days=1))  # fmt: skip
    outsiders = {"plain HTTP": None, "TLS without a certificate": tls_context(paths.ca_cert),
                 "TLS with another CA's certificate": stranger}  # fmt: skip
    for address, _ in members(store):
        assert health(address, CLIENT_PORT, own).startswith("200 "), address
        for port in (CLIENT_PORT, PEER_PORT):
            for who, context in outsiders.items():
                assert refused(address, port, context), f"{who} answered at {address}:{port}"
    plain = f"etcd://{VMS[HERE]}:{CLIENT_PORT}"
    done = invoke_cli(["--store", plain, "service", "create", "--name", "pwn", "-d", "--",
                       "sh", "-c", "id -u"], dict(os.environ))  # fmt: skip
    assert done.returncode != 0, done.stdout
    assert "pwn" not in {r.name for r in store.list("service")}


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
