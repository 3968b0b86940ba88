"""Overlay (#16): HTTP through a VIP to tasks on another node against the same task reached
directly over the overlay, and how fast one task's endpoint change reaches every node's kernel
with S services.

A netns cluster (tests/cluster/harness.py: 3 nodes, each with a controller, etcd in its own
namespace), overlay networks (VXLAN between the nodes' namespaces over the underlay bridge).
Re-runs itself in a private mount namespace whose /run/netns is its own (bench/failover.py), so
no other controller on the host sees its namespaces. Needs root, etcd-server, nginx-light, wrk
and curl; everything it makes is removed in `finally` (also on Ctrl-C and SIGTERM).

(1) Data path, network `data`: service `one` (1 nginx task, bench/datapath.py's config) and
    `three` (3 of them), both constrained to node2, and a client task on node1. wrk runs in the
    client's namespace against one's task by its overlay address (node1's bridge, VXLAN, node2's
    bridge), one's VIP (the same, through node1's LB namespace: DNAT and SNAT, and back across
    node1's bridge) and three's VIP; every round runs each path back to back, in alternating
    order; the ratio VIP / direct is taken per round, the median reported.

(2) Endpoint change propagation, network `mesh` (a /16): S services of R tasks; every node takes
    part in the network and holds all S VIPs and their endpoints in its LB namespace. Each change
    takes one task's endpoint out and back, each time of another service. One thread per node
    reads its LB namespace's ruleset with the node's backend's own list tool (the `lb_backend` of
    `meshctl node inspect`: `iptables-legacy-save -t nat`, or `nft -j list chain ip meshctl` of
    the task's endpoint chain), readings spaced by SPACING times their duration, until the
    task's address is no DNAT target any more, then until it is one again.
    --tasks real: R sleeper tasks, at most one a node; a change SIGKILLs one's process (on node1,
    node2, node3 in turn, each task once: a second kill would meet the restart back-off) and its
    node restarts it after --restart-delay. A store watcher stamps the task's records. Times: kill
    → its node writes it down → the last node's kernel without it; the restart's write (running,
    new pid) → the last node's kernel with it.
    --tasks simulated: the tasks are placed on a 4th node, `sim`, registered by the bench (its
    record and a status under a long lease, at an underlay address nobody holds), which writes
    their records as that node's controller would: running once placed, failed (exit 137, no
    pid) for a change, running again. Each real node runs one task on the network. Times run
    from the bench's store writes. For S=1,000: 3,000 real tasks are more than 2 cores hold.
    S grows in one cluster (100, then 900 more services).

    /opt/meshvenv/bin/python bench/overlay.py [--tasks real|simulated] [--services 100,1000]
        [--parts data,propagation] [--rounds 5 --seconds 10] [--changes 20]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from meshctl.cluster.membership import Membership
from meshctl.commands.service import create_service
from meshctl.lb.nftables import endpoint_chain
from meshctl.lb.spec import Backend, VirtualIp
from meshctl.model import (
    TASK,
    NetworkAttachment,
    Node,
    RestartPolicy,
    Service,
    Task,
    from_record,
)
from meshctl.naming import lb_netns, task_netns
from meshctl.store import Put, Store, StoreError

# The harness, the other benches' helpers and isolation are reused as they are; they live
# outside the installed packages, importable from the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.control_plane import machine  # noqa: E402
from bench.datapath import BODY, NGINX_CONF, Run, wait_serving, wrk  # noqa: E402
from bench.failover import isolate  # noqa: E402
from bench.node_loss import StoreWatch  # noqa: E402
from tests.cluster.harness import Cluster, run_in_netns  # noqa: E402
from tests.cluster.workloads import wait_live  # noqa: E402
from tests.kernel.mesh import wait_for  # noqa: E402

PREFIX = f"mbench{os.getpid()}-"
NODES = ("node1", "node2", "node3")
SLEEPER = ("sleep", "infinity")
MESH_SUBNET = "10.128.0.0/16"  # room for 1,000 VIPs and a few thousand tasks
SIM = "sim"  # the simulated node of --tasks simulated
SIM_HOST = 200  # its underlay address: .200 of the harness's subnet, which no namespace holds
SIM_TTL = 7 * 24 * 3600.0  # its lease: outlasts the bench, so nothing need renew it
DIRECT, VIA_VIP, VIA_VIP3 = "direct to the task", "VIP of one", "VIP of three"
CREATE_ATTEMPTS = 10  # of one service: each is ops' 20 compare-and-swaps
SPACING = 3  # a namespace's readings are at least 3 times their duration apart
DNAT_IPTABLES = re.compile(r"--to-destination (\d+\.\d+\.\d+\.\d+)")


def loadavg() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def shown(cluster: Cluster, kind: str, name: str) -> dict[str, Any]:
    """`meshctl KIND inspect NAME --format json`."""
    found: dict[str, Any] = json.loads(
        cluster.cli(kind, "inspect", name, "--format", "json").stdout
    )
    return found


def vip(cluster: Cluster, service: str, network: str) -> str:
    attached = shown(cluster, "service", service)["networks"]
    return next(str(a["vip"]) for a in attached if a["network"] == network)


# -- (1) the data path -----------------------------------------------------------------------


def data_path(cluster: Cluster, args: argparse.Namespace, tmp: Path) -> tuple[list[Run], str]:
    """wrk from a client task on node1 to nginx tasks on node2, directly and through VIPs;
    the runs and the load average around them."""
    cluster.cli("network", "create", "data")
    for name, replicas in (("one", 1), ("three", 3)):
        root = tmp / name
        root.mkdir()
        (root / "index.html").write_bytes(BODY)
        conf = root / "nginx.conf"
        conf.write_text(NGINX_CONF.format(dir=root, address="0.0.0.0"))
        cluster.cli("service", "create", "--name", name, "--replicas", str(replicas),
                    "--network", "data", "--constraint", "node.name==node2", "-d",
                    "--", "nginx", "-c", str(conf), "-e", "stderr")  # fmt: skip
    cluster.cli("service", "create", "--name", "client", "--network", "data",
                "--constraint", "node.name==node1", "-d", "--", *SLEEPER)  # fmt: skip
    (task,) = wait_live(cluster, "one", 1, timeout=60)
    wait_live(cluster, "three", 3, timeout=60)
    (client,) = wait_live(cluster, "client", 1, timeout=60)
    client_ns = task_netns(client["id"])
    targets = {
        DIRECT: task["addresses"]["data"],
        VIA_VIP: vip(cluster, "one", "data"),
        VIA_VIP3: vip(cluster, "three", "data"),
    }
    for address in targets.values():
        wait_serving(client_ns, address)
    runs: list[Run] = []
    before = loadavg()
    for r in range(args.rounds):
        order = list(targets.items())
        for label, address in order if r % 2 == 0 else reversed(order):
            runs.append(wrk(client_ns, address, args, label))
            print(f"data path round {r + 1}/{args.rounds}: {label} "
                  f"{runs[-1].rps:,.0f} req/s", flush=True)  # fmt: skip
    load = f"{before} before, {loadavg()} after"
    for name in ("one", "three", "client"):
        cluster.cli("service", "rm", name)
    return runs, load


# -- (2) endpoint change propagation -----------------------------------------------------------


def _iptables_targets(ns: str) -> frozenset[str]:
    listing = run_in_netns(ns, "iptables-legacy-save", "-t", "nat")
    if listing.returncode:
        raise RuntimeError(f"iptables-legacy-save in {ns}: {listing.stderr.strip()}")
    return frozenset(DNAT_IPTABLES.findall(listing.stdout))


def _nftables_targets(ns: str) -> frozenset[str]:
    listing = run_in_netns(ns, "nft", "-j", "list", "table", "ip", "meshctl")
    if listing.returncode:
        raise RuntimeError(f"nft list table in {ns}: {listing.stderr.strip()}")
    return _dnat_addresses(listing.stdout)


def _nftables_chain_targets(ns: str, chain: str) -> frozenset[str]:
    """The DNAT targets of one endpoint chain; none when the chain is not there (the nftables
    backend adds and deletes an endpoint's chain in the transaction that adds it to or takes it
    from its service's spread)."""
    listing = run_in_netns(ns, "nft", "-j", "list", "chain", "ip", "meshctl", chain)
    if listing.returncode:
        if "No such file or directory" in listing.stderr:
            return frozenset()
        raise RuntimeError(f"nft list chain {chain} in {ns}: {listing.stderr.strip()}")
    return _dnat_addresses(listing.stdout)


def _dnat_addresses(listing: str) -> frozenset[str]:
    return frozenset(
        str(expr["dnat"]["addr"])
        for item in json.loads(listing)["nftables"]
        if "rule" in item
        for expr in item["rule"]["expr"]
        if "dnat" in expr
    )


# The addresses an LB namespace's ruleset DNATs to, read with each backend's own tool: every
# backend keeps a DNAT rule for an active endpoint only (none for a draining one).
Reading = Callable[[str], frozenset[str]]
DNAT_TARGETS: dict[str, Reading] = {
    "iptables": _iptables_targets,
    "nftables": _nftables_targets,
}


@dataclass(frozen=True)
class Kernels:
    """Every node's LB namespace of the mesh network and how to read it."""

    backend: str
    namespaces: dict[str, str]  # node → its LB namespace
    gap: float  # the least seconds between two readings of one namespace, following a change

    def endpoint_reading(self, cluster: Cluster, task: dict[str, Any]) -> Reading:
        """How to read whether a task of the mesh network is a DNAT target in a namespace: with
        nftables, its own endpoint chain (at S=1,000 a listing of the whole table took ~600 ms
        and every node was read every 2.4 s: that, not the controllers, bounded the figure);
        with iptables, the nat table (iptables-legacy-save cannot list less)."""
        if self.backend != "nftables":
            return DNAT_TARGETS[self.backend]
        backend = Backend(task["addresses"]["mesh"])
        service = VirtualIp(
            task["service_id"], task["service"], vip(cluster, task["service"], "mesh")
        )
        chain = endpoint_chain(service, backend)
        return lambda ns: _nftables_chain_targets(ns, chain)

    def targets(self) -> dict[str, frozenset[str]]:
        with ThreadPoolExecutor(len(self.namespaces)) as pool:
            found = pool.map(DNAT_TARGETS[self.backend], self.namespaces.values())
            return dict(zip(self.namespaces, found, strict=True))

    def first(
        self,
        read: Reading,
        address: str,
        present: bool,
        since: float,
        timeout: float,
        give_up: Callable[[], bool] = lambda: False,
    ) -> tuple[dict[str, float | None], float]:
        """Per node, the start time of the first reading (`read`) at or after since in which
        address is (present) or is not a DNAT target, None if give_up() came first; and the
        median seconds from one reading's start to the next's (the resolution).

        Between two readings of a namespace the thread waits the gap or SPACING times what the
        reading took, whichever is longer: the readings take at most 1 / (SPACING + 1) of a
        core per node, not all the cores the controllers share with them (a large ruleset's
        listing costs ~30 ms of CPU, more under load)."""
        took: list[float] = []

        def follow(ns: str) -> float | None:
            while True:
                start = time.monotonic()
                if start > since + timeout:
                    raise TimeoutError(f"{address} {'in' if present else 'out of'} {ns}")
                stop = give_up()
                seen = address in read(ns)
                if seen == present:
                    return start
                if stop:
                    return None
                reading = time.monotonic() - start
                time.sleep(max(self.gap, SPACING * reading))
                took.append(time.monotonic() - start)

        with ThreadPoolExecutor(len(self.namespaces)) as pool:
            seen = pool.map(follow, self.namespaces.values())
            found = dict(zip(self.namespaces, seen, strict=True))
            return found, statistics.median(took) if took else float("nan")


def mesh_kernels(cluster: Cluster, gap: float) -> Kernels:
    network = shown(cluster, "network", "mesh")["id"]
    nodes = {n: shown(cluster, "node", n) for n in NODES}
    backends = {node["lb_backend"] for node in nodes.values()}
    if len(backends) != 1 or not backends <= set(DNAT_TARGETS):
        sys.exit(f"the nodes record the LB backends {sorted(backends)}: this bench reads one of "
                 f"{', '.join(DNAT_TARGETS)}")  # fmt: skip
    namespaces = {name: lb_netns(node["id"], network) for name, node in nodes.items()}
    return Kernels(backends.pop(), namespaces, gap)


def kernels_ready(cluster: Cluster, gap: float) -> Kernels | None:
    """The mesh network's LB namespaces once every node has made its own."""
    kernels = mesh_kernels(cluster, gap)
    try:
        kernels.targets()
    except (RuntimeError, OSError):
        return None
    return kernels


def add_services(cluster: Cluster, first: int, last: int, args: argparse.Namespace) -> int:
    """Services svc<first>..svc<last - 1> of sleepers on the mesh network, straight through ops
    (a CLI process each would cost more than the service): real ones at most one task a node,
    simulated ones all on the simulated node. Returns how often a create gave up because the
    store kept changing (it is tried again a second later, as a user would)."""
    real = args.tasks == "real"
    gave_up = 0

    def create(store: Store) -> None:
        nonlocal gave_up
        for i in range(first, last):
            spec = Service(
                f"svc{i:04d}", SLEEPER, replicas=args.replicas,
                networks=(NetworkAttachment("mesh"),), stop_grace_period=1.0,
                restart=RestartPolicy(delay=args.restart_delay),
                constraints=() if real else (f"node.name=={SIM}",),
                max_replicas_per_node=1 if real else 0,
            )  # fmt: skip
            for attempt in range(CREATE_ATTEMPTS):
                try:
                    create_service(store, spec)
                    break
                except StoreError:
                    if attempt == CREATE_ATTEMPTS - 1:
                        raise
                    gave_up += 1
                    time.sleep(1.0)

    cluster.call_store(create)
    return gave_up


def mesh_tasks(cluster: Cluster) -> list[dict[str, Any]]:
    records = cluster.call_store(lambda store: store.list(TASK))
    return [r.value for r in records if r.value["service"].startswith("svc")]


def settle(
    cluster: Cluster, kernels: Kernels, count: int, start: float, args: argparse.Namespace
) -> tuple[float, float]:
    """Wait until count tasks run (the simulated node's started by the bench as they come)
    and every node's kernel balances over all of them; seconds from start (when the services
    were added) until each."""

    def running() -> list[dict[str, Any]] | None:
        if args.tasks == "simulated":
            cluster.call_store(start_simulated)
        tasks = [t for t in mesh_tasks(cluster) if t["state"] == t["desired_state"] == "running"]
        return tasks if len(tasks) == count else None

    tasks = wait_for(running, args.settle_timeout, f"{count} sleeper tasks running", 1.0)
    ran = time.monotonic() - start
    addresses = {t["addresses"]["mesh"] for t in tasks}
    wait_for(lambda: all(addresses <= seen for seen in kernels.targets().values()),
             args.settle_timeout, f"every node's LB balancing over all {count} tasks",
             1.0)  # fmt: skip
    return ran, time.monotonic() - start


# The simulated node: the bench writes its tasks' records as its controller would.


def join_simulated(cluster: Cluster) -> None:
    """The node `sim`: a record and a live status (a lease that outlasts the bench), at an
    underlay address nobody holds (the overlay's entries for its tasks lead nowhere)."""
    address = str(cluster.subnet[SIM_HOST])
    cluster.call_store(lambda store: Membership(store, Node(SIM, address), ttl=SIM_TTL).join())
    cluster.cli("service", "create", "--name", "anchor", "--replicas", str(len(NODES)),
                "--network", "mesh", "--replicas-max-per-node", "1", "--constraint",
                f"node.name!={SIM}", "-d", "--", *SLEEPER)  # fmt: skip


def start_simulated(store: Store) -> None:
    """Every task placed on the simulated node and not yet running: running, as its controller
    writes a started task (compare-and-swap on the record, a txn of up to 100)."""
    now = time.time()
    puts = [
        Put(TASK, r.name, task.with_event(now, "running", "started").to_dict(), r.mod_revision)
        for r in store.list(TASK)
        if (task := from_record(Task, r)).node == SIM
        and task.desired_state == "running"
        and task.state != "running"
    ]
    for i in range(0, len(puts), 100):
        store.txn(puts[i : i + 100])


def write_simulated(store: Store, task_id: str, running: bool) -> float:
    """The simulated node's write of its task's process killed (failed, exit 137, no pid) or
    started again; returns time.monotonic() just before the write."""
    record = store.get(TASK, task_id)
    assert record is not None, f"task {task_id} is gone"
    task = from_record(Task, record)
    now = time.time()
    if running:
        task = replace(task, restarts=task.restarts + 1).with_event(now, "running", "started")
    else:
        killed = replace(task, exit_code=137, error="exit code 137", pid=None)
        task = killed.with_event(now, "failed", "exit code 137")
    written = time.monotonic()
    store.put(TASK, task_id, task.to_dict(), expect=record.mod_revision)
    return written


# -- changes --


@dataclass(frozen=True)
class Change:
    """Seconds of one task's endpoint going and coming back, in the store and every node's
    kernel, timed from the store write."""

    victim: str  # the node that ran the task
    killed: float | None  # the kill → its node's write (None: simulated, the write is all)
    out: dict[str, float | None]  # the write → each node's kernel without it (None: not
    # before the restart was written; the node kept it as a backend all along)
    back: dict[str, float]  # the restart's write → each node's kernel with it
    poll: float  # median seconds from a reading of a ruleset to the next (the resolution)

    @property
    def last_out(self) -> float | None:
        """The write → the last node's kernel without it; None if a node never dropped it."""
        times = list(self.out.values())
        return None if None in times else max(t for t in times if t is not None)

    @property
    def last_back(self) -> float:
        return max(self.back.values())


def stamp(watch: StoreWatch, since: float, task_id: str, test: Callable[[dict[str, Any]], bool]
          ) -> float | None:  # fmt: skip
    """When the watcher first got a record of the task since `since` that passes test."""
    return next(
        (s.at for s in watch.since(since)
         if s.event.kind == TASK and s.event.name == task_id and s.event.value is not None
         and test(s.event.value)),
        None,
    )  # fmt: skip


def kill(
    cluster: Cluster, kernels: Kernels, watch: StoreWatch, task: dict[str, Any], timeout: float
) -> Change:
    """SIGKILL a real task's process; follow it out of every node's kernel and back in."""
    address, pid = task["addresses"]["mesh"], task["pid"]
    read = kernels.endpoint_reading(cluster, task)
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)

    def restarted() -> float | None:
        new = lambda t: t["state"] == "running" and t["pid"] not in (None, pid)  # noqa: E731
        return stamp(watch, killed, task["id"], new)

    out, poll = kernels.first(read, address, False, killed, timeout,
                              lambda: restarted() is not None)  # fmt: skip
    down = wait_for(lambda: stamp(watch, killed, task["id"], lambda t: t["pid"] != pid),
                    timeout, f"{task['name']}'s kill in the store", 0.05)  # fmt: skip
    up = wait_for(restarted, timeout, f"{task['name']} restarted", 0.05)
    back, _ = kernels.first(read, address, True, up, timeout)
    return Change(
        task["node"], down - killed, {n: None if t is None else t - down for n, t in out.items()},
        {n: t - up for n, t in back.items() if t is not None}, poll,
    )  # fmt: skip


