"""Embedded DNS vs dnsmasq: QPS and latency with dnsperf from inside a task namespace.

Builds a node namespace (running the embedded server) and a task namespace in which dnsmasq
serves the same names from a hosts file on 127.0.0.12:53, and the embedded server listens on
127.0.0.11:53 (a direct socket) and on a random port of 127.0.0.11, which the task reaches at
127.0.0.11:53 as users do: by nftables' stateless port rewrite (meshctl.node.desired's
dns_rewrite, where nft runs) or by the nat redirect. Each round runs dnsperf inside the task
against dnsmasq, the direct socket, the rewrite and the nat redirect in turn (only one redirect
is in place at a time). Prints a markdown table and the ratios to dnsmasq in the same round.
Needs root, dnsperf, dnsmasq, nft.

    /opt/meshvenv/bin/python bench/dns/bench.py [--seconds 10] [--rounds 3] [--services 100]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from kernel import netns
from kernel.nftables import Nftables
from kernel.nftables_rules import NftTable, table_change
from meshctl.dns import DnsServer, DnsService, DnsTask, DnsView
from meshctl.dns.thread import ServerThread
from meshctl.node.task_dns import dns_rewrite

PREFIX = f"mbench{os.getpid()}-"
EMBEDDED, DNSMASQ = "127.0.0.11", "127.0.0.12"
DNSMASQ_RUN = "dnsmasq"
DIRECT_RUN = "embedded, direct socket on 127.0.0.11:53"
REWRITE_RUN = "embedded via 127.0.0.11:53, nftables stateless rewrite"
NAT_RUN = "embedded via 127.0.0.11:53, nat redirect"
REPLICAS = 3


@dataclass
class Run:
    label: str
    qps: float
    avg_latency_ms: float
    lost: int


def sh(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def build_view(services: int) -> DnsView:
    """services VIP services with REPLICAS tasks each, all on one network."""
    return DnsView(
        networks=frozenset({"front"}),
        services=tuple(
            DnsService(f"svc{s}", "vip", {"front": f"10.1.{s // 200}.{s % 200 + 1}"})
            for s in range(services)
        ),
        tasks=tuple(
            DnsTask(f"svc{s}.{r}", f"svc{s}", {"front": f"10.2.{s // 60}.{(s % 60) * 4 + r}"})
            for s in range(services)
            for r in range(1, REPLICAS + 1)
        ),
    )


def hosts_file(view: DnsView) -> str:
    """The same A records for dnsmasq: service VIPs, task names, tasks.<service> sets."""
    lines = [f"{s.vips['front']} {s.name}" for s in view.services]
    for task in view.tasks:
        lines.append(f"{task.addresses['front']} {task.name}")
        lines.append(f"{task.addresses['front']} tasks.{task.service}")
    return "\n".join(lines) + "\n"


def query_file(view: DnsView) -> str:
    """dnsperf input: each service, tasks.<service>, a task name and a task's PTR."""
    lines = []
    for service, task in zip(view.services, view.tasks[::REPLICAS], strict=True):
        reverse = ".".join(reversed(task.addresses["front"].split("."))) + ".in-addr.arpa"
        lines += [
            f"{service.name} A",
            f"tasks.{service.name} A",
            f"{task.name} A",
            f"{reverse} PTR",
        ]
    return "\n".join(lines) + "\n"


@contextmanager
def namespace(tag: str) -> Iterator[str]:
    name = f"{PREFIX}{tag}"
    netns.create(name)
    try:
        sh("ip", "-n", name, "link", "set", "lo", "up")
        yield name
    finally:
        netns.delete(name)


@contextmanager
def dnsmasq(ns: str, hosts: Path) -> Iterator[None]:
    process = subprocess.Popen(
        ["ip", "netns", "exec", ns, "dnsmasq", "-k", "-C", "/dev/null", "--no-resolv"]
        + ["--no-hosts", f"--addn-hosts={hosts}", f"--listen-address={DNSMASQ}"]
        + ["--bind-interfaces", "--pid-file=", "--user=root", "--server=/#/"]
        + ["--cache-size=10000"]
    )
    try:
        yield
    finally:
        process.kill()
        process.wait()


