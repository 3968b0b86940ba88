"""The fault campaign of #27, shared by bench/faults.py and tests/cluster/test_faults.py: the
world it runs in (a service of 6 tasks published on every node and routed by Host, a client
task per node), the faults (each made and healed), the checks after a heal, and the runner that
judges the traffic of each step (tests/cluster/traffic.py).

The rule the campaign holds the cluster to: a request fails only if it went to a task that died,
within the detection time; never because a healthy task left a load balancer, a node lost
etcd, a rolling update or a scale ran, or the leader failed over.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import statistics
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kernel import netns
from kernel.system import real_kernel
from meshctl.cluster.nodes import leader
from meshctl.ipam import ADDRESS
from meshctl.model import LEADER, NETWORK, NODE, NODE_STATUS, ROUTER, SERVICE, TASK
from meshctl.naming import lb_netns, router_netns, task_netns
from meshctl.store import Event, StoreError
from meshctl.store.etcd import EtcdStore
from tests.cluster.harness import Cluster
from tests.cluster.traffic import Death, Excluded, Judged, Result, Traffic, judge
from tests.cluster.workloads import web
from tests.conftest import kill_processes_in, scaled
from tests.kernel.mesh import wait_for

SERVICE_NAME = "web"
REPLICAS = 6
PORT = 8080  # published on every node; the router has 80
HOST = "web.test"  # the router's route to the service
GAP = 1.0  # seconds a killed controller stays away (its successor takes over within the lease)
TASK_DETECTION = 3.0  # seconds from a task's death until no node sends to it
CONVERGE_TIMEOUT = 90.0
SETTLE = 1.0  # seconds of traffic after convergence that still count for the step


@dataclass
class World:
    """The cluster under the campaign and what runs on it."""

    cluster: Cluster
    ttl: float  # the nodes' lease (--node-ttl)
    sick: str  # a task whose name is a file in this directory fails its health check
    traffic: Traffic | None = None
    vip: str = ""
    rounds: int = 0  # rolling updates made (each sets ROUND=<n>)

    @property
    def leader(self) -> str:
        led = self.cluster.call_store(leader)
        assert led is not None, "no node leads"
        return led


def build(cluster: Cluster, ttl: float, sick: str, interval: float, timeout: float) -> World:
    """The service, the clients and the router, every loop running and every check passing."""
    world = World(cluster, ttl, sick)
    cluster.cli("router", "enable")
    # Healthy once it answers HTTP (a task joins the VIP only then), until told to be sick.
    check = f"test ! -e {sick}/$HOSTNAME && curl -sf -o /dev/null -m 1 http://127.0.0.1/"
    health = ("--health-cmd", check, "--health-interval", "1s", "--health-timeout", "2s",
              "--health-retries", "2")  # fmt: skip
    web(cluster, REPLICAS, "--publish", f"{PORT}:80", "--hostname", HOST, "--restart-delay",
        "0s", "--stop-grace-period", "2s", *health)  # fmt: skip
    cluster.cli("service", "create", "--name", "client", "--replicas", str(len(cluster.nodes)),
                "--network", "front", "--replicas-max-per-node", "1", "-d", "--",
                "sleep", "infinity")  # fmt: skip
    wait_for(lambda: _serving_count(world) == REPLICAS, 90, "web serving")
    inspect = cluster.cli("service", "inspect", SERVICE_NAME, "--format", "json").stdout
    world.vip = _vip(json.loads(inspect))
    converged_in, held_by = wait_converged(world)
    assert converged_in is not None, f"the world never converged: {held_by}"
    world.traffic = Traffic(cluster, world.vip, PORT, HOST, interval, timeout)
    world.traffic.follow()
    return world


# -- what the store says --------------------------------------------------------------------


def _tasks(world: World) -> list[dict[str, Any]]:
    """Every task record; none while the store does not answer (a loaded host, a fault): the
    waits that poll this go on polling."""
    try:
        return [r.value for r in world.cluster.call_store(lambda store: store.list(TASK))]
    except StoreError:
        return []


def _name(task: dict[str, Any]) -> str:
    """A task's name (its hostname, what it answers with): `web.3`."""
    return f"{task['service']}.{task['slot']}"


