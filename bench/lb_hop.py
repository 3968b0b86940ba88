"""Where a VIP's balancing sits, at the kernel's floor: wrk to one nginx task on another node,
directly and through a bare DNAT in three places, with nothing of meshctl's in the way.

Two node namespaces on an underlay bridge, each with a network bridge and a VXLAN device as the
overlay driver builds them (learning off, static FDB and neighbour entries, MTU 1450); a client
task on node1 and an nginx task on node2 (bench/datapath.py's config: one worker, keep-alive, a
612-byte file). wrk (`-t2 -c32`) runs in the client's namespace against:

- **direct**: the task's overlay address (the peer);
- **LB namespace on a leg**: a namespace on node1's bridge by a veth holds the VIP, DNATs to the
  task and masquerades (client and task share the bridge). This is meshctl's design
  (ARCHITECTURE: one LB namespace per network per node, as Docker since 18.06) with one rule
  instead of meshctl's map and chains: the least any LB namespace costs;
- **the bridge's namespace as the LB**: the VIP on node1's bridge itself, DNAT and masquerade
  there, no leg: what moving the bridge into the LB namespace would save. Only with
  `--bridge-nf-call-iptables 0`: with 1, br_netfilter DNATs the bridged frame and the
  masqueraded connection finds no route;
- **the client's own namespace**: DNAT in its output hook, no hop (Docker before 18.06,
  kube-proxy's place per node).

Each round runs every path once, back to back, in alternating order; the ratios to direct are
taken per round and their median printed. `--bridge-nf-call-iptables` sets the node namespaces'
`net.bridge.bridge-nf-call-iptables` (1, the default, as on a Docker host). Needs root, nginx,
wrk and curl.

    /opt/meshvenv/bin/python bench/lb_hop.py [--rounds 12] [--seconds 3]
        [--bridge-nf-call-iptables 1]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.datapath import Run, namespace, nginx, sh, wait_serving, wrk  # noqa: E402

SUBNET = "10.77.0"
CLIENT, TASK, LB_LEG, BRIDGE_ADDRESS = (f"{SUBNET}.{n}" for n in (10, 20, 2, 3))
VIP_LEG, VIP_BRIDGE, VIP_CLIENT = (f"{SUBNET}.{n}" for n in (100, 101, 102))
UNDERLAY = "192.168.77"
MTU = 1450

DIRECT = "direct to the task over the overlay (peer)"
LEG = "LB namespace on a leg (meshctl's design)"
BRIDGE = "the bridge's namespace as the LB (no leg)"
CLIENT_NS = "DNAT in the client's own namespace"

DNAT_AND_MASQUERADE = """table ip hop {{
    chain prerouting {{ type nat hook prerouting priority -100; ip daddr {vip} dnat to {task}; }}
    chain postrouting {{ type nat hook postrouting priority 100; ct status dnat masquerade; }}
}}
"""
DNAT_IN_OUTPUT = """table ip hop {{
    chain output {{ type nat hook output priority -100; ip daddr {vip} dnat to {task}; }}
}}
"""


def ip(ns: str, *args: str) -> None:
    sh("ip", "-n", ns, *args)


def in_ns(ns: str, *cmd: str) -> str:
    return sh("ip", "netns", "exec", ns, *cmd)


def nft(ns: str, ruleset: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=ruleset, text=True,
                   check=True)  # fmt: skip


def mac(ns: str, dev: str) -> str:
    return in_ns(ns, "cat", f"/sys/class/net/{dev}/address").strip()


def veth(ns_a: str, a: str, ns_b: str, b: str) -> None:
    sh("ip", "link", "add", a, "netns", ns_a, "mtu", str(MTU), "type", "veth",
       "peer", "name", b, "netns", ns_b, "mtu", str(MTU))  # fmt: skip


class Overlay:
    """Two nodes, one VXLAN network: what meshctl's overlay driver programs, by hand."""

    def __init__(self, stack: ExitStack, bridge_nf: str) -> None:
        self.under = stack.enter_context(namespace("under"))
        self.nodes = [stack.enter_context(namespace(f"node{i}")) for i in (1, 2)]
        ip(self.under, "link", "add", "ub", "type", "bridge")
        ip(self.under, "link", "set", "ub", "up")
        for index, node in enumerate(self.nodes, start=1):
            sh("ip", "link", "add", "u", "netns", node, "type", "veth",
               "peer", "name", f"u{index}", "netns", self.under)  # fmt: skip
            ip(self.under, "link", "set", f"u{index}", "master", "ub", "up")
            ip(node, "addr", "add", f"{UNDERLAY}.{index}/24", "dev", "u")
            ip(node, "link", "set", "u", "up")
            ip(node, "link", "add", "br0", "mtu", str(MTU), "type", "bridge")
            ip(node, "link", "set", "br0", "up")
            ip(node, "link", "add", "vx0", "mtu", str(MTU), "type", "vxlan", "id", "42",
               "local", f"{UNDERLAY}.{index}", "dstport", "4789", "nolearning")  # fmt: skip
            ip(node, "link", "set", "vx0", "master", "br0", "up")
            in_ns(node, "sysctl", "-qw", f"net.bridge.bridge-nf-call-iptables={bridge_nf}")
        self.neighbours: dict[str, tuple[int, str]] = {}  # address -> (node index, MAC)

    def attach(self, node_index: int, ns: str, address: str) -> None:
        """A task-like namespace on node node_index's bridge, known to the other node."""
        node = self.nodes[node_index]
        end = f"t{len(self.neighbours)}"
        veth(node, end, ns, "eth0")
        ip(node, "link", "set", end, "master", "br0", "up")
        ip(ns, "link", "set", "lo", "up")
        ip(ns, "addr", "add", f"{address}/24", "dev", "eth0")
        ip(ns, "link", "set", "eth0", "up")
        self.announce(node_index, address, mac(ns, "eth0"))

    def announce(self, node_index: int, address: str, lladdr: str) -> None:
        """The other node's static FDB entry for lladdr on its VXLAN device (to this node's
        underlay address), as the overlay driver writes it; the bridge learns the rest."""
        other = self.nodes[1 - node_index]
        underlay = f"{UNDERLAY}.{node_index + 1}"
        sh("bridge", "-n", other, "fdb", "add", lladdr, "dev", "vx0", "dst", underlay,
           "self", "permanent")  # fmt: skip
        self.neighbours[address] = (node_index, lladdr)

    def know_remote(self, ns: str, dev: str, node_index: int) -> None:
        """Static neighbour entries in ns for every address on the other node."""
        for address, (index, lladdr) in self.neighbours.items():
            if index != node_index:
                ip(ns, "neigh", "replace", address, "lladdr", lladdr, "dev", dev,
                   "nud", "permanent")  # fmt: skip


