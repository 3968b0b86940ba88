"""First-packet latency through a VIP with S services in the LB namespace, against direct.

For each S, `LbReconciler.sync` programs a fresh LB namespace on a node's bridge with S services:
S-1 with 10 dummy backends each (never contacted) and one probed service over a real backend
(nginx), placed last in the VIP order, the worst case for the linear rule chains every new
connection walks. From a client namespace on the same bridge, each sample is a fresh TCP
connect() (SYN → SYN-ACK) to VIP:80 or to the backend directly (the peer), alternating, timed
in the client; closed with a reset so no TIME_WAIT piles up. Prints a markdown table of p50 and
p99 per S. The ipvs backend runs only where the kernel has IPVS (otherwise it says why and
exits 0). Needs root and nginx (nginx-light).

    /opt/meshvenv/bin/python bench/scale.py [--services 100,10000]
        [--backend iptables|nftables|ipvs] [--samples 2000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import struct
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from kernel import netns
from kernel.ipvs import Ipvs
from kernel.links import Links
from kernel.neighbours import Neighbours
from kernel.system import real_kernel
from meshctl.lb.backends import backend_named
from meshctl.lb.reconcile import LbReconciler
from meshctl.lb.spec import Backend, VirtualIp, lb_spec
from meshctl.naming import lb_netns_prefix, lb_node_end

# bench/ is not a package of the product: its modules import each other from the repo root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.control_plane import LB_ADDRESS, pct, services  # noqa: E402
from bench.datapath import attach, namespace, nginx, wait_serving  # noqa: E402

CLIENT, BACKEND = "10.0.0.50", "10.0.0.11"  # on the bridge, inside LB_ADDRESS's /8
PROBED_VIP = "10.255.255.254"  # the highest VIP of the /8: last in every per-VIP chain
WARMUP = 20  # connects per target before sampling: ARP and the first conntrack entries
RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST, no TIME_WAIT


@dataclass
class Sample:
    """The first-packet figures of one S."""

    services: int
    sync_s: float
    vip_us: list[float]
    direct_us: list[float]


def connect_us(address: str) -> float:
    """Microseconds a fresh TCP connect() to address:80 takes (SYN out until SYN-ACK back)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET)
        start = time.perf_counter_ns()
        sock.connect((address, 80))
        return (time.perf_counter_ns() - start) / 1000


def sample(samples: int) -> tuple[list[float], list[float]]:
    """In the client's namespace: samples connects each to the VIP and direct, alternating so
    both see the same load from whatever else runs on the machine."""
    for _ in range(WARMUP):
        connect_us(PROBED_VIP)
        connect_us(BACKEND)
    vip, direct = [], []
    for _ in range(samples):
        vip.append(connect_us(PROBED_VIP))
        direct.append(connect_us(BACKEND))
    return vip, direct


@dataclass(frozen=True)
class World:
    """The namespaces that outlive each S: the node with the network's bridge, client, server."""

    node: str
    client: str
    server: str
    network_id: str


def measure(count: int, backend: str, samples: int, world: World) -> Sample:
    """Programs a fresh LB namespace with count services, samples, and removes it again."""
    node, client, node_id = world.node, world.client, uuid.uuid4().hex[:8]
    probed = VirtualIp("svc-probed", "probed", PROBED_VIP, (Backend(BACKEND),))
    spec = lb_spec(node_id, world.network_id, LB_ADDRESS, (*services(count - 1), probed))
    assert spec.vips[-1] == probed, "the probed VIP must come last in the VIP order"
    try:
        start = time.perf_counter()
        reconciler = LbReconciler(real_kernel(), backend_named(backend), node_ns=node)
        reconciler.sync([spec], lb_netns_prefix(node_id))
        sync_s = time.perf_counter() - start
        wait_serving(client, PROBED_VIP)
        vip, direct = netns.run_in(client, sample, samples)
        return Sample(count, sync_s, vip, direct)
    finally:
        links = Links()
        for name in netns.list_namespaces(lb_netns_prefix(node_id)):
            links.delete_link(node, lb_node_end(world.network_id))
            netns.delete(name)
        # The next S's LB leg has a new MAC for the same VIP and LB address: forget the old one.
        lb_address = LB_ADDRESS.split("/")[0]
        neighbours = Neighbours()
        for ns, address in ((client, PROBED_VIP), (world.server, lb_address)):
            known = neighbours.list_neighbours(ns, "eth0")
            neighbours.delete_neighbours(ns, [n for n in known if n.address == address])


def report(results: list[Sample], backend: str, samples: int) -> None:
    print(f"First-packet latency, {backend} backend: fresh TCP connect() (SYN → SYN-ACK) from a")
    print(f"client namespace on the bridge, {samples} samples per path alternating VIP / direct;")
    print("the probed VIP is the last of S (S-1 services x 10 dummy backends);")
    print(f"{os.cpu_count()} cores shared with anything else running.\n")
    print("| S | LB sync (s) | direct p50 (µs) | p99 (µs) | VIP p50 (µs) | p99 (µs) "
          "| VIP p50 − direct p50 (µs) | p50 ratio |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        vip, direct = statistics.median(r.vip_us), statistics.median(r.direct_us)
        print(
            f"| {r.services:,} | {r.sync_s:.1f} | {direct:.0f} | {pct(r.direct_us, 0.99):.0f} "
            f"| {vip:.0f} | {pct(r.vip_us, 0.99):.0f} | {vip - direct:.0f} | {vip / direct:.2f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", default="100,10000", help="comma-separated values of S")
    parser.add_argument("--backend", choices=("iptables", "ipvs", "nftables"), default="iptables")
    parser.add_argument("--samples", type=int, default=2000, help="connects per path and S")
    args = parser.parse_args()
    backend: str = args.backend
    if shutil.which("nginx") is None:
        sys.exit("nginx is missing: apt-get install nginx-light")
    counts = [int(s) for s in args.services.split(",")]
    if min(counts) < 1:
        sys.exit("--services: each S must be at least 1 (the probed service)")
    links = Links()
    results: list[Sample] = []
    with ExitStack() as stack:
        node = stack.enter_context(namespace("node"))
        if backend == "ipvs" and (reason := Ipvs().available(node)):
            print(f"ipvs backend: not measured, {reason}.")
            return
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        client = stack.enter_context(namespace("client"))
        server = stack.enter_context(namespace("backend"))
        network_id = uuid.uuid4().hex[:8]  # one bridge for every S; a fresh LB netns per S
        frame = lb_spec("bench", network_id, LB_ADDRESS, ())
        bridge = frame.bridge
        links.ensure_bridge(node, bridge, alias=frame.mark)
        links.set_up(node, bridge)
        subnet = int(LB_ADDRESS.split("/")[1])  # the VIPs' subnet: the client reaches them on-link
        attach(links, node, bridge, client, CLIENT, subnet)
        attach(links, node, bridge, server, BACKEND, subnet)
        stack.enter_context(nginx(server, BACKEND, tmp / "www"))
        wait_serving(client, BACKEND)
        world = World(node, client, server, network_id)
        for count in counts:
            results.append(measure(count, backend, args.samples, world))
            print(f"S={count:,} done", flush=True)
    report(results, backend, args.samples)


if __name__ == "__main__":
    main()
