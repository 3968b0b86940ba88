"""Placement: the leader's plan and writes for 1,000 pending tasks on 10 simulated nodes,
against etcd's own client writing the same keys.

Each round, in an etcd of the bench's own on a loopback port (tests/etcd.py), under a key
prefix of its own: 10 simulated nodes (each a node record and a live status under a lease, put
by `Membership.join` as a controller does; the lease outlives the round, so no keep-alive runs),
and services whose replicas add up to 1,000 pending tasks (`create_service`, untimed).
Timed, as the leader's pass runs it (cyclic GC paused): `scheduler.plan` on one view, then
`scheduler.apply`, until every task is assigned; the bench checks the spread (100 per node).
The writes are 1,000 compare-and-swap puts in txns of up to 120 (etcd's cap is 128), one HTTP
request each (EtcdStore talks to etcd's JSON gateway).

Peers, in the same round, with the same keys and values: the tasks are put back to their
pending values (untimed), and etcd's own client `etcdctl txn` writes what apply wrote, each put
compared on the key's mod_revision and each key read back on failure, as EtcdStore's txn does:
- one `etcdctl txn` process per key: the same 1,000 single-key txns, plus a process start each;
- batched: --batch keys per txn (etcd refuses more than 128 ops per txn by default), a
  handful of processes: what etcd itself takes when its client need not write one at a time;
- `etcdctl get` of each key, one process each: the process floor of the first peer (no write);
- `EtcdStore.get` of each key, one request each: the request floor of meshctl's writes.
etcd's WAL fsyncs are read from its /metrics around each.

Then a node is lost: the first node's lease is revoked (its status goes, as when the lease runs
out) and two leader rounds move its 100 tasks, timed as above: the first sends them to
shutdown, the second makes their slots' new task records and places them (records written in
batches within etcd's cap on a txn's operations). For reference, all of it on the embedded
SQLite store (a file in a temporary directory), same nodes and tasks.
Needs no root; etcd-server and etcdctl (Debian's etcd-server and etcd-client).

    .venv/bin/python bench/placement.py [--tasks 1000] [--nodes 10] [--services 10] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import requests

from kernel.gcpause import gc_paused
from meshctl.cluster import orchestrator, scheduler
from meshctl.cluster.membership import Membership
from meshctl.commands.service import create_service
from meshctl.model import TASK, Node, Service
from meshctl.store import Put, Store
from meshctl.store.etcd import EtcdStore, parse_etcd_url
from meshctl.store.sqlite import SqliteStore
from meshctl.view import read_view

# The bench reuses the tests' etcd and the control-plane bench's timing wrapper; both live
# outside the installed packages, importable from the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.control_plane import Timed, machine  # noqa: E402
from tests.etcd import EtcdServer  # noqa: E402

LEASE_TTL = 3600.0  # the simulated nodes' leases: live for the whole bench without renewal
RESET_BATCH = 100  # puts per txn when the bench puts the tasks back to pending (etcd: ≤ 128)
FSYNC = "etcd_disk_wal_fsync_duration_seconds"


@dataclass
class Figures:
    """One way of making the writes, over the rounds."""

    label: str
    tasks: int  # the tasks it places (or moves): the per-task column divides by it
    peer: bool = False  # compared with meshctl's placement in the report
    seconds: list[float] = field(default_factory=list)
    fsyncs: list[float] = field(default_factory=list)  # WAL fsyncs during the writes (etcd)
    fsync_s: list[float] = field(default_factory=list)  # seconds spent in them


@dataclass(frozen=True)
class Write:
    """One assignment as etcd holds it: the key, the mod_revision to compare, the value."""

    key: str
    expect: int
    value: str  # the JSON text, as EtcdStore encodes it


# -- the simulated cluster -------------------------------------------------------------------


def simulated_cluster(store: Store, nodes: int, services: int, tasks: int) -> list[Membership]:
    """Nodes with live statuses and services with `tasks` pending tasks; the nodes' members
    (their leases)."""
    members = [Membership(store, Node(f"node{i:02d}"), ttl=LEASE_TTL) for i in range(nodes)]
    for member in members:
        member.join()
    replicas = [tasks // services + (i < tasks % services) for i in range(services)]
    for i, count in enumerate(replicas):
        create_service(store, Service(f"svc{i:02d}", ("sleep", "infinity"), replicas=count))
    view = read_view(store)  # the leader makes the tasks (untimed): pending, to be placed
    orchestrator.apply(store, view, orchestrator.plan(view))
    return members


@dataclass
class LeaderPass:
    """Seconds of one leader's placement: plan (pure Python), apply and its store.put calls."""

    view_s: float  # reading the view: snapshot and view_of (beside the figure)
    plan_s: float
    apply_s: float
    put_s: float

    @property
    def total_s(self) -> float:
        return self.plan_s + self.apply_s