def _live(world: World) -> list[dict[str, Any]]:
    """The service's tasks that should run and do, by name."""
    tasks = [t for t in _tasks(world) if t["service"] == SERVICE_NAME]
    return sorted((t for t in tasks if t["desired_state"] == t["state"] == "running"),
                  key=lambda t: (t["slot"], t["id"]))  # fmt: skip


def _serving(task: dict[str, Any]) -> bool:
    """meshctl.lb.endpoints.serving, on a stored record."""
    return task["desired_state"] == task["state"] == "running" and task.get("health", "none") in (
        "none",
        "healthy",
    )


def _serving_count(world: World) -> int:
    return sum(_serving(t) for t in _tasks(world) if t["service"] == SERVICE_NAME)


# -- checks after a heal --------------------------------------------------------------------


def problems(world: World, with_diff: bool = True) -> list[str]:
    """Every way the cluster differs from converged, on every node (empty: converged)."""
    cluster = world.cluster
    kinds = (TASK, SERVICE, NETWORK, ADDRESS, NODE, ROUTER)
    try:
        records = cluster.call_store(lambda store: {k: store.list(k) for k in kinds})
    except StoreError as err:
        return [f"the store does not answer: {err}"]
    tasks = [r.value for r in records[TASK]]
    services = {r.value["name"]: r.value for r in records[SERVICE]}
    found = _slot_problems(tasks, services)
    network = next(r.value for r in records[NETWORK] if r.value["name"] == "front")
    node_ids = {r.name: str(r.value["id"]) for r in records[NODE] if r.name in cluster.nodes}
    # The nftables table is read (the native backend here); other backends: diff alone.
    read_lb = {r.name for r in records[NODE] if r.value.get("lb_backend") == "nftables"}
    serving = {
        name: {t["addresses"]["front"] for t in tasks if t["service"] == name and _serving(t)}
        for name in services
    }
    vips = {_vip(s): name for name, s in services.items() if _vip(s)}
    clients = {t["node"]: t for t in tasks if t["service"] == "client" and _serving(t)}
    for node in cluster.nodes:
        lb = lb_netns(node_ids[node], network["id"])
        endpoints = nft_endpoints(lb) if node in read_lb else {}
        for vip, name in vips.items() if node in read_lb else ():
            if endpoints.get(vip, set()) != serving[name]:
                found.append(f"{node}: LB of {name} {sorted(endpoints.get(vip, set()))}, "
                             f"serving {sorted(serving[name])}")  # fmt: skip
        if node in clients:
            answer = dns_answer(clients[node]["pid"], f"tasks.{SERVICE_NAME}")
            if answer != serving[SERVICE_NAME]:
                found.append(f"{node}: tasks.{SERVICE_NAME} answers {sorted(answer)}, "
                             f"serving {sorted(serving[SERVICE_NAME])}")  # fmt: skip
        else:
            found.append(f"{node}: no client task serving")
        found += _leaks(world, node, node_ids[node], tasks)
    found += _claim_problems(records, services, tasks, set(node_ids))
    if with_diff and not found:
        for node in cluster.nodes:
            diff = cluster.diff(node)
            if diff.returncode != 0:
                found.append(f"{node}: meshctl diff: {(diff.stdout + diff.stderr).strip()[:300]}")
    return found


def _vip(service: dict[str, Any]) -> str:
    """The service's VIP on the network front, if it has one."""
    return next((str(a["vip"]) for a in service["networks"] if a["network"] == "front"
                 and a.get("vip")), "")  # fmt: skip


def _slot_problems(tasks: list[dict[str, Any]], services: dict[str, Any]) -> list[str]:
    """Every slot of every service runs exactly once (as a running process, whatever its
    desired state) and serves."""
    found = []
    for name, service in services.items():
        running = Counter(t["slot"] for t in tasks if t["service"] == name
                          and t["state"] == "running")  # fmt: skip
        serving = Counter(t["slot"] for t in tasks if t["service"] == name and _serving(t))
        want = Counter(range(1, int(service["replicas"]) + 1))
        if running != want or serving != want:
            found.append(f"{name}: slots running {dict(running)}, serving {dict(serving)}")
    return found


