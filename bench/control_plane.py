"""Load-balancer control plane: meshctl's LbReconciler against the kernel's restore tools.

For each S, builds a node namespace with a network bridge and lets `LbReconciler.sync` program a
fresh LB namespace from empty with S services x 10 backends (timed, with the time each kernel verb
took). The peer, in the same run, loads the same state into a fresh namespace with the backend's
own tool: iptables-legacy-save | iptables-legacy-restore (iptables backend), nft list table |
nft -f (nftables backend: the ruleset in meshctl's layout, as written by hand, in one
transaction), or ipvsadm -Sn | ipvsadm -R (ipvs backend: the IPVS services only; meshctl's
figure also holds its mark and SNAT rules and the VIP addresses, shown apart per kernel verb).

Then single-endpoint changes (drain or undrain, remove or re-add one backend of a random
service), each a real store write: `store.put` into a SqliteStore, a watcher thread that wakes on
`store.watch` as the daemon's `_watch_store` does, rebuilds the spec and calls the reconciler's
`sync_changed` (or `sync` where it is missing). Timed from just before the put until that call
returns: the kernel holds the change. Peer: the same change by one tool process
(iptables-legacy-restore --noflush of the service's chains; nft -f of them; one ipvsadm -e,
-a or -d).
A warm-up sync of 10 services (and its peer) runs first, untimed. Prints markdown tables.
Needs root; the ipvs backend needs IPVS (run it in the QEMU lane's kernel
with bench/vm); without it the bench says why and exits 0.

    /opt/meshvenv/bin/python bench/control_plane.py [--backend iptables|nftables] \
        [--services 100,1000]
    MESHCTL_VENV=/opt/meshvenv bench/vm /opt/meshvenv/bin/python bench/control_plane.py \
        --backend ipvs --services 100,1000
"""

from __future__ import annotations

import argparse
import os
import platform
import queue
import random
import statistics
import subprocess
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Any, cast

from kernel import netns
from kernel.gcpause import gc_paused
from kernel.ipvs import Ipvs
from kernel.links import Links
from kernel.nftables_rules import table_change, transaction_lines
from kernel.system import Kernel, real_kernel
from meshctl.lb.backends import backend_named
from meshctl.lb.iptables import SEP_CHAIN_PREFIX, SVC_CHAIN_PREFIX, iptables_tables
from meshctl.lb.ipvs import fwmark
from meshctl.lb.nftables import NftablesBackend
from meshctl.lb.plan import LbPlan
from meshctl.lb.reconcile import LbReconciler
from meshctl.lb.spec import Backend, LbSpec, VirtualIp, lb_spec
from meshctl.naming import lb_netns_prefix, lb_node_end
from meshctl.store import Put, Store, Value
from meshctl.store.sqlite import SqliteStore

PREFIX = f"mbench{os.getpid()}-"
ENDPOINTS = 10
LB_ADDRESS = "10.0.0.2/8"  # a /8 holds 10,000 VIPs and 100,000 backends
VIP_BASE, BACKEND_BASE = 0x0A010000, 0x0A100000  # 10.1.0.0 and 10.16.0.0
KIND = "bench-service"
SPEC = lb_spec(
    "benchnod", "benchnet", LB_ADDRESS, ()
)  # a frame to render one service in  # the store kind the bench writes its services under
# The kernel verb whose writes the peer tool makes too; the rest of meshctl's time it does not.
PEER_VERB = {
    "iptables": "iptables.apply_tables",
    "ipvs": "ipvs.apply",
    "nftables": "nftables.apply",
}
PEER_TOOL = {"iptables": "iptables-legacy-restore", "ipvs": "ipvsadm -R", "nftables": "nft -f"}
CHANGE_TOOL = {
    "iptables": "iptables-legacy-restore --noflush",
    "ipvs": "ipvsadm -e/-a/-d",
    "nftables": "nft -f",
}


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
    objects: str  # what the peer restored, e.g. "22,005 rules"
    sync_s: float
    restore_s: float
    rss_before_mib: float
    rss_mib: float
    verbs: dict[str, float]  # seconds per kernel verb in the full sync
    method: str = ""  # the reconciler call each change was measured on
    change_ms: list[float] = field(default_factory=list)  # store.put → the kernel holds it
    seen_ms: list[float] = field(default_factory=list)  # store.put → the watcher woke
    peer_change_ms: list[float] = field(default_factory=list)
    change_verbs: dict[str, float] = field(default_factory=dict)  # seconds, all changes


