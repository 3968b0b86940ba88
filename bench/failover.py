"""Failover: how fast a dead or unhealthy task leaves the VIP and DNS, and how fast a service
scaled from 0 to 50 serves.

Builds its own mesh like the root tests (tests/kernel/mesh.py): a node namespace, a state dir, a
real controller started with nsenter inside the node, services made through the CLI. Probes run
in threads, each a tight loop that records (start time, what it saw):

- DNS: an A query for tasks.<service> sent from inside a client task's namespace to
  127.0.0.11:53 (the production path, through the nat redirect), parsed with dnslib;
- LB table: `iptables-legacy-save -t nat` inside the network's LB namespace, the DNAT targets;
- VIP: a TCP connection to the service's VIP from the client task's namespace; every task answers
  with its own name (socat, as the root tests' tasks do), a failure is recorded as an error;
- ps (scale only): the tasks' states read from the store every 50 ms, as `service ps` reads them.

(a) kill -9 one task's process: time until its address is out of the LB table and out of DNS,
    VIP errors after the kill, and time until the replacement is in both and answers.
(b) a health command that fails once a file exists: time until the task is out, against
    interval x retries, and back in after the file goes, against one interval.
(c) `service scale big=50` from 0: time until all 50 tasks run, are in DNS and in the LB table
    ("serve" = all 50 DNAT targets present), and the first and all 50 answers through the VIP.

The bench re-runs itself in a private mount namespace whose /run/netns is its own tmpfs: a
controller wires or deletes every `mesh-t-*` namespace it can see, so two meshes on one host
(another test's, another bench's) would tear down each other's tasks. Needs root and
iptables-legacy; everything it makes is removed in `finally` (also on Ctrl-C and SIGTERM).

    /opt/meshvenv/bin/python bench/failover.py [--rounds 5] [--scale 50] [--profile]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dnslib import EDNS0, QTYPE, DNSRecord

from kernel import netns
from kernel.ipvs import Ipvs
from meshctl.commands.read import get_service, list_tasks
from meshctl.naming import lb_netns_prefix, task_netns
from meshctl.store import open_store

# The root tests' mesh is reused as is; it lives under tests/, which is importable only from
# the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.kernel.mesh import LB_BACKEND, Mesh, wait_for  # noqa: E402

PREFIX = f"mbench{os.getpid()}-"
PS_PERIOD = 0.05  # seconds between store reads of the tasks' states
SUBNET = "10.77.0.0/24"
ISOLATED = "MESHCTL_BENCH_ISOLATED"  # set once the bench runs in its own mount namespace
ERROR = "!error"  # a probe that got no answer
# Each task answers a TCP connection on :80 with its name (its hostname) and closes.
SERVER = ["sh", "-c", "exec socat TCP-LISTEN:80,reuseaddr,fork EXEC:hostname"]
COMMON = ["--network", "front", "--stop-grace-period", "1s", "--restart-delay", "0s", "--detach"]
DNAT = re.compile(r"--to-destination (\d+\.\d+\.\d+\.\d+)")

Sample = tuple[float, frozenset[str]]
Observe = Callable[[], frozenset[str]]


@dataclass
class Series:
    """The observations of one probe, appended by its thread, read by the main one."""

    name: str
    samples: list[Sample] = field(default_factory=list)
    failures: collections.Counter[str] = field(default_factory=collections.Counter)

    def period_ms(self) -> float:
        """The median time between samples: the probe's resolution."""
        times = [t for t, _ in self.samples]
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        return statistics.median(gaps) * 1000 if gaps else float("nan")

    def first(self, since: float, test: Callable[[frozenset[str]], bool]) -> float | None:
        """Seconds from since to the first sample started at or after since that passes test."""
        for t, seen in list(self.samples):
            if t >= since and test(seen):
                return t - since
        return None

    def last(
        self, since: float, test: Callable[[frozenset[str]], bool], until: float = float("inf")
    ) -> float | None:
        """Seconds from since to the last sample started in [since, until) that passes test."""
        hits = [t for t, seen in list(self.samples) if since <= t < until and test(seen)]
        return hits[-1] - since if hits else None

    def all_seen(self, since: float, names: set[str]) -> float | None:
        """Seconds from since until every name was seen in some sample (the VIP answers one name
        per connection, so coverage is cumulative)."""
        left = set(names)
        for t, seen in list(self.samples):
            if t >= since:
                left -= seen
                if not left:
                    return t - since
        return None

    def latest(self) -> frozenset[str]:
        return self.samples[-1][1] if self.samples else frozenset()