def _leaks(world: World, node: str, node_id: str, tasks: list[dict[str, Any]]) -> list[str]:
    """meshctl namespaces hanging off node that no running task of it, nor its LB or router,
    accounts for; and running tasks of it without their namespace."""
    linked = world.cluster.linked_namespaces(node)
    own = {task_netns(t["id"]) for t in tasks if t["node"] == node and t["state"] == "running"}
    lbs = {n for n in linked if n.startswith(lb_netns(node_id, ""))}
    extra = linked - own - lbs - {router_netns(node_id)}
    missing = own - linked
    return [f"{node}: namespace {n} leaked" for n in sorted(extra)] + [
        f"{node}: task namespace {n} missing" for n in sorted(missing)
    ]


def _claim_problems(
    records: dict[str, Any], services: dict[str, Any], tasks: list[dict[str, Any]], nodes: set[str]
) -> list[str]:
    """Every address claim's owner exists (a service's or the router's VIP, a task, a node's
    LB or router)."""
    vips = {s["id"] for s in services.values()} | {r.value["id"] for r in records[ROUTER]}
    ids = {"task": {t["id"] for t in tasks}, "vip": vips, "lb": nodes, "router": nodes}
    found = []
    for record in records[ADDRESS]:
        kind, _, owner = str(record.value.get("owner", "")).partition(":")
        if kind in ids and owner not in ids[kind]:
            found.append(f"claim {record.name} of {kind}:{owner} leaked")
    return found


_DNAT = re.compile(r"dnat to (\d+\.\d+\.\d+\.\d+)")
_GOTO = re.compile(r"goto ([\w-]+)")


def nft_endpoints(ns: str) -> dict[str, set[str]]:
    """What the nftables backend's table in the LB namespace ns balances: VIP → the
    addresses of its active endpoints (meshctl.lb.nftables's layout)."""
    if not netns.exists(ns):
        return {}
    table = real_kernel().nftables.list_table(ns)
    services = table.sets.get("services")
    found: dict[str, set[str]] = {}
    for vip, verdict in services.elements.items() if services else ():
        chains = _GOTO.findall(verdict)
        endpoints = [
            c
            for chain in chains
            if chain in table.chains
            for rule in table.chains[chain].rules
            for c in _GOTO.findall(rule)
        ]
        found[vip] = {
            address
            for chain in endpoints
            if chain in table.chains
            for rule in table.chains[chain].rules
            for address in _DNAT.findall(rule)
        }
    return found


def dns_answer(pid: int, name: str) -> set[str]:
    """The A records a task (its pid) gets for name from its resolver (127.0.0.11)."""
    dig = ["nsenter", "-t", str(pid), "--net", "--mount", "--",
           "dig", "+short", "+time=2", "+tries=1", name]  # fmt: skip
    out = subprocess.run(dig, capture_output=True, text=True, timeout=10).stdout
    return {line for line in out.split() if re.fullmatch(r"\d+\.\d+\.\d+\.\d+", line)}


def wait_converged(
    world: World, timeout: float = CONVERGE_TIMEOUT
) -> tuple[float | None, list[str]]:
    """Seconds until every check passes (None if not within timeout), and the problems of the
    last check that failed: what held convergence up last."""
    began = time.monotonic()
    held: list[str] = []
    while time.monotonic() - began < scaled(timeout):
        found = problems(world)
        if not found:
            return time.monotonic() - began, held
        held = found
        time.sleep(0.5)
    return None, held


def status_deletes(cluster: Cluster, since: int) -> list[str]:
    """Every delete of a node's status (or of the leader key) in the store's history after
    since: the leader takes such a node for down and reschedules its tasks at once."""

    def history(store: EtcdStore) -> list[Event]:
        events: list[Event] = []
        revision, last = since, store.revision()
        while revision < last:
            batch = store.watch(revision, timeout=5)
            events += batch
            revision = batch[-1].revision if batch else last
        return events

    return [
        f"{e.kind} {e.name} deleted at revision {e.revision}"
        for e in cluster.call_store(history)
        if e.type == "delete" and e.kind in (NODE_STATUS, LEADER)
    ]


# -- the faults: each made and healed -------------------------------------------------------