def flip(cluster: Cluster, kernels: Kernels, task: dict[str, Any], timeout: float) -> Change:
    """Write a simulated task failed, follow it out of every node's kernel, write it running
    again and follow it back in."""
    address = task["addresses"]["mesh"]
    read = kernels.endpoint_reading(cluster, task)
    down = cluster.call_store(lambda store: write_simulated(store, task["id"], False))
    out, poll = kernels.first(read, address, False, down, timeout)
    up = cluster.call_store(lambda store: write_simulated(store, task["id"], True))
    back, _ = kernels.first(read, address, True, up, timeout)
    return Change(
        SIM, None, {n: None if t is None else t - down for n, t in out.items()},
        {n: t - up for n, t in back.items() if t is not None}, poll,
    )  # fmt: skip


def victims(cluster: Cluster, changes: int, simulated: bool) -> list[dict[str, Any]]:
    """changes running tasks, each of another service (spread over all of them), on node1,
    node2, node3 in turn (simulated: slot 1, 2, 3... in turn)."""
    running = [t for t in mesh_tasks(cluster) if t["state"] == "running"]
    services = sorted({t["service"] for t in running})
    slots = sorted({t["slot"] for t in running})
    step = max(1, len(services) // changes)
    picked = []
    for i in range(changes):
        service = services[(i * step) % len(services)]
        if simulated:
            slot = slots[i % len(slots)]
            found = (t for t in running if t["service"] == service and t["slot"] == slot)
        else:
            node = NODES[i % len(NODES)]
            found = (t for t in running if t["service"] == service and t["node"] == node)
        picked.append(next(found))
    return picked


@dataclass(frozen=True)
class Scale:
    services: int
    tasks: int
    ran: float  # services added → all their tasks running
    programmed: float  # → every node's kernel balancing over every task
    rules: int  # DNAT targets in one LB namespace
    load: str
    changes: list[Change]


def propagation(cluster: Cluster, args: argparse.Namespace) -> tuple[list[Scale], str, str]:
    """Changes at every S; the scales, the LB backend and the leader."""
    cluster.cli("network", "create", "mesh", "--subnet", MESH_SUBNET)
    if args.tasks == "simulated":
        join_simulated(cluster)
    scales: list[Scale] = []
    made = 0
    kernels: Kernels | None = None
    for count in args.services:
        added = time.monotonic()
        gave_up = add_services(cluster, made, count, args)
        made = count
        tasks = count * args.replicas
        if kernels is None:
            kernels = wait_for(lambda: kernels_ready(cluster, args.poll_ms / 1000),
                               args.settle_timeout, "every node's LB namespace of mesh",
                               1.0)  # fmt: skip
        assert kernels is not None
        ran, programmed = settle(cluster, kernels, tasks, added, args)
        print(f"S={count}: {tasks} tasks running after {ran:.1f} s, in every node's "
              f"{kernels.backend} ruleset after {programmed:.1f} s; a service create gave up "
              f"{gave_up} times (the store kept changing)", flush=True)  # fmt: skip
        rules = len(next(iter(kernels.targets().values())))
        before = loadavg()
        results: list[Change] = []
        with StoreWatch(cluster) as watch:
            for i, task in enumerate(victims(cluster, args.changes, args.tasks == "simulated")):
                if args.tasks == "real":
                    results.append(kill(cluster, kernels, watch, task, args.change_timeout))
                else:
                    results.append(flip(cluster, kernels, task, args.change_timeout))
                print(f"S={count} change {i + 1}/{args.changes}: {change_text(results[-1])}",
                      flush=True)  # fmt: skip
        load = f"{before} before, {loadavg()} after"
        scales.append(Scale(count, tasks, ran, programmed, rules, load, results))
    leader = next(n for n in NODES if shown(cluster, "node", n)["leader"])
    return scales, kernels.backend if kernels else "", leader


def change_text(c: Change) -> str:
    out = ", ".join(f"{n} {'kept it' if t is None else f'{t * 1000:.0f} ms'}"
                    for n, t in c.out.items())  # fmt: skip
    killed = "" if c.killed is None else f"kill → written {c.killed * 1000:.0f} ms; "
    back = ", ".join(f"{n} {t * 1000:.0f} ms" for n, t in c.back.items())
    return f"{killed}written → out of {out}; restart written → back in {back}"


# -- the report ------------------------------------------------------------------------------


def p99(values: list[float]) -> float:
    """Nearest rank: of 20 values, the largest."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


def ms(values: list[float]) -> str:
    if not values:
        return "—"
    return f"{statistics.median(values) * 1000:,.0f} / {p99(values) * 1000:,.0f}"


def report_data(runs: list[Run], load: str, args: argparse.Namespace) -> None:
    print(f"\nData path over the overlay: HTTP GET of {len(BODY)} bytes from nginx (1 worker a "
          f"task) on node2, keep-alive, wrk -t2 -c{args.connections} -d{args.seconds}s in a "
          f"client task on node1; load average {load}.\n")  # fmt: skip
    print("| path | requests/s, median (min–max) | p50 latency (ms) | p99 latency (ms) "
          "| errors |")  # fmt: skip
    print("|---|---:|---:|---:|---:|")
    for label in (DIRECT, VIA_VIP, VIA_VIP3):
        rows = [r for r in runs if r.label == label]
        rps = [r.rps for r in rows]
        print(f"| {label} | {statistics.median(rps):,.0f} ({min(rps):,.0f}–{max(rps):,.0f}) "
              f"| {statistics.median(r.p50_ms for r in rows):.2f} "
              f"| {statistics.median(r.p99_ms for r in rows):.2f} "
              f"| {sum(r.errors for r in rows)} |")  # fmt: skip
    pairs = zip((r for r in runs if r.label == VIA_VIP), (r for r in runs if r.label == DIRECT),
                strict=True)  # fmt: skip
    ratios = [a.rps / b.rps for a, b in pairs]
    print(f"\n{VIA_VIP} / {DIRECT}, requests/s per round: "
          f"{', '.join(f'{r:.2f}' for r in ratios)}; median {statistics.median(ratios):.2f} "
          "(goal ≥ 0.9)")  # fmt: skip


def report_propagation(
    scales: list[Scale], backend: str, leader: str, args: argparse.Namespace
) -> None:
    real = args.tasks == "real"
    what = (
        f"{args.replicas} sleeper tasks (one a node), each change a task's process SIGKILLed"
        if real
        else f"{args.replicas} tasks on a simulated 4th node whose records the bench writes, "
        "each change one written failed (as its controller would after a kill)"
    )
    print(f"\nEndpoint change propagation: S services x {what}, on one overlay network; LB "
          f"backend {backend}, --resync-period {args.resync_period}; each node's LB namespace "
          "(nftables: the task's endpoint chain) "
          f"read every {args.poll_ms:g} ms or {SPACING} times a reading's duration + the "
          "reading (the resolution below). p50 / p99 in ms, p99 by nearest rank "
          f"(of {args.changes}: the largest).\n")  # fmt: skip
    print("| S | tasks | changes | kill → store write | store write → last kernel without it "
          "| kill → last kernel without it | kept by a node until the restart "
          "| restart written → last kernel with it | resolution (ms) | load average |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for s in scales:
        c = s.changes
        done = [x for x in c if x.last_out is not None]
        out = [x.last_out for x in done if x.last_out is not None]
        killed = [x.killed for x in c if x.killed is not None]
        from_kill = [x.killed + x.last_out for x in done if x.killed is not None
                     and x.last_out is not None]  # fmt: skip
        polls = [x.poll * 1000 for x in c if not math.isnan(x.poll)]
        poll = f"{statistics.median(polls):.0f}" if polls else "—"
        print(f"| {s.services:,} | {s.tasks:,} | {len(c)} | {ms(killed)} | {ms(out)} "
              f"| {ms(from_kill)} | {len(c) - len(done)} | {ms([x.last_back for x in c])} "
              f"| {poll} | {s.load} |")  # fmt: skip
    print(f"\n| S | tasks running after (s) | in every node's ruleset after (s) "
          f"| DNAT targets a ruleset | write → out of each node's kernel p50, "
          f"{' / '.join(NODES)} (ms) | restart written → back in each p50 (ms) "
          "| the victim's own node: out p50 (ms) |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for s in scales:
        own = [t for x in s.changes if (t := x.out.get(x.victim)) is not None]
        own_p50 = f"{statistics.median(own) * 1000:,.0f}" if own else "—"
        print(f"| {s.services:,} | {s.ran:.1f} | {s.programmed:.1f} | {s.rules:,} "
              f"| {per_node([x.out for x in s.changes])} "
              f"| {per_node([x.back for x in s.changes])} | {own_p50} |")  # fmt: skip
    print(f"\nThe leader (it also places tasks in its passes): {leader}.")


def per_node(times: list[Mapping[str, float | None]]) -> str:
    """The p50 of each node's times (ms), the ones it has."""
    cells = []
    for node in NODES:
        mine = [t for each in times if (t := each.get(node)) is not None]
        cells.append(f"{statistics.median(mine) * 1000:,.0f}" if mine else "—")
    return " / ".join(cells)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="data,propagation", help="which of the two to run")
    parser.add_argument("--seconds", type=int, default=10, help="per wrk run")
    parser.add_argument("--rounds", type=int, default=5, help="data path rounds")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--services", default="100,1000", help="comma-separated S, growing")
    parser.add_argument("--replicas", type=int, default=3, help="tasks a service, ≤ 3")
    parser.add_argument("--tasks", choices=("real", "simulated"), default="real",
                        help="the services' tasks: sleepers on the nodes, or records of a "
                        "simulated node")  # fmt: skip
    parser.add_argument("--changes", type=int, default=20, help="endpoint changes at each S")
    parser.add_argument(
        "--restart-delay",
        type=float,
        default=7.0,
        help="the services' (s): longer than a kill takes to leave every node",
    )
    parser.add_argument("--resync-period", default="10s", help="the controllers' (its default)")
    parser.add_argument(
        "--poll-ms",
        type=float,
        default=20.0,
        help="between two readings of one LB namespace's ruleset",
    )
    parser.add_argument("--change-timeout", type=float, default=300.0, help="seconds")
    parser.add_argument("--settle-timeout", type=float, default=3600.0, help="seconds")
    args = parser.parse_args()
    args.parts = set(args.parts.split(","))
    args.services = [int(s) for s in args.services.split(",")]
    if args.parts - {"data", "propagation"} or args.services != sorted(args.services):
        parser.error("--parts takes data and propagation; --services must grow")
    isolate()
    # SIGTERM unwinds like Ctrl-C, so the finally blocks remove the cluster.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix=PREFIX) as tmp,
        Cluster(
            len(NODES), prefix=PREFIX, controller_args=("--resync-period", args.resync_period)
        ) as cluster,
    ):
        commit = subprocess.run(
            ["git", "-C", str(Path(__file__).resolve().parents[1]), "log", "-1", "--oneline"],
            capture_output=True, text=True, check=False,
        ).stdout.strip()  # fmt: skip
        print(f"commit {commit}; {machine()}", flush=True)
        data = data_path(cluster, args, Path(tmp)) if "data" in args.parts else None
        scales, backend, leader = (
            propagation(cluster, args) if "propagation" in args.parts else ([], "", "")
        )
    if data:
        report_data(*data, args)
    if scales:
        report_propagation(scales, backend, leader, args)
    print(f"\nThe bench took {time.monotonic() - started:.0f} s.")


if __name__ == "__main__":
    main()