def ask_dns(qname: str) -> Observe:
    """A prober of the A records of qname at 127.0.0.11:53, from the calling thread's namespace."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect(("127.0.0.11", 53))
    sock.settimeout(0.5)

    def observe() -> frozenset[str]:
        query = DNSRecord.question(qname, "A")
        query.add_ar(EDNS0(udp_len=4096))  # 50 A records do not fit in 512 bytes
        sock.send(query.pack())
        try:
            while True:  # skip a late answer to an earlier, timed-out query
                reply = DNSRecord.parse(sock.recv(4096))
                if reply.header.id == query.header.id:
                    break
        except OSError:
            return frozenset({ERROR})
        if reply.header.tc:
            return frozenset({ERROR})
        return frozenset(str(rr.rdata) for rr in reply.rr if rr.rtype == QTYPE.A)

    return observe


def ask_vip(vip: str) -> Observe:
    """A prober that connects to vip:80 and reads the answering task's name."""

    def observe() -> frozenset[str]:
        try:
            with socket.create_connection((vip, 80), timeout=0.2) as conn:
                data = b""
                while chunk := conn.recv(256):
                    data += chunk
        except OSError:
            return frozenset({ERROR})
        name = data.decode(errors="replace").strip()
        return frozenset({name or ERROR})

    return observe


def read_lb_table() -> frozenset[str]:
    """The DNAT targets of the calling thread's namespace: the backends the LB sends to."""
    out = subprocess.run(
        ["iptables-legacy-save", "-t", "nat"], capture_output=True, text=True, check=False
    ).stdout
    return frozenset(DNAT.findall(out))


class Probes:
    """Probe threads, each looping in a namespace until stopped."""

    def __init__(self, period: float) -> None:
        self.period = period
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.series: list[Series] = []

    def start(
        self, name: str, ns: str | None, make: Callable[[], Observe], period: float | None = None
    ) -> Series:
        """A probe made by make() inside ns (sockets keep the namespace they were made in),
        run every period seconds (the probes' default when None)."""
        series = Series(name)
        every = self.period if period is None else period
        self.series.append(series)

        def loop() -> None:
            observe = make()
            while not self.stop.is_set():
                began = time.monotonic()
                try:
                    seen = observe()
                except Exception as err:  # one failed probe is a sample, not the end of the probe
                    series.failures[f"{type(err).__name__}: {err}"] += 1
                    seen = frozenset({ERROR})
                series.samples.append((began, seen))
                self.stop.wait(max(0.0, every - (time.monotonic() - began)))

        thread = threading.Thread(target=netns.run_in, args=(ns, loop), daemon=True)
        thread.start()
        self.threads.append(thread)
        wait_for(lambda: series.samples, 10, f"a first {name} sample", 0.005)
        return series

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=10)
        for series in self.series:
            for failure, n in series.failures.items():
                print(f"{series.name} probe failed {n} time(s): {failure}", file=sys.stderr)


@contextmanager
def probes(period: float) -> Iterator[Probes]:
    p = Probes(period)
    try:
        yield p
    finally:
        p.close()


@contextmanager
def world() -> Iterator[Mesh]:
    """A node namespace with a running controller; all of it gone afterwards."""
    node = f"{PREFIX}node"
    netns.create(node)
    with tempfile.TemporaryDirectory(prefix=PREFIX) as tmp:
        mesh = Mesh(node, os.path.join(tmp, "state"))
        try:
            subprocess.run(["ip", "-n", node, "link", "set", "lo", "up"], check=True)
            mesh.cli("network", "create", "front", "--subnet", SUBNET)
            mesh.cli("service", "create", "--name", "client", *COMMON, "--", "sleep", "infinity")
            mesh.start_controller()
            yield mesh
        finally:
            mesh.close()
            netns.delete(node)


