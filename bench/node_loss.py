"""Node loss: how fast a dead node's tasks run elsewhere, timed from its lease's expiry.

A netns cluster (tests/cluster/harness.py: 3 nodes, each with a controller started with
--resync-period 2s and --node-ttl TTL, etcd in its own namespace) and a service of 6 tasks on a
bridge network, 2 per node. Each round kills one node's controller (SIGKILL; a node that does
not lead, or the leader with --victim leader) and cuts its leg, then reads the times off a
watcher of the store (a thread in the client namespace following one etcd watch, each event
stamped as it arrives):

(a) the kill → the node's status key deleted: its lease ran out. The controller renews it every
    TTL/3, so it runs out 2/3 TTL to TTL after the kill, plus etcd's expiry check (every 500 ms);
(b) the deletion → every lost task has a replacement assigned to another node: the leader wakes
    on the deletion, makes a new task per slot, then places them (the creation is shown apart);
(c) the deletion → every replacement running (its node wired and started it).

Between rounds the node is healed and its controller restarted, the service removed (and its
tasks forgotten), then a new one made and spread 2 per node, after a TTL of quiet: a leader that
started less than a TTL ago gives a down node that long to come back. One cluster per --ttl.
Re-runs itself in a private mount namespace whose /run/netns is its own (bench/failover.py), so
no other controller on the host sees its namespaces. Needs root and etcd-server; everything it
makes is removed in `finally` (also on Ctrl-C and SIGTERM).

    /opt/meshvenv/bin/python bench/node_loss.py [--ttl 10,3] [--rounds 5] [--victim other]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from kernel import netns
from meshctl.cluster.nodes import leader
from meshctl.model import NODE_STATUS, TASK
from meshctl.store import Event
from meshctl.store.etcd import EtcdStore, parse_etcd_url

# The harness and the failover bench's isolation are reused as they are; they live outside the
# installed packages, importable from the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.control_plane import machine  # noqa: E402
from bench.failover import isolate  # noqa: E402
from tests.cluster.harness import Cluster  # noqa: E402
from tests.kernel.mesh import wait_for  # noqa: E402

PREFIX = f"mbench{os.getpid()}-"
NODES = 3
RESYNC = 2.0  # the harness's --resync-period: the longest a controller goes without a pass
TASK_CMD = ["sleep", "infinity"]


@dataclass(frozen=True)
class Seen:
    at: float  # time.monotonic() when the watcher got it
    event: Event


class StoreWatch:
    """Every node-status and task event of the cluster's store as it arrives: a thread in the
    client namespace (the root namespace has no route to etcd) following one etcd watch."""

    def __init__(self, cluster: Cluster) -> None:
        self.url = cluster.store_url
        self.ns = cluster.client.netns
        self.seen: list[Seen] = []
        self.error: BaseException | None = None
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=netns.run_in, args=(self.ns, self._follow))

    def _follow(self) -> None:
        try:
            with EtcdStore(*parse_etcd_url(self.url)) as store:
                revision = store.revision()
                self._ready.set()
                while not self._stop.is_set():
                    events = store.watch(revision, timeout=0.2)
                    now = time.monotonic()
                    if events:
                        revision = events[-1].revision
                        wanted = (e for e in events if e.kind in (NODE_STATUS, TASK))
                        self.seen.extend(Seen(now, e) for e in wanted)
        except BaseException as err:  # handed to the bench's thread by since()
            self.error = err
            self._ready.set()

    def since(self, start: float) -> list[Seen]:
        if self.error is not None:
            raise RuntimeError("the store watcher failed") from self.error
        return [s for s in list(self.seen) if s.at >= start]

    def __enter__(self) -> StoreWatch:
        self._thread.start()
        if not self._ready.wait(10) or self.error is not None:
            raise RuntimeError(f"the store watcher did not start: {self.error}")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


@dataclass(frozen=True)
class Round:
    """Seconds of one node loss."""

    victim: str
    tasks: int  # tasks the node ran
    expired: float  # kill → its status deleted
    created: float  # deletion → the last replacement made (unassigned)
    assigned: float  # deletion → the last replacement assigned to a live node
    running: float  # deletion → the last replacement running

    def text(self) -> str:
        return (
            f"{self.victim} ({self.tasks} tasks): expired {self.expired:.2f} s after the kill; "
            f"then created {self.created * 1000:.0f} ms, assigned {self.assigned * 1000:.0f} ms, "
            f"running {self.running * 1000:.0f} ms"
        )


def timeline(
    seen: list[Seen], killed: float, service: str, victim: str, lost: dict[int, str]
) -> Round | None:
    """The round's times from the events after the kill, once every lost slot's replacement
    runs; None before that. lost: slot → the id of the task the victim ran."""
    expiry = next(
        (s.at for s in seen if s.event.kind == NODE_STATUS and s.event.type == "delete"
         and s.event.name == victim),
        None,
    )  # fmt: skip
    created: dict[int, float] = {}
    assigned: dict[int, float] = {}
    running: dict[int, float] = {}
    for s in seen:
        task = s.event.value
        if s.event.kind != TASK or task is None or task["service"] != service:
            continue
        slot = task["slot"]
        if slot not in lost or task["id"] == lost[slot] or task["desired_state"] != "running":
            continue
        created.setdefault(slot, s.at)
        if task["node"] not in ("", victim):
            assigned.setdefault(slot, s.at)
            if task["state"] == "running":
                running.setdefault(slot, s.at)
    if expiry is None or len(running) < len(lost):
        return None
    return Round(
        victim,
        len(lost),
        expiry - killed,
        max(created.values()) - expiry,
        max(assigned.values()) - expiry,
        max(running.values()) - expiry,
    )


# -- the cluster -----------------------------------------------------------------------------


def spread_service(cluster: Cluster, name: str, replicas: int) -> None:
    """A service of replicas tasks on the network front, all running, as many on every node."""
    options = ["--network", "front", "--stop-grace-period", "1s", "-d"]
    cluster.cli("service", "create", "--name", name, "--replicas", str(replicas), *options,
                "--", *TASK_CMD)  # fmt: skip

    def spread() -> bool:
        tasks = cluster.ps(name)
        running = [t for t in tasks if t["state"] == t["desired_state"] == "running"]
        per_node = Counter(t["node"] for t in running)
        return len(running) == replicas and set(per_node.values()) == {replicas // NODES}

    wait_for(spread, 60, f"{replicas} tasks of {name} running, {replicas // NODES} per node", 0.5)


def pick_victim(cluster: Cluster, which: str, round_index: int) -> str:
    """The leader, or one of the others in turn."""
    leading = cluster.call_store(leader)
    if which == "leader":
        assert leading is not None, "no node leads"
        return leading
    others = sorted(n for n in cluster.nodes if n != leading)
    return others[round_index % len(others)]


def lose_node(cluster: Cluster, watch: StoreWatch, service: str, victim: str, ttl: float) -> Round:
    """Kill victim's controller, cut its leg, and wait until its tasks run elsewhere."""
    lost = {
        t["slot"]: t["id"]
        for t in cluster.ps(service)
        if t["node"] == victim and t["desired_state"] == "running"
    }
    killed = time.monotonic()
    cluster.kill_controller(victim)
    cluster.cut(victim)
    done = wait_for(
        lambda: timeline(watch.since(killed), killed, service, victim, lost),
        ttl + 60, f"{victim}'s tasks running elsewhere", 0.05,
    )  # fmt: skip
    assert isinstance(done, Round)
    return done