@dataclass
class Effects:
    """What a fault did that the judge must know: tasks it killed, loops it stood on."""

    what: str = ""
    deaths: list[Death] = field(default_factory=list)
    # loops that stand on something the fault took away (label, from when), until converged
    excluded: list[tuple[str, float]] = field(default_factory=list)
    down: str = ""  # the node the fault takes down (its status deleted), if it does


Fault = Callable[[World, random.Random], Effects]


def taken_over(cluster: Cluster, node: str) -> bool:
    """Whether node's status in the store is its new controller's (not its predecessor's,
    which stays until its lease runs out); raises RuntimeError if the controller exited."""
    cluster.wait_registered()
    try:
        status = cluster.node_statuses().get(node)
    except StoreError:
        return False
    return status is not None and status["pid"] == cluster.nodes[node].pid


def restart(cluster: Cluster, node: str, attempts: int = 5) -> None:
    """Start node's controller until it registers, again 2 s after it exits, as systemd's unit
    (systemd/, Restart=on-failure, RestartSec=2) does: a controller that finds the store out
    of reach at start (a loaded host, a fault not yet healed) exits."""
    for attempt in range(attempts):
        cluster.start_controller(node)
        try:
            cluster.wait_registered()
            wait_for(lambda: taken_over(cluster, node), 30, f"{node}'s new controller", 0.1)
            return
        except RuntimeError:
            if attempt == attempts - 1:
                raise
            cluster.stop_controller(node)
            time.sleep(2)


def crash(world: World, node: str, what: str = "") -> Effects:
    """SIGKILL node's controller and start it again GAP later. Its successor takes over
    within the lease; on a host so loaded that it takes longer, the node is down for good
    reason (its tasks are replaced, its client with them): said so, and expected."""
    killed = time.monotonic()
    world.cluster.kill_controller(node)
    time.sleep(scaled(GAP))
    restart(world.cluster, node)
    back = time.monotonic() - killed
    # The lease is renewed every third of it: at the kill, 2/3 of it is left at least.
    if back < world.ttl * 2 / 3:
        return Effects(f"{what}{node}")
    return Effects(f"{what}{node}, back after {back:.1f} s, past what was left of its lease",
                   excluded=[(f"vip@{node}", time.monotonic())], down=node)  # fmt: skip


def controller_kill(world: World, rng: random.Random) -> Effects:
    return crash(world, rng.choice(sorted(world.cluster.nodes)))


def node_loss(world: World, rng: random.Random) -> Effects:
    """Every process of the node killed (its tasks', LB's and router's too), its leg cut; back
    once the others run its tasks."""
    cluster = world.cluster
    node = rng.choice(sorted(cluster.nodes))
    mine = [t for t in _live(world) if t["node"] == node]
    linked = cluster.linked_namespaces(node)
    at = time.monotonic()
    cluster.kill_controller(node)
    for ns in (cluster.nodes[node].netns, *linked):
        kill_processes_in(netns.path(ns))
    cluster.cut(node)
    # Its router dies with it: the routing mesh of every node balances over the routers.
    lost = [_name(t) for t in mine] + [f"the router of {node}"]
    deaths = [Death(name, at, at + world.ttl + scaled(TASK_DETECTION)) for name in lost]
    elsewhere = lambda: _elsewhere(world, node)  # noqa: E731
    wait_for(elsewhere, world.ttl + 60, f"{node}'s tasks running elsewhere", 0.5)
    cluster.heal(node)
    restart(cluster, node)
    excluded = [(f"{kind}@{node}", at) for kind in ("vip", "port", "router")]
    return Effects(node, deaths, excluded, down=node)


def _elsewhere(world: World, node: str) -> bool:
    """Whether every slot of the service serves on a node other than node."""
    tasks = _tasks(world)
    return sum(_serving(t) and t["node"] != node for t in tasks
               if t["service"] == SERVICE_NAME) == REPLICAS  # fmt: skip


def _cut_from_etcd(world: World, node: str) -> None:
    etcd = world.cluster.etcd_host.address
    for args in (("add", "table", "inet", "cut"),
                 ("add", "chain", "inet", "cut", "out", "{ type filter hook output priority 0; }"),
                 ("add", "rule", "inet", "cut", "out", "ip", "daddr", etcd, "tcp", "dport",
                  "2379", "drop")):  # fmt: skip
        done = world.cluster.in_node(node, "nft", *args)
        assert done.returncode == 0, done.stderr