@dataclass
class Env:
    """What every phase probes from: the client task's namespace and the LB namespace."""

    mesh: Mesh
    client_ns: str
    lb_ns: str
    period: float

    def vip(self, service: str) -> str:
        out = self.mesh.cli("service", "inspect", service, "--format", "json").stdout
        return str(json.loads(out)["networks"][0]["vip"])

    def watch(self, p: Probes, service: str) -> Watch:
        """DNS, LB-table and VIP probes of service."""
        vip = self.vip(service)
        return Watch(
            p.start("DNS", self.client_ns, lambda: ask_dns(f"tasks.{service}")),
            p.start("LB table", self.lb_ns, lambda: read_lb_table),
            p.start("VIP", self.client_ns, lambda: ask_vip(vip)),
        )


@contextmanager
def explained(env: Env, watch: Watch, service: str) -> Iterator[None]:
    """On a failure, print what the mesh and the probes showed, then let it propagate."""
    try:
        yield
    except Exception:
        print("--- what the mesh showed when the round failed:", file=sys.stderr)
        for svc in ("client", service):
            for t in env.mesh.ps(svc):
                fields = ("state", "pid", "health", "restarts", "addresses", "error")
                print(t["name"], *(f"{k}={t[k]}" for k in fields), file=sys.stderr)
        for series in (watch.dns, watch.lb, watch.vip):
            print(f"{series.name}: last {sorted(series.latest())}, failures"
                  f" {dict(series.failures)}", file=sys.stderr)  # fmt: skip
        print(Path(env.mesh.controller_log).read_text()[-3000:], file=sys.stderr)
        raise


def setup(mesh: Mesh, period: float) -> Env:
    (client,) = mesh.wait_running("client", 1, timeout=30)
    node_id = wait_for(mesh.node_id, 10, "the node's record")
    prefix = lb_netns_prefix(node_id)
    (lb_ns,) = wait_for(lambda: netns.list_namespaces(prefix), 20, "the LB namespace")
    return Env(mesh, task_netns(client["id"]), lb_ns, period)


def healthy(mesh: Mesh, service: str, count: int) -> list[dict[str, Any]]:
    """The service's tasks once exactly count run and none is unhealthy or starting."""
    tasks = mesh.running(service)
    ok = [t for t in tasks if t["health"] in ("healthy", "none")]
    return ok if len(ok) == count else []


def has(*items: str) -> Callable[[frozenset[str]], bool]:
    return lambda seen: set(items) <= seen


def lacks(item: str) -> Callable[[frozenset[str]], bool]:
    return lambda seen: item not in seen and ERROR not in seen


@dataclass
class Watch:
    """The three probes of one service: DNS, LB table and VIP."""

    dns: Series
    lb: Series
    vip: Series

    def serving(self, addresses: set[str], since: float) -> bool:
        """Every address in DNS and the LB table, and the VIP answering, after since."""
        return (
            self.dns.first(since, has(*addresses)) is not None
            and self.lb.first(since, has(*addresses)) is not None
            and self.vip.first(since, lacks(ERROR)) is not None
        )

    def settle(self, addresses: set[str]) -> None:
        """Wait until fresh samples show every address serving."""
        now = time.monotonic()
        seen = ", ".join(f"{s.name} {sorted(s.latest())}" for s in (self.dns, self.lb, self.vip))
        wait_for(lambda: self.serving(addresses, now), 30,
                 f"{sorted(addresses)} serving (first seen: {seen})", 0.01)  # fmt: skip

    def periods(self) -> dict[str, float]:
        return {s.name: s.period_ms() for s in (self.dns, self.lb, self.vip)}


Row = dict[str, float | None]