def bring_back(cluster: Cluster, service: str, victim: str, ttl: float) -> None:
    """Heal and restart the victim, remove the service and wait until its tasks are forgotten
    (the victim's old copies by its restarted controller), then a TTL of quiet."""
    cluster.heal(victim)
    cluster.start_controller(victim)
    cluster.wait_registered()
    cluster.cli("service", "rm", service)

    def forgotten() -> bool:
        tasks = cluster.call_store(lambda store: store.list(TASK))
        return not any(r.value["service"] == service for r in tasks)

    wait_for(forgotten, 60, f"every task of {service} forgotten", 0.5)
    time.sleep(ttl)


def measure(ttl: float, rounds: int, replicas: int, which: str) -> list[Round]:
    """Rounds of node loss on a cluster of its own whose leases last ttl seconds."""
    results: list[Round] = []
    prefix = f"{PREFIX}{ttl:g}-".replace(".", "_")
    with Cluster(NODES, prefix=prefix, controller_args=("--node-ttl", f"{ttl:g}s")) as cluster:
        cluster.cli("network", "create", "front")
        with StoreWatch(cluster) as watch:
            for r in range(rounds):
                service = f"web{r}"
                spread_service(cluster, service, replicas)
                victim = pick_victim(cluster, which, r)
                results.append(lose_node(cluster, watch, service, victim, ttl))
                print(f"TTL {ttl:g} s, round {r + 1}/{rounds}: {results[-1].text()}", flush=True)
                bring_back(cluster, service, victim, ttl)
    return results


# -- the report ------------------------------------------------------------------------------


def report(runs: dict[float, list[Round]], which: str) -> None:
    commit = subprocess.run(
        ["git", "-C", str(Path(__file__).resolve().parents[1]), "log", "-1", "--oneline"],
        capture_output=True, text=True, check=False,
    ).stdout.strip()  # fmt: skip
    victim = "the leader" if which == "leader" else "a node that does not lead"
    print(f"\nNode loss on a {NODES}-node netns cluster, victim {victim}; commit {commit};")
    print(f"{machine()}, shared with anything else running.\n")
    print("| TTL (s) | rounds | tasks lost | kill → lease expiry p50 / max (s) | expected (s) "
          "| expiry → replacements made p50 / max (ms) | → assigned p50 / max (ms) "
          "| → running p50 / max (ms) | kill → running p50 (s) |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for ttl, rows in runs.items():
        expired = [r.expired for r in rows]
        cells = []
        for key in ("created", "assigned", "running"):
            values = [getattr(r, key) * 1000 for r in rows]
            cells.append(f"{statistics.median(values):.0f} / {max(values):.0f}")
        total = statistics.median(r.expired + r.running for r in rows)
        expected = f"{ttl * 2 / 3:.1f}–{ttl + 0.5:.1f}"
        print(f"| {ttl:g} | {len(rows)} | {rows[0].tasks} "
              f"| {statistics.median(expired):.2f} / {max(expired):.2f} "
              f"| {expected} | {' | '.join(cells)} | {total:.2f} |")  # fmt: skip
    print(f"\nThe leader's pass interval without a wake-up: {RESYNC:g} s (--resync-period).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ttl", default="10,3", help="comma-separated --node-ttl values (s)")
    parser.add_argument("--rounds", type=int, default=5, help="node losses per TTL")
    parser.add_argument("--replicas", type=int, default=6, help=f"tasks, a multiple of {NODES}")
    parser.add_argument("--victim", choices=("other", "leader"), default="other")
    args = parser.parse_args()
    if args.replicas % NODES:
        parser.error(f"--replicas must be a multiple of {NODES}, to spread evenly")
    isolate()
    # SIGTERM unwinds like Ctrl-C, so the finally blocks remove the clusters.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    runs = {}
    for ttl in (float(t) for t in args.ttl.split(",")):
        runs[ttl] = measure(ttl, args.rounds, args.replicas, args.victim)
    report(runs, args.victim)


if __name__ == "__main__":
    main()
