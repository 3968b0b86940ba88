"""Load-balancer control plane, iptables backend: meshctl's sync vs iptables-legacy-restore.

For each S, builds a node namespace with a network bridge and lets `LbReconciler.sync` program a
fresh LB namespace from empty with S services x 10 backends (timed, with the time each kernel verb
took). The peer, in the same run: the LB namespace's rules dumped with iptables-legacy-save and
restored by iptables-legacy-restore into a fresh namespace. Then single-endpoint changes (drain or
undrain, remove or re-add one backend of a random service), each one sync call against the same
change of that service's chains by `iptables-legacy-restore --noflush`. Prints markdown tables.
IPVS is not measured where the kernel has none (it says so). Needs root, iptables-legacy.

    /opt/meshvenv/bin/python bench/control_plane.py [--services 100,1000] [--changes 100]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

from kernel import netns
from kernel.ipvs import Ipvs
from kernel.links import Links
from kernel.system import Kernel, real_kernel
from meshctl.controller.names import lb_netns_prefix, lb_node_end
from meshctl.lb.reconcile import LbReconciler
from meshctl.lb.spec import (
    SEP_CHAIN_PREFIX,
    SVC_CHAIN_PREFIX,
    Backend,
    LbSpec,
    VirtualIp,
    iptables_tables,
    lb_spec,
)

PREFIX = f"mbench{os.getpid()}-"
ENDPOINTS = 10
LB_ADDRESS = "10.0.0.2/8"  # a /8 holds 10,000 VIPs and 100,000 backends
VIP_BASE, BACKEND_BASE = 0x0A010000, 0x0A100000  # 10.1.0.0 and 10.16.0.0


@dataclass
class Timed:
    """A kernel subsystem whose verbs add their wall time to `spent` under "subsystem.verb"."""

    name: str
    inner: Any
    spent: dict[str, float]

    def __getattr__(self, verb: str) -> Any:
        fn = getattr(self.inner, verb)

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.spent[f"{self.name}.{verb}"] += time.perf_counter() - start

        return timed


def timed_kernel(spent: dict[str, float]) -> Kernel:
    """The real kernel with every verb timed into spent."""
    k = real_kernel()
    parts = {name: Timed(name, getattr(k, name), spent) for name in Kernel.__dataclass_fields__}
    return Kernel(**cast(dict[str, Any], parts))


@dataclass
class Scale:
    """The figures of one S."""

    services: int
    rules: int
    sync_s: float
    restore_s: float
    rss_before_mib: float
    rss_mib: float
    verbs: dict[str, float]  # seconds per kernel verb in the full sync
    change_ms: list[float] = field(default_factory=list)
    peer_change_ms: list[float] = field(default_factory=list)
    change_verbs: dict[str, float] = field(default_factory=dict)  # seconds, all changes


def sh(*cmd: str, stdin: str | None = None) -> str:
    return subprocess.run(cmd, input=stdin, check=True, capture_output=True, text=True).stdout


def address(base: int, offset: int) -> str:
    return ".".join(str((base + offset) >> shift & 0xFF) for shift in (24, 16, 8, 0))


def services(count: int) -> tuple[VirtualIp, ...]:
    """count services with ENDPOINTS backends each, every address distinct."""
    return tuple(
        VirtualIp(
            f"svc-{s}",
            f"svc{s}",
            address(VIP_BASE, s),
            tuple(Backend(address(BACKEND_BASE, s * 16 + e + 1)) for e in range(ENDPOINTS)),
        )
        for s in range(count)
    )


def changed(vip: VirtualIp, step: int) -> VirtualIp:
    """One endpoint change: even steps drain or undrain the first backend, odd steps remove
    the last backend or add it back."""
    backends = list(vip.backends)
    if step % 2 == 0:
        first = backends[0]
        backends[0] = Backend(first.address, 1 - first.weight)
    elif len(backends) == ENDPOINTS:
        backends.pop()
    else:
        s = int(vip.service_id.removeprefix("svc-"))
        backends.append(Backend(address(BACKEND_BASE, s * 16 + ENDPOINTS)))
    return replace(vip, backends=tuple(backends))


def vm_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def restore(ns: str, ruleset: Path, *flags: str) -> float:
    """Seconds iptables-legacy-restore takes to load ruleset inside ns (process start included)."""
    with ruleset.open() as rules:
        start = time.perf_counter()
        subprocess.run(
            ["nsenter", f"--net={netns.path(ns)}", "iptables-legacy-restore", "-w", "5", *flags],
            stdin=rules,
            check=True,
        )
        return time.perf_counter() - start


def service_chains(spec: LbSpec, vip: VirtualIp) -> dict[str, list[str]]:
    """The nat chains of one service, rendered as iptables-save lines."""
    nat = iptables_tables(replace(spec, vips=(vip,)))["nat"]
    return {
        chain: [rule.render() for rule in rules]
        for chain, rules in nat.chains.items()
        if chain.startswith((SVC_CHAIN_PREFIX, SEP_CHAIN_PREFIX))
    }


def peer_change(spec: LbSpec, old: VirtualIp, new: VirtualIp) -> str:
    """The restore input that makes the same change as meshctl: the service's chains rewritten
    (declaring a chain flushes it under --noflush), chains no longer wanted flushed and deleted."""
    before, after = service_chains(spec, old), service_chains(spec, new)
    lines = ["*nat", *(f":{chain} - [0:0]" for chain in {**before, **after})]
    lines += [rule for rules in after.values() for rule in rules]
    lines += [f"-X {chain}" for chain in before if chain not in after]
    return "\n".join([*lines, "COMMIT", ""])


@contextmanager
def namespace(tag: str) -> Iterator[str]:
    name = f"{PREFIX}{tag}"
    netns.create(name)
    try:
        sh("ip", "-n", name, "link", "set", "lo", "up")
        yield name
    finally:
        netns.delete(name)


def measure(count: int, changes: int, budget: float, tmp: Path, rng: random.Random) -> Scale:
    """Full sync from empty and single-endpoint changes at S=count, each against its peer."""
    node_id, network_id = uuid.uuid4().hex[:8], uuid.uuid4().hex[:8]
    prefix = lb_netns_prefix(node_id)
    vips = list(services(count))
    spec = lb_spec(node_id, network_id, LB_ADDRESS, tuple(vips))
    spent: dict[str, float] = defaultdict(float)
    with namespace(f"node{count}") as node, namespace(f"peer{count}") as peer:
        try:
            Links().ensure_bridge(node, spec.bridge)
            Links().set_up(node, spec.bridge)
            reconciler = LbReconciler(timed_kernel(spent), "iptables", node_ns=node)
            rss_before = vm_rss_mib()
            start = time.perf_counter()
            reconciler.sync([spec], prefix)
            sync_s = time.perf_counter() - start
            rss = vm_rss_mib()
            verbs = dict(spent)
            dump = tmp / f"dump{count}"
            lb = f"--net={netns.path(spec.netns)}"
            dump.write_text(sh("nsenter", lb, "iptables-legacy-save"))
            rules = sum(line.startswith("-A ") for line in dump.read_text().splitlines())
            scale = Scale(count, rules, sync_s, restore(peer, dump), rss_before, rss, verbs)
            deadline = time.monotonic() + budget
            change = tmp / "change"
            for step in range(changes):
                if time.monotonic() > deadline:
                    break
                index = rng.randrange(count)
                old, new = vips[index], changed(vips[index], step)
                vips[index] = new
                spec = replace(spec, vips=tuple(vips))
                start = time.perf_counter()
                reconciler.sync([spec], prefix)
                scale.change_ms.append((time.perf_counter() - start) * 1000)
                change.write_text(peer_change(spec, old, new))
                scale.peer_change_ms.append(restore(peer, change, "--noflush") * 1000)
            scale.change_verbs = {k: v - verbs.get(k, 0.0) for k, v in spent.items()}
            if not reconciler.plan([spec], prefix).empty:
                raise RuntimeError(f"S={count}: the kernel does not hold the last change")
            return scale
        finally:
            for name in netns.list_namespaces(prefix):
                Links().delete_link(node, lb_node_end(network_id))
                netns.delete(name)


def pct(values: list[float], q: float) -> float:
    """The q-quantile (nearest rank): with fewer than 100 samples p99 is the maximum."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def report(scales: list[Scale], ipvs_reason: str | None) -> None:
    print(f"LB control plane, iptables backend: S services x {ENDPOINTS} backends, one LB netns;")
    print(f"{os.cpu_count()} cores shared with anything else running.\n")
    print("| S | rules | meshctl sync from empty (s) | iptables-legacy-restore (s) | ratio |"
          " controller RSS before → after sync (MiB) |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|")
    for s in scales:
        print(
            f"| {s.services:,} | {s.rules:,} | {s.sync_s:.2f} | {s.restore_s:.3f} "
            f"| {s.sync_s / s.restore_s:.0f}x | {s.rss_before_mib:.0f} → {s.rss_mib:.0f} |"
        )
    print("\nWhere the time goes (seconds in each kernel verb; other: Python planning):\n")
    print("| S | pass | " + " | ".join(VERBS) + " | other |")
    print("|---:|---|" + "---:|" * (len(VERBS) + 1))
    for s in scales:
        passes = [("full sync", s.sync_s, s.verbs)]
        if s.change_ms:
            per = {k: v / len(s.change_ms) for k, v in s.change_verbs.items()}
            passes.append(("one change, mean", statistics.mean(s.change_ms) / 1000, per))
        for label, total, verbs in passes:
            shown = " | ".join(f"{verbs.get(v, 0.0):.3f}" for v in VERBS)
            other = total - sum(verbs.values())
            print(f"| {s.services:,} | {label} | {shown} | {other:.3f} |")
    print("\nOne endpoint change: the sync call vs iptables-legacy-restore --noflush of the same")
    print("chains (one restore process per change, as kube-proxy runs it):\n")
    print("| S | changes | meshctl p50 (ms) | p99 (ms) | restore p50 (ms) | p99 (ms) | p50 ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for s in scales:
        if not s.change_ms:
            continue
        ours, theirs = statistics.median(s.change_ms), statistics.median(s.peer_change_ms)
        print(
            f"| {s.services:,} | {len(s.change_ms)} | {ours:.1f} | {pct(s.change_ms, 0.99):.1f} "
            f"| {theirs:.1f} | {pct(s.peer_change_ms, 0.99):.1f} | {ours / theirs:.1f}x |"
        )
    if len(scales) > 1 and scales[0].change_ms and scales[-1].change_ms:
        first, last = scales[0], scales[-1]
        growth = statistics.median(last.change_ms) / statistics.median(first.change_ms)
        peer = statistics.median(last.peer_change_ms) / statistics.median(first.peer_change_ms)
        print(
            f"\nchange p50 at S={last.services:,} / S={first.services:,}: meshctl {growth:.1f}x, "
            f"restore {peer:.1f}x (S grew {last.services / first.services:.0f}x)"
        )
    print(f"\nIPVS backend: not measured, {ipvs_reason}." if ipvs_reason else "")


VERBS = (
    "netns.create",
    "links.ensure_veth",
    "links.ensure_address",
    "sysctl.set",
    "iptables.list_owned",
    "iptables.apply",
    "conntrack.list_udp_flows",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", default="100,1000", help="comma-separated values of S")
    parser.add_argument("--changes", type=int, default=100, help="endpoint changes per S")
    parser.add_argument(
        "--change-budget", type=float, default=120, help="seconds of changes per S at most"
    )
    args = parser.parse_args()
    rng = random.Random(9)
    scales: list[Scale] = []
    with namespace("probe") as probe:
        ipvs_reason = Ipvs().available(probe)
    with tempfile.TemporaryDirectory() as tmp:
        for count in (int(s) for s in args.services.split(",")):
            scales.append(measure(count, args.changes, args.change_budget, Path(tmp), rng))
            print(f"S={count:,} done", flush=True)
    report(scales, ipvs_reason)


if __name__ == "__main__":
    main()