def kill_rounds(env: Env, rounds: int, replicas: int) -> tuple[list[Row], dict[str, float]]:
    """(a): kill -9 one task per round; seconds until it leaves and its replacement serves."""
    mesh = env.mesh
    mesh.cli("service", "create", "--name", "web", "--replicas", str(replicas), *COMMON,
             "--", *SERVER)  # fmt: skip
    rows: list[Row] = []
    with probes(env.period) as p:
        mesh.wait_running("web", replicas, timeout=60)
        watch = env.watch(p, "web")
        for r in range(rounds):
            tasks = wait_for(lambda: healthy(mesh, "web", replicas), 30, "web running", 0.05)
            with explained(env, watch, "web"):
                watch.settle({t["addresses"]["front"] for t in tasks})
                victim = sorted(tasks, key=lambda t: t["name"])[r % replicas]
                rows.append(kill_one(mesh, watch, victim))
            print(f"(a) round {r + 1}/{rounds}: {row_text(rows[-1])}", flush=True)
    return rows, watch.periods()


def kill_one(mesh: Mesh, watch: Watch, victim: dict[str, Any]) -> Row:
    """kill -9 victim's process; wait until its slot serves again and read the probes."""
    name, old = victim["name"], victim["addresses"]["front"]
    killed = time.monotonic()
    os.kill(victim["pid"], signal.SIGKILL)

    def replaced() -> list[dict[str, Any]]:
        """The victim's slot running again: a new task, or the same one restarted."""
        return [t for t in mesh.running("web") if t["name"] == name and t["pid"] != victim["pid"]]

    (new,) = wait_for(replaced, 30, f"{name} replaced", 0.05)
    addr = new["addresses"]["front"]
    wait_for(lambda: watch.serving({addr}, killed), 30, f"{name}'s replacement serving", 0.01)
    time.sleep(0.3)  # samples after the replacement came, for the VIP error count
    out_lb = watch.lb.first(killed, lacks(old))
    out_dns = watch.dns.first(killed, lacks(old))
    return {
        "out of the LB table": out_lb,
        "out of DNS": out_dns,
        # 0 when no connection failed at all.
        "last VIP error after the kill": watch.vip.last(killed, has(ERROR)) or 0.0,
        # After the dead task left: the replacement may come back at the same address.
        "replacement in the LB table": later(watch.lb, killed, out_lb, has(addr)),
        "replacement in DNS": later(watch.dns, killed, out_dns, has(addr)),
        # A connection started after the kill cannot reach the dead process.
        "replacement answers through the VIP": watch.vip.first(killed, has(name)),
        "VIP errors": float(sum(ERROR in s for t, s in list(watch.vip.samples) if t >= killed)),
        "same address": float(addr == old),
    }


def later(
    series: Series, since: float, after: float | None, test: Callable[[frozenset[str]], bool]
) -> float | None:
    """Seconds from since to the first sample passing test at or after since + after."""
    if after is None:
        return None
    found = series.first(since + after, test)
    return None if found is None else after + found


def row_text(row: Row) -> str:
    return ", ".join(f"{k} {'-' if v is None else f'{v:.3f}'}" for k, v in row.items())


def health_rounds(
    env: Env, rounds: int, replicas: int, interval: float, retries: int, sick: Path
) -> tuple[list[Row], dict[str, float]]:
    """(b): a task's health command starts failing, later passes again; seconds until it is out
    of (and back in) the LB table, DNS and the VIP's answers."""
    mesh = env.mesh
    mesh.cli("service", "create", "--name", "hweb", "--replicas", str(replicas), *COMMON,
             "--health-cmd", f"test ! -e {sick}/$HOSTNAME", "--health-interval", f"{interval}s",
             "--health-timeout", "5s", "--health-retries", str(retries),
             "--restart-condition", "none", "--", *SERVER)  # fmt: skip
    rows: list[Row] = []
    with probes(env.period) as p:
        wait_for(lambda: healthy(mesh, "hweb", replicas), 60, "hweb healthy", 0.1)
        watch = env.watch(p, "hweb")
        for r in range(rounds):
            tasks = wait_for(lambda: healthy(mesh, "hweb", replicas), 60, "hweb healthy", 0.05)
            with explained(env, watch, "hweb"):
                watch.settle({t["addresses"]["front"] for t in tasks})
                victim = sorted(tasks, key=lambda t: t["name"])[r % replicas]
                rows.append(flip_one(watch, victim, sick / victim["name"], interval * retries))
            print(f"(b) round {r + 1}/{rounds}: {row_text(rows[-1])}", flush=True)
    return rows, watch.periods()