def sh(*cmd: str, stdin: str | None = None) -> str:
    return subprocess.run(cmd, input=stdin, check=True, capture_output=True, text=True).stdout


def in_ns(ns: str, *cmd: str) -> list[str]:
    """cmd run inside the namespace ns."""
    return ["nsenter", f"--net={netns.path(ns)}", *cmd]


def timed_run(cmd: Sequence[str], stdin: Path | None = None) -> float:
    """Seconds cmd takes, process start included (as a controller that forks a tool pays it)."""
    with stdin.open() if stdin else open(os.devnull) as data:
        start = time.perf_counter()
        subprocess.run(cmd, stdin=data, check=True)
        return time.perf_counter() - start


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


def encode(vip: VirtualIp) -> Value:
    """A service as the bench stores it."""
    backends = [[b.address, b.weight] for b in vip.backends]
    return {"name": vip.service_name, "vip": vip.vip, "backends": backends}


def decode(service_id: str, value: Value) -> VirtualIp:
    """The VirtualIp a stored service stands for, as a controller rebuilds it."""
    backends = tuple(Backend(a, w) for a, w in value["backends"])
    return VirtualIp(service_id, value["name"], value["vip"], backends)


def vm_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def service_chains(spec: LbSpec, vip: VirtualIp) -> dict[str, list[str]]:
    """The nat chains of one service, rendered as iptables-save lines."""
    nat = iptables_tables(replace(spec, vips=(vip,)))["nat"]
    return {
        chain: [rule.render() for rule in rules]
        for chain, rules in nat.chains.items()
        if chain.startswith((SVC_CHAIN_PREFIX, SEP_CHAIN_PREFIX))
    }


def iptables_change(spec: LbSpec, old: VirtualIp, new: VirtualIp, tmp: Path) -> list[str]:
    """iptables-legacy-restore making the same change as meshctl: the service's chains rewritten
    (declaring a chain flushes it under --noflush), chains no longer wanted flushed and deleted."""
    before, after = service_chains(spec, old), service_chains(spec, new)
    lines = ["*nat", *(f":{chain} - [0:0]" for chain in {**before, **after})]
    lines += [rule for rules in after.values() for rule in rules]
    lines += [f"-X {chain}" for chain in before if chain not in after]
    (tmp / "change").write_text("\n".join([*lines, "COMMIT", ""]))
    return ["iptables-legacy-restore", "-w", "5", "--noflush"]


def nft_change(old: VirtualIp, new: VirtualIp, tmp: Path) -> list[str]:
    """nft -f making the same change as meshctl: the service's chains rewritten, endpoint chains
    no longer wanted deleted (its VIP's map element stays: its service chain is the same)."""
    backend = NftablesBackend()
    before = backend.render(replace(SPEC, vips=(old,)), None)
    after = backend.render(replace(SPEC, vips=(new,)), None)
    (tmp / "change").write_text("\n".join(transaction_lines(table_change(after, before))) + "\n")
    return ["nft", "-f", "-"]


def ipvsadm_change(spec: LbSpec, old: VirtualIp, new: VirtualIp) -> list[str]:
    """The one ipvsadm command making the same change as meshctl: a backend edited, added or
    removed (masquerading, to the connection's own port, as meshctl's destinations)."""
    service = ["-f", str(fwmark(spec, new))]
    before = {b.address: b for b in old.backends}
    for backend in new.backends:
        if before.get(backend.address) != backend:
            verb = "-e" if backend.address in before else "-a"
            target = ["-r", f"{backend.address}:0", "-m", "-w", str(backend.weight)]
            return ["ipvsadm", verb, *service, *target]
    (gone,) = before.keys() - {b.address for b in new.backends}
    return ["ipvsadm", "-d", *service, "-r", f"{gone}:0"]