def etcd_cut(world: World, rng: random.Random, lease_times: float) -> Effects:
    """Node cut from etcd only for lease_times × its lease (its peers still reachable); when
    longer than the lease, also until the leader has its tasks running elsewhere."""
    cluster = world.cluster
    node = rng.choice(sorted(cluster.nodes))
    _cut_from_etcd(world, node)
    try:
        time.sleep(world.ttl * lease_times)
        if lease_times > 1:
            wait_for(lambda: _elsewhere(world, node), 60, f"{node}'s tasks replaced", 0.5)
    finally:
        cluster.in_node(node, "nft", "delete", "table", "inet", "cut")
    # Down longer than its lease, the node gets its client task replaced at the heal: the loop
    # inside the old one ends with it (the cut itself is judged in full).
    replaced = [(f"vip@{node}", time.monotonic())] if lease_times > 1 else []
    down = node if lease_times > 1 else ""
    return Effects(f"{node} {world.ttl * lease_times:.0f}s", excluded=replaced, down=down)


def etcd_down(world: World, rng: random.Random) -> Effects:
    world.cluster.stop_etcd()
    try:
        time.sleep(world.ttl * 1.5)
    finally:
        world.cluster.start_etcd()
    return Effects(f"{world.ttl * 1.5:.0f}s")


def _kill_leader_when(world: World, ready: Callable[[], bool], what: str) -> Effects:
    wait_for(ready, 60, what, 0.2)
    return crash(world, world.leader, "leader ")