def flip_one(watch: Watch, victim: dict[str, Any], flag: Path, reference: float) -> Row:
    """Make victim's health command fail until it is out, then pass until it is back."""
    name, addr = victim["name"], victim["addresses"]["front"]
    flag.touch()
    flipped = time.monotonic()
    try:
        wait_for(lambda: watch.dns.first(flipped, lacks(addr)) is not None
                 and watch.lb.first(flipped, lacks(addr)) is not None,
                 reference * 3 + 10, f"{name} out", 0.01)  # fmt: skip
        time.sleep(1.0)  # a second of VIP samples without the name
    finally:
        flag.unlink()
    healed = time.monotonic()
    wait_for(lambda: watch.serving({addr}, healed) and watch.vip.first(healed, has(name)),
             reference * 3 + 10, f"{name} back", 0.01)  # fmt: skip
    last_seen = watch.vip.last(flipped, has(name), healed)
    return {
        "out of the LB table": watch.lb.first(flipped, lacks(addr)),
        "out of DNS": watch.dns.first(flipped, lacks(addr)),
        # The first VIP sample after the last one the task answered.
        "out of the VIP's answers": later(watch.vip, flipped, last_seen or 0.0, lacks(name)),
        "back in the LB table": watch.lb.first(healed, has(addr)),
        "back in DNS": watch.dns.first(healed, has(addr)),
        "answers through the VIP again": watch.vip.first(healed, has(name)),
    }


@dataclass
class Scale:
    """(c) one round: seconds from the scale command's start to each milestone."""

    row: Row
    periods: dict[str, float]


def scale_round(env: Env, count: int, period: float, profile: Path | None) -> Scale:
    """(c): `service scale big=count` from 0; seconds until all count tasks run and serve.
    Probes every period seconds: coarser than (a) and (b), so they take less of the CPU the
    controller needs."""
    mesh = env.mesh
    with probes(period) as p, ExitStack() as stack:
        watch = env.watch(p, "big")
        ps = p.start("ps", None, lambda: running_tasks(mesh, "big"), PS_PERIOD)
        spy = _py_spy(mesh, profile)
        stack.enter_context(explained(env, watch, "big"))
        began = time.monotonic()
        mesh.cli("service", "scale", f"big={count}", "--detach")
        returned = time.monotonic() - began
        try:
            tasks = mesh.wait_running("big", count, timeout=300)
            names = {t["name"] for t in tasks}
            addresses = {t["addresses"]["front"] for t in tasks}
            wait_for(lambda: watch.serving(addresses, began)
                     and watch.vip.all_seen(began, names) is not None,
                     300, "all serving", 0.05)  # fmt: skip
        finally:
            if spy is not None:
                spy.send_signal(signal.SIGINT)  # py-spy writes what it has on SIGINT
                spy.wait(timeout=30)
        row: Row = {
            "the scale command returned": returned,
            "first task running (ps)": ps.first(began, lambda s: bool(s - {ERROR})),
            f"all {count} running (ps)": ps.first(began, lambda s: len(s - {ERROR}) == count),
            "first task in DNS": watch.dns.first(began, lambda s: bool(s - {ERROR})),
            f"all {count} in DNS": watch.dns.first(began, has(*addresses)),
            "first task in the LB table": watch.lb.first(began, lambda s: bool(s & addresses)),
            f"all {count} in the LB table": watch.lb.first(began, has(*addresses)),
            "first answer through the VIP": watch.vip.first(began, lacks(ERROR)),
            # Bound by the probe: random spread needs ~4.5 x count connections to see them all.
            f"all {count} answered through the VIP (probe-bound)": watch.vip.all_seen(began, names),
        }
    return Scale(row, {**watch.periods(), ps.name: ps.period_ms()})