def leader_pass(store: Store) -> LeaderPass:
    """One round of the leader's pass (cyclic GC paused, as its pass runs it): the slots kept
    (task records made for empty slots), then placement, each from a view of the store."""
    spent: dict[str, float] = defaultdict(float)
    timed = cast(Store, Timed("store", store, spent))
    with gc_paused():
        start = time.perf_counter()
        view = read_view(store)
        planned = time.perf_counter()
        slots = orchestrator.plan(view)
        applied = time.perf_counter()
        made, _ = orchestrator.apply(timed, view, slots)
        read = time.perf_counter()
        if made:
            view = read_view(store)
        placing = time.perf_counter()
        decisions = scheduler.plan(view)
        plan_s = time.perf_counter() - placing + (applied - planned)
        applying = time.perf_counter()
        scheduler.apply(timed, view, decisions)
        done = time.perf_counter()
    apply_s = (read - applied) + (done - applying)
    return LeaderPass(planned - start + (placing - read), plan_s, apply_s, spent["store.put"])


def check_spread(store: Store, nodes: list[str], tasks: int) -> None:
    """Every task that should run assigned to one of nodes, as many on each (give or take 1)."""
    live = [t for t in read_view(store).tasks.values() if t.desired_state == "running"]
    per_node = Counter(t.node for t in live)
    least = tasks // len(nodes)
    if (
        len(live) != tasks
        or set(per_node) != set(nodes)
        or not (least <= min(per_node.values()) <= max(per_node.values()) <= least + 1)
    ):
        raise RuntimeError(f"{len(live)} tasks placed {dict(per_node)}, wanted {least} per node")


def lose_node(store: Store, members: list[Membership], out: tuple[Figures, Figures]) -> None:
    """The first node's lease revoked (as when it runs out); its tasks moved by two leader
    rounds, as a leader's pass makes them: its tasks sent to shutdown, then their slots
    refilled with new task records and those placed."""
    lost, rest = members[0], [m.node.name for m in members[1:]]
    tasks = len(read_view(store).tasks)
    store.revoke_lease(lost.lease)
    for figures in out:
        done = leader_pass(store)
        figures.seconds.append(done.total_s)
    check_spread(store, rest, tasks)


# -- the peer: etcdctl -----------------------------------------------------------------------


def task_key(store: EtcdStore, task_id: str) -> str:
    """The etcd key of a task record."""
    return f"{store.prefix}/{TASK}/{task_id}"


def put_back(store: EtcdStore, values: dict[str, dict[str, Any]]) -> dict[str, int]:
    """Put every task back to values[id] (untimed); each task's key and new mod_revision."""
    puts = [Put(TASK, tid, value) for tid, value in values.items()]
    for i in range(0, len(puts), RESET_BATCH):
        store.txn(puts[i : i + RESET_BATCH])
    return {task_key(store, r.name): r.mod_revision for r in store.list(TASK)}


def stored(store: EtcdStore) -> dict[str, str]:
    """Every task's key and value, as EtcdStore encodes values (what etcd holds)."""
    return {task_key(store, r.name): json.dumps(r.value, sort_keys=True) for r in store.list(TASK)}


def txn_stdin(writes: Sequence[Write]) -> str:
    """`etcdctl txn` input: compares, then puts asking for the previous value back, then the
    failure branch's reads, each list ended by an empty line: the txn EtcdStore sends (values
    quoted as Go strings, which JSON string syntax fits)."""
    compares = [f'mod("{w.key}") = "{w.expect}"' for w in writes]
    puts = [f"put --prev-kv {w.key} {json.dumps(w.value)}" for w in writes]
    reads = [f"get {w.key}" for w in writes]
    return "\n".join([*compares, "", *puts, "", *reads, "", ""])


