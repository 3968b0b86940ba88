"""Request loops that run all through a fault campaign (#27), and the judge of their failures.

Each loop is one small Python process inside a namespace (a client task's, or the client host's
outside every node), a thread per target: every round a new TCP connection, one HTTP/1.0 GET
with a per-request timeout, one JSON line per request with its times (CLOCK_MONOTONIC, which
every process on the host shares) and what answered (the task's hostname) or why it failed.

A failure is attributable to a dead task when it began within a death's window: from one
request timeout before the task died (a request under way when it died) to the death's
detection bound (the time the cluster is allowed to take its endpoint out everywhere). The
client cannot tell where a failed connection went, so the window is the judge: a failure
outside every window breaks the rule whatever caused it.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from meshctl.naming import task_netns
from tests.cluster.harness import Cluster, nsenter
from tests.cluster.workloads import live

# The loop run inside a namespace: argv = interval, timeout, then label,host,port,Host targets.
LOOP = r"""
import json, socket, sys, threading, time
interval, timeout = float(sys.argv[1]), float(sys.argv[2])
lock = threading.Lock()
def ask(host, port, name):
    with socket.create_connection((host, int(port)), timeout=timeout) as conn:
        conn.sendall(f"GET / HTTP/1.0\r\nHost: {name or host}\r\n\r\n".encode())
        data = b""
        while chunk := conn.recv(4096):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = head.split(b" ", 2)[1].decode() if b" " in head else "none"
    return status, body.decode(errors="replace").strip()
def loop(label, host, port, name):
    while True:
        began = time.monotonic()
        try:
            status, body = ask(host, port, name)
            ok, said = status == "200", body if status == "200" else f"HTTP {status} {body[:60]}"
        except OSError as err:
            ok, said = False, f"{type(err).__name__}: {err}"
        line = json.dumps([label, began, time.monotonic(), ok, said])
        with lock:
            print(line, flush=True)
        time.sleep(interval)
for target in sys.argv[3:]:
    threading.Thread(target=loop, args=target.split(",")).start()
"""


@dataclass(frozen=True)
class Result:
    """One request: its loop's label, when it began and ended, and who answered or why not."""

    label: str
    began: float
    ended: float
    ok: bool
    said: str


@dataclass(frozen=True)
class Death:
    """A task that died at `at`; the cluster may send to it until `until` (detection bound)."""

    task: str
    at: float
    until: float


@dataclass(frozen=True)
class Excluded:
    """Requests of a loop that stand on a lost node (from its client task, to its port) from
    start to end: they measure the lost node, not the cluster that survives it."""

    label: str
    start: float
    end: float

    def covers(self, result: Result) -> bool:
        return result.label == self.label and self.start <= result.began <= self.end


@dataclass
class Judged:
    """The requests of one stretch of time, judged against the deaths in it."""

    sent: int = 0
    failed: int = 0
    attributable: int = 0
    excluded: int = 0
    longest: float = 0.0  # seconds: the longest run of failures of one loop
    unexplained: list[Result] = field(default_factory=list)


def judge(
    results: Iterable[Result],
    deaths: Sequence[Death],
    excluded: Sequence[Excluded],
    timeout: float,
) -> Judged:
    """Count and classify results (see the module's docstring)."""
    verdict = Judged()
    runs: dict[str, tuple[float, float]] = {}  # label → the current run of failures
    for r in sorted(results, key=lambda r: r.began):
        if any(e.covers(r) for e in excluded):
            verdict.excluded += 1
            continue
        verdict.sent += 1
        if r.ok:
            runs.pop(r.label, None)
            continue
        verdict.failed += 1
        first, _ = runs.get(r.label, (r.began, r.ended))
        runs[r.label] = (first, r.ended)
        verdict.longest = max(verdict.longest, r.ended - first)
        if any(d.at - timeout <= r.began <= d.until for d in deaths):
            verdict.attributable += 1
        else:
            verdict.unexplained.append(r)
    return verdict


class Loop:
    """One loop process in namespace ns over targets, its results appended as they come."""

    def __init__(
        self, ns: str, targets: Sequence[str], into: list[Result], interval: float, timeout: float
    ) -> None:
        argv = nsenter(ns, sys.executable, "-c", LOOP, f"{interval:g}", f"{timeout:g}", *targets)
        self.process = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        self._reader = threading.Thread(target=self._read, args=(into,), daemon=True)
        self._reader.start()

    def _read(self, into: list[Result]) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with contextlib.suppress(ValueError):
                into.append(Result(*json.loads(line)))

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)
        self._reader.join(timeout=10)


class Traffic:
    """Every loop of the campaign: from the client host to each node's published port and to
    each node's router by Host, and from the client task on each node to the service's VIP.

    follow() moves a node's VIP loop into the client task that runs there now (a lost node's
    client is replaced when it comes back)."""

    def __init__(
        self,
        cluster: Cluster,
        vip: str,
        port: int,
        host: str,
        interval: float = 0.05,
        timeout: float = 2.0,
    ) -> None:
        self.cluster = cluster
        self.vip = vip
        self.interval = interval
        self.timeout = timeout
        self.results: list[Result] = []
        self._clients: dict[str, tuple[str, Loop]] = {}  # node → (client task id, its loop)
        targets = [
            t
            for name, n in cluster.nodes.items()
            for t in (f"port@{name},{n.address},{port},", f"router@{name},{n.address},80,{host}")
        ]
        self._outside = Loop(cluster.client.netns, targets, self.results, interval, timeout)

    def follow(self) -> None:
        """One VIP loop in the client task of every node that runs one."""
        try:
            running = {t["node"]: t["id"] for t in live(self.cluster, "client")}
        except AssertionError:  # the CLI failed (the store did not answer): the next call
            return
        for node in self.cluster.nodes:
            held = self._clients.get(node)
            if held is not None and held[0] != running.get(node):
                held[1].stop()
                del self._clients[node]
            if node in running and node not in self._clients:
                target = f"vip@{node},{self.vip},80,"
                loop = Loop(task_netns(running[node]), [target], self.results, self.interval,
                            self.timeout)  # fmt: skip
                self._clients[node] = (running[node], loop)

    def since(self, start: float, end: float = float("inf")) -> list[Result]:
        return [r for r in list(self.results) if start <= r.began <= end]

    def close(self) -> None:
        for _, loop in self._clients.values():
            loop.stop()
        self._clients.clear()
        self._outside.stop()