def running_tasks(mesh: Mesh, service: str) -> Observe:
    """A prober of the service's running tasks, read from the store as `service ps` reads it
    (a CLI process per poll would cost a third of a core on the cores the controller needs)."""
    store = open_store(f"sqlite:///{mesh.state_dir}/state.db")

    def observe() -> frozenset[str]:
        tasks = list_tasks(store, get_service(store, service))
        return frozenset(t.name for t in tasks if t.state == t.desired_state == "running")

    return observe


def _py_spy(mesh: Mesh, out: Path | None) -> subprocess.Popen[bytes] | None:
    """py-spy recording the controller (and its children) into out, collapsed stacks."""
    if out is None or mesh.controller is None:
        return None
    spy = Path(sys.executable).with_name("py-spy")
    return subprocess.Popen(
        [str(spy), "record", "--pid", str(mesh.controller.pid), "--subprocesses", "--rate", "200",
         "--format", "raw", "--output", str(out), "--nonblocking"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


Frames = dict[str, list[tuple[str, float]]]


def top_frames(collapsed: Path, top: int = 10) -> Frames:
    """Share of py-spy's samples per frame of meshctl and kernel code: the deepest such frame
    of each sample (where the project's own time goes, library calls included), and any frame
    on the stack (inclusive)."""
    deepest: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        total += int(n)
        ours = [f for f in stack.split(";") if "meshctl/" in f or "kernel/" in f]
        if ours:
            deepest[ours[-1]] += int(n)
        for frame in set(ours):
            inclusive[frame] += int(n)
    if not total:
        return {}
    return {
        label: [(frame, n / total) for frame, n in counts.most_common(top)]
        for label, counts in (("deepest project frame", deepest), ("inclusive", inclusive))
    }


def scale_down(env: Env) -> None:
    """Back to 0 between rounds: no task running, none in DNS, none in the LB table."""
    gone = {t["addresses"]["front"] for t in env.mesh.ps("big")}
    env.mesh.cli("service", "scale", "big=0", "--detach")
    with probes(env.period) as p:
        watch = env.watch(p, "big")
        wait_for(lambda: not env.mesh.running("big") and not watch.dns.latest() - {ERROR}
                 and not watch.lb.latest() & gone, 120, "big scaled to 0", 0.2)  # fmt: skip


# -- the report ------------------------------------------------------------------------------


def ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:,.0f}"


def secs(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def stats(rows: list[Row], key: str) -> tuple[float | None, float | None]:
    values = [v for row in rows if (v := row[key]) is not None]
    if len(values) < len(rows) or not values:
        return None, None
    return statistics.median(values), max(values)


def report(
    a: tuple[list[Row], dict[str, float]],
    b: tuple[list[Row], dict[str, float]],
    c: list[Scale],
    interval: float,
    retries: int,
    count: int,
    frames: Frames,
) -> None:
    commit = subprocess.run(
        ["git", "-C", str(Path(__file__).resolve().parents[1]), "log", "-1", "--oneline"],
        capture_output=True, text=True, check=False,
    ).stdout.strip()  # fmt: skip
    print(f"\nFailover, {LB_BACKEND} LB backend (iptables here: no IPVS); commit {commit};")
    print(f"{os.cpu_count()} cores shared with anything else running.\n")
    rows, periods = a
    print(f"(a) kill -9 of one task's process, {len(rows)} rounds (probe periods: "
          + _periods(periods) + "):\n")  # fmt: skip
    print("| from the kill until | p50 (ms) | max (ms) |")
    print("|---|---:|---:|")
    for key in rows[0] if rows else ():
        if key in ("VIP errors", "same address"):
            continue
        p50, top = stats(rows, key)
        print(f"| {key} | {ms(p50)} | {ms(top)} |")
    errors = [int(row["VIP errors"] or 0) for row in rows]
    same = sum(bool(row["same address"]) for row in rows)
    print(f"\nVIP connections that failed after the kill, per round: {errors}; the replacement"
          f" kept the dead task's address in {same} of {len(rows)} rounds.\n")  # fmt: skip
    rows, periods = b
    gone_ref, back_ref = interval * retries, interval
    print(f"(b) health command starts failing (interval {interval:g} s x retries {retries}), "
          f"{len(rows)} rounds (probe periods: {_periods(periods)}):\n")  # fmt: skip
    print("| from the flip until | p50 (s) | max (s) | reference (s) | p50 / reference |")
    print("|---|---:|---:|---:|---:|")
    for key in rows[0] if rows else ():
        ref = back_ref if key.startswith(("back", "answers")) else gone_ref
        label = "interval" if ref == back_ref and key.startswith(("back", "answers")) else (
            "interval x retries")  # fmt: skip
        p50, top = stats(rows, key)
        ratio = "-" if p50 is None else f"{p50 / ref:.2f}"
        print(f"| {key} | {secs(p50)} | {secs(top)} | {ref:g} ({label}) | {ratio} |")
    print(f"\n(c) service scale big=0 → {count}, {len(c)} round(s) (probe periods: "
          + _periods(c[0].periods) + "):\n")  # fmt: skip
    print("| from the scale command's start until | " + " | ".join(
        f"round {i + 1} (s)" for i in range(len(c))) + " |")  # fmt: skip
    print("|---|" + "---:|" * len(c))
    for key in c[0].row:
        print(f"| {key} | " + " | ".join(secs(s.row[key]) for s in c) + " |")
    for label, ranked in frames.items():
        print(f"\npy-spy on the controller during the first scale, {label} (share of samples):\n")
        print("| frame | share |")
        print("|---|---:|")
        for frame, share in ranked:
            print(f"| `{frame}` | {share:.0%} |")


def _periods(periods: dict[str, float]) -> str:
    return ", ".join(f"{name} {p:.1f} ms" for name, p in periods.items())


def isolate() -> None:
    """Re-exec in a private mount namespace and give it an empty namespace registry."""
    if os.environ.get(ISOLATED) != "1":
        argv = ["unshare", "--mount", "--propagation", "private", "--", sys.executable, *sys.argv]
        os.execvpe("unshare", argv, {**os.environ, ISOLATED: "1"})
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "meshbench", netns.path("")],
                   check=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds of (a) and (b)")
    parser.add_argument("--replicas", type=int, default=3, help="tasks of the (a)/(b) services")
    parser.add_argument("--scale", type=int, default=50, help="tasks to scale to in (c)")
    parser.add_argument("--scale-rounds", type=int, default=1, help="rounds of (c)")
    parser.add_argument("--period-ms", type=float, default=2.0, help="probe period in (a), (b)")
    parser.add_argument("--scale-period-ms", type=float, default=20.0, help="probe period in (c)")
    parser.add_argument("--health-interval", type=float, default=1.0, help="seconds")
    parser.add_argument("--health-retries", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="py-spy the first scale round")
    args = parser.parse_args()
    isolate()
    # SIGTERM unwinds like Ctrl-C, so the finally blocks remove the world.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with world() as mesh, tempfile.TemporaryDirectory(prefix=PREFIX) as tmp:
        ipvs = Ipvs().available(mesh.node_ns) is None
        if LB_BACKEND == "ipvs" or (LB_BACKEND == "auto" and ipvs):
            sys.exit("the LB-table probe reads iptables rules: set MESHCTL_LB_BACKEND=iptables")
        env = setup(mesh, args.period_ms / 1000)
        a = kill_rounds(env, args.rounds, args.replicas)
        sick = Path(tmp, "sick")
        sick.mkdir()
        b = health_rounds(env, args.rounds, args.replicas, args.health_interval,
                          args.health_retries, sick)  # fmt: skip
        mesh.cli("service", "create", "--name", "big", "--replicas", "0", *COMMON, "--", *SERVER)
        profile = Path(tmp, "controller.collapsed") if args.profile else None
        c: list[Scale] = []
        for r in range(args.scale_rounds):
            period = args.scale_period_ms / 1000
            c.append(scale_round(env, args.scale, period, profile if r == 0 else None))
            print(f"(c) round {r + 1}/{args.scale_rounds}: " + row_text(c[-1].row), flush=True)
            if r + 1 < args.scale_rounds:
                scale_down(env)
        frames = top_frames(profile) if profile is not None and profile.exists() else {}
        report(a, b, c, args.health_interval, args.health_retries, args.scale, frames)


if __name__ == "__main__":
    main()