def etcdctl(endpoint: str, *args: str, stdin: str = "") -> str:
    result = subprocess.run(
        ["etcdctl", "--endpoints", endpoint, *args],
        input=stdin, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return result.stdout


def etcdctl_gets(endpoint: str, keys: list[str]) -> None:
    """One `etcdctl get` process per key: process start, a connection and one read each."""
    for key in keys:
        etcdctl(endpoint, "get", key)


def store_gets(store: Store, task_ids: list[str]) -> None:
    """One EtcdStore.get per task: one request through etcd's JSON gateway each, no write."""
    for task_id in task_ids:
        store.get(TASK, task_id)


def etcdctl_txns(endpoint: str, batches: list[list[Write]]) -> None:
    """One `etcdctl txn` process per batch, one after the other; each must succeed."""
    for batch in batches:
        out = etcdctl(endpoint, "txn", stdin=txn_stdin(batch))
        if not out.startswith("SUCCESS"):
            raise RuntimeError(f"etcdctl txn of {len(batch)} keys failed: {out[:200]}")


def fsync_totals(endpoint: str) -> tuple[float, float]:
    """etcd's WAL fsyncs so far: how many, and seconds in them (its Prometheus metrics)."""
    found = {}
    for line in requests.get(f"http://{endpoint}/metrics", timeout=5).text.splitlines():
        name, _, value = line.partition(" ")
        if name in (f"{FSYNC}_count", f"{FSYNC}_sum"):
            found[name] = float(value)
    return found[f"{FSYNC}_count"], found[f"{FSYNC}_sum"]


def measured(figures: Figures, endpoint: str | None, run: Callable[[], None]) -> None:
    """run() timed into figures, with etcd's WAL fsyncs meanwhile if endpoint is given."""
    before = fsync_totals(endpoint) if endpoint else (0.0, 0.0)
    start = time.perf_counter()
    run()
    figures.seconds.append(time.perf_counter() - start)
    if endpoint:
        after = fsync_totals(endpoint)
        figures.fsyncs.append(after[0] - before[0])
        figures.fsync_s.append(after[1] - before[1])


# -- one round -------------------------------------------------------------------------------


class Rounds:
    """Every figure of the bench, over the rounds, in the report's order."""

    def __init__(self, args: argparse.Namespace) -> None:
        n, batch = args.tasks, args.batch
        moved = -(-n // args.nodes)  # the lost node's tasks
        self.meshctl = Figures("meshctl: plan + apply", n)
        self.plan = Figures("of which plan (Python)", n)
        self.apply = Figures(f"of which apply ({n:,} CAS txns)", n)
        self.put = Figures("of apply: in store.put", n)
        self.view = Figures("reading the view (snapshot + view_of; not in the figure)", n)
        self.per_key = Figures(f"etcdctl txn, one process per key ({n:,})", n, peer=True)
        self.batched = Figures(
            f"etcdctl txn, {batch} keys per txn ({-(-n // batch)} processes)", n, peer=True
        )
        self.floor = Figures("etcdctl get, one process per key (no write)", n, peer=True)
        self.reads = Figures("EtcdStore.get, one request per key (no write)", n, peer=True)
        self.sqlite = Figures("meshctl on SQLite: plan + apply (reference)", n, peer=True)
        self.sqlite_plan = Figures("of which plan", n)
        self.resched = Figures(f"a node lost: its {moved} tasks rescheduled (a pass)", moved)
        self.replace = Figures("and their replacements placed (the next pass)", moved)
        self.sqlite_resched = Figures("the same reschedule on SQLite", moved)
        self.sqlite_replace = Figures("and the placement on SQLite", moved)

    def all(self) -> list[Figures]:
        return list(vars(self).values())


def etcd_round(etcd: EtcdServer, prefix: str, args: argparse.Namespace, out: Rounds) -> None:
    """meshctl's placement and the etcdctl peers on one simulated cluster under prefix, then
    a node lost."""
    endpoint = etcd.endpoint
    with EtcdStore(parse_etcd_url(etcd.url())[0], prefix) as store:
        members = simulated_cluster(store, args.nodes, args.services, args.tasks)
        pending = {r.name: r.value for r in store.list(TASK)}
        before = fsync_totals(endpoint)
        done = leader_pass(store)
        after = fsync_totals(endpoint)
        out.meshctl.fsyncs.append(after[0] - before[0])
        out.meshctl.fsync_s.append(after[1] - before[1])
        for figures, seconds in ((out.meshctl, done.total_s), (out.plan, done.plan_s),
                                 (out.apply, done.apply_s), (out.put, done.put_s),
                                 (out.view, done.view_s)):  # fmt: skip
            figures.seconds.append(seconds)
        check_spread(store, [m.node.name for m in members], args.tasks)
        assigned = stored(store)  # what apply wrote: every peer writes it again

        def writes() -> list[Write]:
            return [Write(k, rev, assigned[k]) for k, rev in put_back(store, pending).items()]

        one_by_one = [[w] for w in writes()]
        measured(out.per_key, endpoint, lambda: etcdctl_txns(endpoint, one_by_one))
        if stored(store) != assigned:
            raise RuntimeError("etcdctl (one per key) did not write what apply wrote")
        ws = writes()
        batches = [ws[i : i + args.batch] for i in range(0, len(ws), args.batch)]
        measured(out.batched, endpoint, lambda: etcdctl_txns(endpoint, batches))
        if stored(store) != assigned:
            raise RuntimeError("etcdctl (batched) did not write what apply wrote")
        measured(out.floor, endpoint, lambda: etcdctl_gets(endpoint, list(assigned)))
        measured(out.reads, endpoint, lambda: store_gets(store, list(pending)))
        lose_node(store, members, (out.resched, out.replace))


def sqlite_round(path: Path, args: argparse.Namespace, out: Rounds) -> None:
    """The same placement and node loss on the embedded store, for reference."""
    with SqliteStore(str(path)) as store:
        members = simulated_cluster(store, args.nodes, args.services, args.tasks)
        done = leader_pass(store)
        out.sqlite.seconds.append(done.total_s)
        out.sqlite_plan.seconds.append(done.plan_s)
        check_spread(store, [m.node.name for m in members], args.tasks)
        lose_node(store, members, (out.sqlite_resched, out.sqlite_replace))


# -- the report ------------------------------------------------------------------------------


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}–{max(values):.3f})"