@contextmanager
def namespace(tag: str) -> Iterator[str]:
    name = f"{PREFIX}{tag}"
    netns.create(name)
    try:
        sh("ip", "-n", name, "link", "set", "lo", "up")
        yield name
    finally:
        netns.delete(name)


class Watcher:
    """The controller's side of a change: wake on a store event, rebuild the spec, reconcile.

    Follows the store from its revision at construction, as the daemon's `_watch_store` does;
    each pass puts (woke, kernel holds it) perf_counter times, or the error, on `done`.
    """

    def __init__(
        self, store: Store, reconcile: Callable[[Sequence[LbSpec], str], LbPlan], spec: LbSpec
    ) -> None:
        self.store = store
        self.reconcile = reconcile
        self.spec = spec
        self.prefix = spec.netns.rsplit("-", 1)[0] + "-"
        self.done: queue.Queue[tuple[float, float] | BaseException] = queue.Queue()
        self._vips = {v.service_id: v for v in spec.vips}
        self._revision = store.revision()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watcher", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            events = self.store.watch(self._revision, timeout=0.2)
            if not events:
                continue
            woke = time.perf_counter()
            self._revision = events[-1].revision
            try:
                for event in events:
                    if event.kind == KIND and event.value is not None:
                        self._vips[event.name] = decode(event.name, event.value)
                # The network's whole spec, as the controller builds it from the store, and
                # its reconcile, with the cyclic GC paused as in the controller's pass.
                with gc_paused():
                    self.spec = replace(self.spec, vips=tuple(self._vips.values()))
                    self.reconcile([self.spec], self.prefix)
            except BaseException as err:  # handed to the bench's thread, which stops
                self.done.put(err)
                return
            self.done.put((woke, time.perf_counter()))

    def __enter__(self) -> Watcher:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()


def full_sync(
    backend: str, reconciler: LbReconciler, spec: LbSpec, prefix: str, peer: str, tmp: Path
) -> tuple[float, float, str]:
    """Seconds meshctl's sync from empty takes, seconds the peer tool takes to restore what it
    wrote into peer, and what that was."""
    start = time.perf_counter()
    with gc_paused():  # as the controller's every pass runs
        reconciler.sync([spec], prefix)
    sync_s = time.perf_counter() - start
    dump = tmp / "dump"
    if backend == "nftables":
        # What nft prints is the ruleset in meshctl's layout as one would write it by hand: one
        # table block, loaded by one nft -f.
        dump.write_text(sh(*in_ns(spec.netns, "nft", "list", "table", "ip", "meshctl")))
        lines = dump.read_text().splitlines()
        chains = sum(line.strip().startswith("chain ") for line in lines)
        what = f"{chains:,} chains, {len(spec.vips):,} map elements"
        return sync_s, timed_run(in_ns(peer, "nft", "-f", "-"), dump), what
    if backend == "ipvs":
        dump.write_text(sh(*in_ns(spec.netns, "ipvsadm", "-Sn")))
        lines = dump.read_text().splitlines()
        services = sum(line.startswith("-A ") for line in lines)
        dests = sum(line.startswith("-a ") for line in lines)
        what = f"{services:,} services, {dests:,} destinations"
        return sync_s, timed_run(in_ns(peer, "ipvsadm", "-R"), dump), what
    dump.write_text(sh(*in_ns(spec.netns, "iptables-legacy-save")))
    rules = sum(line.startswith("-A ") for line in dump.read_text().splitlines())
    restore = in_ns(peer, "iptables-legacy-restore", "-w", "5")
    return sync_s, timed_run(restore, dump), f"{rules:,} rules"