def build(stack: ExitStack, tmp: Path, bridge_nf: str) -> tuple[str, dict[str, str]]:
    """The two-node overlay with its paths; returns the client's namespace and label -> address."""
    overlay = Overlay(stack, bridge_nf)
    node1 = overlay.nodes[0]
    client = stack.enter_context(namespace("client"))
    task = stack.enter_context(namespace("task"))
    lb = stack.enter_context(namespace("lb"))
    overlay.attach(1, task, TASK)
    overlay.attach(0, client, CLIENT)
    overlay.attach(0, lb, LB_LEG)
    paths = {DIRECT: TASK, LEG: VIP_LEG, CLIENT_NS: VIP_CLIENT}
    if bridge_nf == "0":
        ip(node1, "addr", "add", f"{BRIDGE_ADDRESS}/24", "dev", "br0")
        overlay.announce(0, BRIDGE_ADDRESS, mac(node1, "br0"))
        paths[BRIDGE] = VIP_BRIDGE
    for ns, dev in ((client, "eth0"), (lb, "eth0"), (task, "eth0"), (node1, "br0")):
        overlay.know_remote(ns, dev, 1 if ns == task else 0)
    stack.enter_context(nginx(task, TASK, tmp / "www"))
    # The leg: the VIP on its interface (it answers ARP for it), DNAT and masquerade.
    in_ns(lb, "sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv4.conf.all.send_redirects=0",
          "net.ipv4.conf.eth0.send_redirects=0")  # fmt: skip
    ip(lb, "addr", "add", f"{VIP_LEG}/32", "dev", "eth0")
    nft(lb, DNAT_AND_MASQUERADE.format(vip=VIP_LEG, task=TASK))
    if BRIDGE in paths:
        no_redirects = ("net.ipv4.conf.all.send_redirects=0", "net.ipv4.conf.br0.send_redirects=0")
        in_ns(node1, "sysctl", "-qw", "net.ipv4.ip_forward=1", *no_redirects)
        ip(node1, "addr", "add", f"{VIP_BRIDGE}/32", "dev", "br0")
        nft(node1, DNAT_AND_MASQUERADE.format(vip=VIP_BRIDGE, task=TASK))
    # The client's own: its output hook DNATs; the VIP is routed on eth0 (the DNAT has already
    # changed the destination by the time the neighbour is looked up).
    nft(client, DNAT_IN_OUTPUT.format(vip=VIP_CLIENT, task=TASK))
    return client, paths


def report(runs: list[Run], args: argparse.Namespace, labels: list[str]) -> None:
    rounds = [runs[i : i + len(labels)] for i in range(0, len(runs), len(labels))]
    by_label = [{r.label: r for r in one} for one in rounds]
    print(
        f"\n{args.rounds} rounds of wrk -t2 -c{args.connections} -d{args.seconds}s, "
        f"bridge-nf-call-iptables={args.bridge_nf_call_iptables} in the node namespaces\n"
    )
    print("| path | requests/s, median (min–max) | to direct, median of the rounds (min–max) |")
    print("|---|---:|---:|")
    for label in labels:
        rps = [r[label].rps for r in by_label]
        ratios = [r[label].rps / r[DIRECT].rps for r in by_label]
        spread = f"({min(ratios):.2f}–{max(ratios):.2f})"
        print(
            f"| {label} | {statistics.median(rps):,.0f} ({min(rps):,.0f}–{max(rps):,.0f}) | "
            f"{statistics.median(ratios):.2f} {spread} |"
        )
    errors = sum(r.errors for r in runs)
    if errors:
        print(f"\n{errors} wrk errors in all")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=3, help="per wrk run")
    parser.add_argument("--rounds", type=int, default=12, help="alternating runs per path")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--bridge-nf-call-iptables", choices=("0", "1"), default="1")
    args = parser.parse_args()
    for tool in ("nginx", "wrk", "curl", "nft"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is missing: apt-get install nginx-light wrk curl nftables")
    runs: list[Run] = []
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        client, paths = build(stack, tmp, args.bridge_nf_call_iptables)
        for address in paths.values():
            wait_serving(client, address)
        labels = list(paths)
        for index in range(args.rounds):
            order = labels if index % 2 == 0 else labels[::-1]
            done = {label: wrk(client, paths[label], args, label) for label in order}
            runs.extend(done[label] for label in labels)
    if BRIDGE not in paths:
        print(f"not measured: {BRIDGE} (needs --bridge-nf-call-iptables 0)")
    report(runs, args, labels)


if __name__ == "__main__":
    main()