def leader_kill_update(world: World, rng: random.Random) -> Effects:
    """A rolling update (a new ROUND in the tasks' environment), the leader SIGKILLed once
    half the tasks are new, and restarted; done when every task is new and serving."""
    cluster = world.cluster
    old = {t["id"] for t in _live(world)}
    world.rounds += 1
    cluster.cli("service", "update", SERVICE_NAME, "--env", f"ROUND={world.rounds}", "-d")

    def new_serving() -> int:
        return sum(_serving(t) and t["id"] not in old for t in _tasks(world)
                   if t["service"] == SERVICE_NAME)  # fmt: skip

    effects = _kill_leader_when(world, lambda: new_serving() >= REPLICAS // 2, "half the update")
    wait_for(lambda: new_serving() == REPLICAS, 120, "the update done", 0.5)
    return effects


def leader_kill_scale(world: World, rng: random.Random) -> Effects:
    """Scaled up by half, the leader SIGKILLed once one new task serves, and restarted; then
    scaled back down."""
    cluster = world.cluster
    up = REPLICAS + REPLICAS // 2
    cluster.cli("service", "scale", f"{SERVICE_NAME}={up}", "-d")
    effects = _kill_leader_when(world, lambda: _serving_count(world) > REPLICAS, "the scale begun")
    wait_for(lambda: _serving_count(world) == up, 60, f"{up} serving", 0.5)
    cluster.cli("service", "scale", f"{SERVICE_NAME}={REPLICAS}", "-d")
    wait_for(lambda: len(cluster.ps(SERVICE_NAME)) == REPLICAS, 60, "scaled down", 0.5)
    return effects


def task_kill(world: World, rng: random.Random) -> Effects:
    task = rng.choice(_live(world))
    at = time.monotonic()
    os.kill(task["pid"], signal.SIGKILL)
    death = Death(_name(task), at, at + scaled(TASK_DETECTION))
    wait_for(lambda: _serving_count(world) == REPLICAS, 30, "the slot back", 0.2)
    return Effects(death.task, [death])


def task_unhealthy(world: World, rng: random.Random) -> Effects:
    """A task's health check fails until the store says unhealthy, then passes again."""
    task = rng.choice(_live(world))
    sick = os.path.join(world.sick, _name(task))
    open(sick, "w").close()
    try:
        unhealthy = lambda: any(t["id"] == task["id"] and t["health"] == "unhealthy"  # noqa: E731
                                for t in _tasks(world))  # fmt: skip
        wait_for(unhealthy, 30, f"{_name(task)} unhealthy", 0.2)
        time.sleep(scaled(2))
    finally:
        os.unlink(sick)
    wait_for(lambda: _serving_count(world) == REPLICAS, 30, "healthy again", 0.2)
    return Effects(_name(task))


FAULTS: dict[str, Fault] = {
    "controller-kill": controller_kill,  # a node's controller SIGKILLed and restarted
    "node-loss": node_loss,  # every process of a node killed, its leg cut; then back
    "etcd-cut-short": lambda w, r: etcd_cut(w, r, 0.5),  # a node cut from etcd only, < TTL
    "etcd-cut-long": lambda w, r: etcd_cut(w, r, 2.5),  # the same, > TTL
    "etcd-down": etcd_down,  # etcd stopped for 1.5 TTL
    "leader-kill-update": leader_kill_update,  # the leader SIGKILLed mid rolling update
    "leader-kill-scale": leader_kill_scale,  # the leader SIGKILLed mid scale
    "task-kill": task_kill,  # a task SIGKILLed
    "task-unhealthy": task_unhealthy,  # a task's health check fails, then passes again
}


# -- the runner -----------------------------------------------------------------------------


@dataclass
class Step:
    """One fault made, healed and judged."""

    fault: str
    what: str
    began: float  # time.monotonic() when the fault was made
    healed_in: float  # seconds from then until healed
    converged_in: float | None
    held_by: list[str]  # the last problems before convergence (or of the timeout)
    judged: Judged
    looked_down: list[str]  # statuses (and leader keys) deleted that the fault should not cost

    @property
    def broken(self) -> list[str]:
        """Every rule the step broke, one line each."""
        lines = [f"{self.fault} ({self.what}): {d}" for d in self.looked_down]
        if self.converged_in is None:
            lines = [f"{self.fault} ({self.what}): not converged: {p}" for p in self.held_by]
        groups: dict[tuple[str, str], list[float]] = {}
        for r in self.judged.unexplained:
            groups.setdefault((r.label, r.said), []).append(r.began - self.began)
        return lines + [
            f"{self.fault} ({self.what}, healed at {self.healed_in:+.1f} s): {label} failed "
            f"{len(times)} times from {min(times):+.1f} s to {max(times):+.1f} s: {said}"
            for (label, said), times in sorted(groups.items(), key=lambda g: min(g[1]))
        ]


def run_step(world: World, name: str, rng: random.Random) -> Step:
    """Make and heal fault `name`, wait until converged, and judge the traffic meanwhile."""
    assert world.traffic is not None
    revision = world.cluster.call_store(lambda store: store.revision())
    began = time.monotonic()
    effects = FAULTS[name](world, rng)
    healed = time.monotonic()
    converged_in, found = wait_converged(world)
    world.traffic.follow()
    time.sleep(SETTLE)
    end = time.monotonic()
    excluded = [Excluded(label, since, end) for label, since in effects.excluded]
    results: list[Result] = world.traffic.since(began, end)
    judged = judge(results, effects.deaths, excluded, world.traffic.timeout)
    down = f" {effects.down} " if effects.down else None
    looked_down = [d for d in status_deletes(world.cluster, revision) if down is None
                   or (down not in d and not d.startswith(LEADER))]  # fmt: skip
    return Step(name, effects.what, began, healed - began, converged_in, found, judged,
                looked_down)  # fmt: skip


def table(steps: list[Step]) -> list[str]:
    """The campaign's table in Markdown: one row per fault over all its steps."""
    lines = [
        "| fault | runs | requests | failed | of them to dead tasks | not attributable "
        "| longest failure window (s) | converged after heal p50 / max (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in FAULTS:
        mine = [s for s in steps if s.fault == name]
        if not mine:
            continue
        times = [s.converged_in for s in mine if s.converged_in is not None]
        converged = f"{statistics.median(times):.1f} / {max(times):.1f}" if times else "never"
        if len(times) < len(mine):
            converged += f" ({len(mine) - len(times)} never)"
        j = [s.judged for s in mine]
        lines.append(
            f"| {name} | {len(mine)} | {sum(x.sent for x in j)} | {sum(x.failed for x in j)} "
            f"| {sum(x.attributable for x in j)} | {sum(len(x.unexplained) for x in j)} "
            f"| {max(x.longest for x in j):.2f} | {converged} |"
        )
    return lines