def dnsperf(ns: str, server: str, queries: Path, seconds: int, label: str) -> Run:
    out = sh(
        "ip", "netns", "exec", ns, "dnsperf", "-s", server, "-d", str(queries),
        "-l", str(seconds), "-q", "200", "-t", "2",
    )  # fmt: skip
    qps = re.search(r"Queries per second:\s+([\d.]+)", out)
    latency = re.search(r"Average Latency \(s\):\s+([\d.]+)", out)
    lost = re.search(r"Queries lost:\s+(\d+)", out)
    if not (qps and latency and lost):
        sys.exit(f"could not read dnsperf's output:\n{out}")
    return Run(label, float(qps.group(1)), float(latency.group(1)) * 1000, int(lost.group(1)))


def check_same_answers(ns: str, names: list[str]) -> None:
    """Both servers must answer the benchmark's names alike, or the comparison is void."""
    for name in names:
        ours = sorted(sh("ip", "netns", "exec", ns, "dig", f"@{EMBEDDED}", "+short", name).split())
        theirs = sorted(sh("ip", "netns", "exec", ns, "dig", f"@{DNSMASQ}", "+short", name).split())
        if ours != theirs or not ours:
            sys.exit(f"answers differ for {name}: embedded {ours}, dnsmasq {theirs}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10, help="per dnsperf run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs per server")
    parser.add_argument("--services", type=int, default=100)
    args = parser.parse_args()
    view = build_view(args.services)
    runs: list[Run] = []
    with (
        tempfile.TemporaryDirectory() as tmp,
        namespace("node") as node,
        namespace("task") as task,
        ServerThread(DnsServer([]), namespace=node) as thread,
    ):
        hosts, queries = Path(tmp, "hosts"), Path(tmp, "queries")
        hosts.write_text(hosts_file(view))
        queries.write_text(query_file(view))
        hosts.chmod(0o644)
        thread.update(view)
        thread.add_endpoint("direct", task, frozenset({"front"}), port=53)
        ports = thread.add_endpoint("redirected", task, frozenset({"front"}), port=0)
        nat = ["-d", EMBEDDED, "-p", "udp", "--dport", "53", "-j", "DNAT",
               "--to-destination", f"{EMBEDDED}:{ports[0]}"]  # fmt: skip
        rewrite = table_change(dns_rewrite(*ports), NftTable())
        nft = Nftables()
        with dnsmasq(task, hosts):
            check_same_answers(task, ["svc0", "tasks.svc1", "svc2.3"])
            for _ in range(args.rounds):
                runs.append(dnsperf(task, DNSMASQ, queries, args.seconds, DNSMASQ_RUN))
                runs.append(dnsperf(task, EMBEDDED, queries, args.seconds, DIRECT_RUN))
                nft.apply(task, rewrite)
                runs.append(dnsperf(task, EMBEDDED, queries, args.seconds, REWRITE_RUN))
                nft.delete_table(task)
                sh(
                    "ip",
                    "netns",
                    "exec",
                    task,
                    "iptables-legacy",
                    "-t",
                    "nat",
                    "-A",
                    "OUTPUT",
                    *nat,
                )
                runs.append(dnsperf(task, EMBEDDED, queries, args.seconds, NAT_RUN))
                sh(
                    "ip",
                    "netns",
                    "exec",
                    task,
                    "iptables-legacy",
                    "-t",
                    "nat",
                    "-D",
                    "OUTPUT",
                    *nat,
                )
    report(runs, args)


def report(runs: list[Run], args: argparse.Namespace) -> None:
    print(f"DNS bench: {args.services} services x {REPLICAS} tasks, {4 * args.services} names")
    print(f"(A service, A tasks.service, A task, PTR), dnsperf -q 200, {args.seconds} s per run,")
    print(f"{os.cpu_count()} cores shared by server, dnsperf and anything else running.\n")
    print("| server | QPS | avg latency (ms) | lost |")
    print("|---|---:|---:|---:|")
    for run in runs:
        print(f"| {run.label} | {run.qps:,.0f} | {run.avg_latency_ms:.3f} | {run.lost} |")
    # Each round's runs are back to back, so their ratio is the least disturbed by other load.
    theirs = [r.qps for r in runs if r.label == DNSMASQ_RUN]
    for label in (DIRECT_RUN, REWRITE_RUN, NAT_RUN):
        ours = [r.qps for r in runs if r.label == label]
        ratios = [a / b for a, b in zip(ours, theirs, strict=True)]
        print(f"\n{label} / dnsmasq QPS per round: {', '.join(f'{r:.2f}' for r in ratios)}; "
              f"median {statistics.median(ratios):.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