def measure_changes(
    backend: str,
    scale: Scale,
    store: Store,
    watcher: Watcher,
    vips: list[VirtualIp],
    peer: str,
    changes: int,
    budget: float,
    rng: random.Random,
    tmp: Path,
) -> None:
    """Up to `changes` single-endpoint changes within budget seconds, each written to the store
    and timed until the watcher's reconcile returns, then made by the peer tool in peer."""
    deadline = time.monotonic() + budget
    spec = watcher.spec
    for step in range(changes):
        if time.monotonic() > deadline:
            break
        index = rng.randrange(len(vips))
        old, new = vips[index], changed(vips[index], step)
        vips[index] = new
        start = time.perf_counter()
        store.put(KIND, new.service_id, encode(new))
        result = watcher.done.get(timeout=600)
        if isinstance(result, BaseException):
            raise RuntimeError(f"S={len(vips)}: the watcher failed") from result
        woke, held = result
        scale.seen_ms.append((woke - start) * 1000)
        scale.change_ms.append((held - start) * 1000)
        if backend == "ipvs":
            peer_s = timed_run(in_ns(peer, *ipvsadm_change(spec, old, new)))
        elif backend == "nftables":
            peer_s = timed_run(in_ns(peer, *nft_change(old, new, tmp)), tmp / "change")
        else:
            tool = iptables_change(spec, old, new, tmp)
            peer_s = timed_run(in_ns(peer, *tool), tmp / "change")
        scale.peer_change_ms.append(peer_s * 1000)


def measure(
    backend: str, count: int, changes: int, budget: float, tmp: Path, rng: random.Random
) -> Scale:
    """Full sync from empty and single-endpoint changes at S=count, each against its peer."""
    node_id, network_id = uuid.uuid4().hex[:8], uuid.uuid4().hex[:8]
    prefix = lb_netns_prefix(node_id)
    vips = list(services(count))
    spec = lb_spec(node_id, network_id, LB_ADDRESS, tuple(vips))
    spent: dict[str, float] = defaultdict(float)
    with namespace(f"node{count}") as node, namespace(f"peer{count}") as peer:
        try:
            Links().ensure_bridge(node, spec.bridge, alias=spec.mark)
            Links().set_up(node, spec.bridge)
            reconciler = LbReconciler(timed_kernel(spent), backend_named(backend), node_ns=node)
            rss_before = vm_rss_mib()
            sync_s, restore_s, objects = full_sync(backend, reconciler, spec, prefix, peer, tmp)
            scale = Scale(count, objects, sync_s, restore_s, rss_before, vm_rss_mib(), dict(spent))
            # The fast path between full syncs where the reconciler has one.
            incremental = hasattr(reconciler, "sync_changed")
            scale.method = "sync_changed" if incremental else "sync"
            reconcile = reconciler.sync_changed if incremental else reconciler.sync
            with SqliteStore(str(tmp / f"state{count}.db")) as store:
                store.txn([Put(KIND, v.service_id, encode(v)) for v in vips])
                watcher = Watcher(store, reconcile, spec)  # follows the store from here
                with watcher:
                    measure_changes(
                        backend, scale, store, watcher, vips, peer, changes, budget, rng, tmp
                    )
                spec = watcher.spec
            scale.change_verbs = {k: v - scale.verbs.get(k, 0.0) for k, v in spent.items()}
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


def machine() -> str:
    """The CPU and kernel the figures come from (a QEMU TCG CPU emulates every instruction)."""
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "unknown CPU",
    )
    return f"{os.cpu_count()} x {cpu}, Linux {platform.release()}"


