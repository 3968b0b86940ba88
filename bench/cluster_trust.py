"""What cluster trust costs and how it fails over (#26), on the netns cluster of
tests/cluster/harness.py (real controllers, real etcd members, real TLS):

(a) failover: three managers formed by `cluster init` and two `cluster join --token <manager>`;
    node1 lost whole (its controller SIGKILLed, its underlay leg cut, every process of its
    namespace killed: its etcd member and its tasks). Measured: from the kill to the first
    `meshctl service scale` that succeeds on node2, and the floor beside it: the members'
    election timeout (MemberConfig.election_ms), after which etcd can elect a new leader.
(b) join: `meshctl cluster join` (worker token), then `controller run`, until the node's status
    is in the store (it is ready).
(c) writes per second through the store client the CLI uses (one EtcdStore, puts of a small
    record in a loop), over TLS with a login against plain HTTP, on the same machine in the
    same run: the cost of TLS.

    python bench/cluster_trust.py [--rounds 5] [--writes 500]

Needs root; each cluster is removed whole afterwards, also on failure.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from meshctl.cluster import pki  # noqa: E402
from meshctl.cluster.etcd_member import ELECTION_MS  # noqa: E402
from meshctl.store import Store  # noqa: E402
from meshctl.store.etcd import EtcdAccess, EtcdStore, parse_etcd_url  # noqa: E402
from tests.cluster.harness import Cluster  # noqa: E402
from tests.cluster.workloads import wait_live, web  # noqa: E402
from tests.conftest import kill_processes_in  # noqa: E402
from tests.etcd import EtcdServer, TestCa  # noqa: E402


def failover_once() -> float:
    with Cluster(nodes=3, trust=True, managers=3, controller_args=("--node-ttl", "4s")) as c:
        web(c, 3)
        wait_live(c, "web", 3, 60)
        killed = time.monotonic()
        c.stop_controller("node1", signal.SIGKILL)
        c.cut("node1")
        kill_processes_in(f"/run/netns/{c.nodes['node1'].netns}")
        replicas = 4
        while True:
            done = c.cli("service", "scale", f"web={replicas}", "-d", node="node2", check=False)
            if done.returncode == 0:
                return time.monotonic() - killed
            if time.monotonic() - killed > 60:
                raise RuntimeError(f"no write from node2 within 60 s: {done.stderr.strip()}")


def joins(rounds: int) -> list[float]:
    """Seconds from `cluster join` (worker token) to the node's status in the store, for each
    joining node of `rounds` clusters of 3 (the harness times every join it makes)."""
    times: list[float] = []
    while len(times) < rounds:
        with Cluster(nodes=3, trust=True) as c:
            times += c.joined_in.values()
    return times[:rounds]


def writes_per_second(open_store: Callable[[], Store], count: int) -> float:
    with open_store() as store:
        store.put("bench", "warm", {"n": 0})
        began = time.perf_counter()
        for n in range(count):
            store.put("bench", f"k{n % 50}", {"n": n})
        return count / (time.perf_counter() - began)


def tls_cost(count: int) -> tuple[float, float]:
    with EtcdServer() as plain:
        plain_rate = writes_per_second(lambda: EtcdStore(*parse_etcd_url(plain.url())), count)
    with tempfile.TemporaryDirectory() as tmp:
        ca = TestCa(tmp)
        cert, key = ca.node("bench")
        password = os.path.join(tmp, "password")
        pki.write_private(password, b"benchpw")
        with EtcdServer(tls=ca.server_tls()) as secure:
            secure.enable_auth("rootpw")
            secure.add_user("bench", "benchpw", "/meshctl")
            access = EtcdAccess(ca.path, cert, key, "bench", password)
            endpoints, prefix = parse_etcd_url(secure.url())
            tls_rate = writes_per_second(lambda: EtcdStore(endpoints, prefix, access=access), count)
    return plain_rate, tls_rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--writes", type=int, default=500)
    parser.add_argument("--parts", default="abc", help="which of (a), (b), (c) to run")
    args = parser.parse_args()
    if "a" in args.parts:
        failovers = [failover_once() for _ in range(args.rounds)]
        print(
            f"(a) failover, first manager lost -> first write from node2, {args.rounds} "
            f"rounds: median {statistics.median(failovers):.2f} s (min {min(failovers):.2f}, "
            f"max {max(failovers):.2f}); election timeout {ELECTION_MS / 1000:g} s"
        )
    if "b" in args.parts:
        joined = joins(args.rounds)
        print(
            f"(b) cluster join -> node ready, {len(joined)} joins: median "
            f"{statistics.median(joined):.2f} s (min {min(joined):.2f}, max {max(joined):.2f})"
        )
    if "c" in args.parts:
        for _ in range(args.rounds):
            plain, secure = tls_cost(args.writes)
            print(f"(c) writes/s through the store client: plain {plain:.0f}, TLS + login "
                  f"{secure:.0f} ({(1 - secure / plain) * 100:.1f} % slower)")  # fmt: skip


if __name__ == "__main__":
    main()