def report(out: Rounds, args: argparse.Namespace) -> None:
    commit = subprocess.run(
        ["git", "-C", str(Path(__file__).resolve().parents[1]), "log", "-1", "--oneline"],
        capture_output=True, text=True, check=False,
    ).stdout.strip()  # fmt: skip
    version = subprocess.run(["etcd", "--version"], capture_output=True, text=True, check=False)
    print(
        f"\nPlacement of {args.tasks:,} tasks ({args.services} services) on {args.nodes} "
        f"simulated nodes, {len(out.meshctl.seconds)} rounds; "
        f"{version.stdout.splitlines()[0]}; commit {commit};"
    )
    print(f"{machine()}, shared with anything else running.\n")
    print("| writes | seconds, median (min–max) | per task (ms) | WAL fsyncs | in fsync (s) "
          "| meshctl / this |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|")
    base = statistics.median(out.meshctl.seconds)
    for f in out.all():
        median = statistics.median(f.seconds)
        fsyncs = f"{statistics.median(f.fsyncs):,.0f}" if f.fsyncs else ""
        fsync_s = f"{statistics.median(f.fsync_s):.3f}" if f.fsync_s else ""
        ratio = f"{base / median:.2f}" if f.peer else ""
        print(f"| {f.label} | {spread(f.seconds)} | {median / f.tasks * 1000:.3f} "
              f"| {fsyncs} | {fsync_s} | {ratio} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument(
        "--services", type=int, default=10, help="the tasks' services (etcd: ≤ 127 tasks each)"
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=128, help="keys per batched etcdctl txn")
    args = parser.parse_args()
    out = Rounds(args)
    with EtcdServer() as etcd, tempfile.TemporaryDirectory(prefix="meshctl-placement-") as tmp:
        for r in range(args.rounds):
            etcd_round(etcd, f"/placement{r}", args, out)
            sqlite_round(Path(tmp, f"placement{r}.db"), args, out)
            print(
                f"round {r + 1}/{args.rounds}: meshctl {out.meshctl.seconds[-1]:.2f} s "
                f"(plan {out.plan.seconds[-1]:.3f}), etcdctl per key {out.per_key.seconds[-1]:.2f}"
                f" s, batched {out.batched.seconds[-1]:.3f} s, SQLite {out.sqlite.seconds[-1]:.2f}"
                " s", flush=True,
            )  # fmt: skip
    report(out, args)


if __name__ == "__main__":
    main()