def report(backend: str, scales: list[Scale]) -> None:
    peer_verb, tool = PEER_VERB[backend], PEER_TOOL[backend]
    print(f"LB control plane, {backend} backend: S services x {ENDPOINTS} backends, one LB netns;")
    print(f"{machine()}, shared with anything else running.\n")
    print(
        f"| S | peer restores | meshctl sync from empty (s) | {tool} (s) | ratio "
        f"| of the sync: {peer_verb} (s) | its ratio | controller RSS before → after (MiB) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s in scales:
        own = s.verbs.get(peer_verb, 0.0)
        print(
            f"| {s.services:,} | {s.objects} | {s.sync_s:.2f} | {s.restore_s:.3f} "
            f"| {s.sync_s / s.restore_s:.1f}x | {own:.2f} | {own / s.restore_s:.1f}x "
            f"| {s.rss_before_mib:.0f} → {s.rss_mib:.0f} |"
        )
    passes: list[tuple[Scale, str, float, dict[str, float]]] = []
    for s in scales:
        passes.append((s, "full sync", s.sync_s, s.verbs))
        if s.change_ms:
            per = {k: v / len(s.change_ms) for k, v in s.change_verbs.items()}
            passes.append((s, "one change, mean", statistics.mean(s.change_ms) / 1000, per))
    # A verb gets its column where it takes 1 % of some pass; the others are summed.
    shown = sorted(
        {v for _, _, total, verbs in passes for v, t in verbs.items() if t >= total / 100}
    )
    print("\nWhere the time goes (seconds in each kernel verb; for a change, from store.put on;")
    print("other: Python planning, the spec rebuild and the store, i.e. the wall time minus every")
    print("verb; a full sync makes the leg, sysctls and addresses in a thread beside the iptables")
    print("batch, so those columns overlap it and `other` can fall below zero):\n")
    print("| S | pass | " + " | ".join(shown) + " | other verbs | other |")
    print("|---:|---|" + "---:|" * (len(shown) + 2))
    for s, label, total, verbs in passes:
        cells = " | ".join(f"{verbs.get(v, 0.0):.4f}" for v in shown)
        rest = sum(t for v, t in verbs.items() if v not in shown)
        other = total - sum(verbs.values())
        print(f"| {s.services:,} | {label} | {cells} | {rest:.4f} | {other:.4f} |")
    method = scales[0].method if scales else "sync"
    print(f"\nOne endpoint change, from store.put until `{method}` returns (the kernel holds it;")
    print("woke: store.put until the watcher's store.watch returned), vs the same change made by")
    print(f"one {CHANGE_TOOL[backend]} process:\n")
    print("| S | changes | woke p50 (ms) | woke p99 (ms) | meshctl p50 (ms) | p99 (ms) "
          "| peer p50 (ms) | p99 (ms) | p50 ratio |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s in scales:
        if not s.change_ms:
            continue
        ours, theirs = statistics.median(s.change_ms), statistics.median(s.peer_change_ms)
        print(
            f"| {s.services:,} | {len(s.change_ms)} | {statistics.median(s.seen_ms):.1f} "
            f"| {pct(s.seen_ms, 0.99):.1f} | {ours:.1f} | {pct(s.change_ms, 0.99):.1f} "
            f"| {theirs:.1f} | {pct(s.peer_change_ms, 0.99):.1f} | {ours / theirs:.1f}x |"
        )
    measured = [s for s in scales if s.change_ms]
    if len(measured) > 1:
        first, last = measured[0], measured[-1]
        growth = statistics.median(last.change_ms) / statistics.median(first.change_ms)
        peer = statistics.median(last.peer_change_ms) / statistics.median(first.peer_change_ms)
        print(
            f"\nchange p50 at S={last.services:,} / S={first.services:,}: meshctl {growth:.1f}x, "
            f"peer {peer:.1f}x (S grew {last.services / first.services:.0f}x)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("iptables", "ipvs", "nftables"), default="iptables")
    parser.add_argument("--services", default="100,1000", help="comma-separated values of S")
    parser.add_argument("--changes", type=int, default=100, help="endpoint changes per S")
    parser.add_argument(
        "--change-budget", type=float, default=120, help="seconds of changes per S at most"
    )
    args = parser.parse_args()
    backend: str = args.backend
    if backend == "ipvs":
        with namespace("probe") as probe:
            reason = Ipvs().available(probe)
        if reason:
            print(
                f"ipvs backend: not measured, {reason}. Run it in the QEMU lane's kernel: "
                "bench/vm <python> bench/control_plane.py --backend ipvs"
            )
            return
    rng = random.Random(9)
    scales: list[Scale] = []
    with tempfile.TemporaryDirectory() as tmp:
        # Untimed: the first run of each tool in a fresh VM loads it from disk (1.5 s for
        # iptables-legacy-restore under emulation), which neither side should be charged.
        measure(backend, 10, 0, 0, Path(tmp), random.Random(0))
        for count in (int(s) for s in args.services.split(",")):
            scales.append(measure(backend, count, args.changes, args.change_budget, Path(tmp), rng))
            print(f"S={count:,} done", flush=True)
    report(backend, scales)


if __name__ == "__main__":
    main()
