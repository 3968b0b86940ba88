"""Load-balancer data path, iptables backend: HTTP through a VIP vs the same backends directly.

Builds a node namespace with a network bridge, three backend namespaces on it each running nginx
(one worker) serving a small static file, and a client namespace on the same bridge; the LB
namespace is built by `LbReconciler.sync` with two VIPs: one over the first backend only (the
same server capacity as the direct path, so the ratio is the LB's cost) and one over all three.
wrk runs in the client against the first backend directly and through each VIP, rounds
alternating, and the bench prints a markdown table and the ratio VIP / direct. Needs root,
nginx (nginx-light), wrk and curl.

    /opt/meshvenv/bin/python bench/datapath.py [--seconds 10] [--rounds 3] [--connections 32]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from kernel import netns
from kernel.links import Links
from kernel.system import real_kernel
from meshctl.controller.names import lb_netns_prefix, lb_node_end
from meshctl.lb.reconcile import LbReconciler
from meshctl.lb.spec import Backend, VirtualIp, lb_spec

PREFIX = f"mbench{os.getpid()}-"
SUBNET = "10.78.0"
LB_ADDRESS, CLIENT = f"{SUBNET}.2", f"{SUBNET}.50"
VIP_ONE, VIP_ALL = f"{SUBNET}.100", f"{SUBNET}.101"  # over the first backend, over all three
BACKENDS = (f"{SUBNET}.11", f"{SUBNET}.12", f"{SUBNET}.13")
DIRECT, THROUGH_VIP = "direct to backend 1", "VIP over backend 1"
BODY = b"x" * 612  # the size of nginx's default index page

NGINX_CONF = """
user root;
daemon off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log stderr error;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 100000;
    server {{
        listen {address}:80;
        root {dir};
    }}
}}
"""


@dataclass
class Run:
    label: str
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


def sh(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


@contextmanager
def namespace(tag: str) -> Iterator[str]:
    name = f"{PREFIX}{tag}"
    netns.create(name)
    try:
        yield name
    finally:
        netns.delete(name)


@contextmanager
def nginx(ns: str, address: str, root: Path) -> Iterator[None]:
    """One nginx worker in ns serving root/index.html on address:80."""
    root.mkdir()
    (root / "index.html").write_bytes(BODY)
    conf = root / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=root, address=address))
    process = subprocess.Popen(
        ["nsenter", f"--net={netns.path(ns)}", "nginx", "-c", str(conf), "-e", "stderr"]
    )
    try:
        yield
    finally:
        process.terminate()  # nginx's master stops its worker on SIGTERM
        process.wait()


def wait_serving(client: str, address: str) -> None:
    """Until address:80 answers from the client, or exit saying which server did not start."""
    deadline = time.monotonic() + 10
    while subprocess.run(
        ["nsenter", f"--net={netns.path(client)}", "curl", "-sf", "-o", "/dev/null",
         "--max-time", "1", f"http://{address}/"],
    ).returncode:  # fmt: skip
        if time.monotonic() > deadline:
            sys.exit(f"nothing answers http://{address}/ after 10 s; see nginx's errors above")
        time.sleep(0.1)


def _ms(value: str, unit: str) -> float:
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def wrk(client: str, address: str, args: argparse.Namespace, label: str) -> Run:
    out = sh(
        "nsenter", f"--net={netns.path(client)}", "wrk", "--latency", "-t", "2",
        "-c", str(args.connections), "-d", f"{args.seconds}s", f"http://{address}/",
    )  # fmt: skip
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p50 = re.search(r"50%\s+([\d.]+)(us|ms|s)", out)
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    if not (rps and p50 and p99):
        sys.exit(f"could not read wrk's output:\n{out}")
    # "Socket errors: connect 0, read 0, write 0, timeout 0" and "Non-2xx or 3xx responses: N"
    lines = re.findall(r"(?:Socket errors|Non-2xx or 3xx responses):(.*)", out)
    errors = sum(int(n) for line in lines for n in re.findall(r"\d+", line))
    return Run(label, float(rps.group(1)), _ms(*p50.groups()), _ms(*p99.groups()), errors)


def attach(links: Links, node: str, bridge: str, ns: str, address: str) -> None:
    """A veth from the node's bridge to eth0 in ns with address/24."""
    end = f"mb{uuid.uuid4().hex[:8]}"
    links.ensure_veth(node, end, "eth0", ns)
    links.set_master(node, end, bridge)
    links.set_up(node, end)
    links.set_up(ns, "lo")
    links.ensure_address(ns, "eth0", f"{address}/24")
    links.set_up(ns, "eth0")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10, help="per wrk run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs per path")
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    for tool in ("nginx", "wrk", "curl"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is missing: apt-get install nginx-light wrk curl")
    links = Links()
    node_id, network_id = uuid.uuid4().hex[:8], uuid.uuid4().hex[:8]
    one = VirtualIp("svc-one", "one", VIP_ONE, (Backend(BACKENDS[0]),))
    every = VirtualIp("svc-all", "all", VIP_ALL, tuple(Backend(a) for a in BACKENDS))
    spec = lb_spec(node_id, network_id, f"{LB_ADDRESS}/24", (one, every))
    runs: list[Run] = []
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        node = stack.enter_context(namespace("node"))
        client = stack.enter_context(namespace("client"))
        links.ensure_bridge(node, spec.bridge)
        links.set_up(node, spec.bridge)
        attach(links, node, spec.bridge, client, CLIENT)
        for index, address in enumerate(BACKENDS):
            backend = stack.enter_context(namespace(f"backend{index}"))
            attach(links, node, spec.bridge, backend, address)
            stack.enter_context(nginx(backend, address, tmp / f"www{index}"))

        @stack.callback
        def remove_lb() -> None:
            for name in netns.list_namespaces(lb_netns_prefix(node_id)):
                links.delete_link(node, lb_node_end(network_id))
                netns.delete(name)

        LbReconciler(real_kernel(), "iptables", node_ns=node).sync([spec], lb_netns_prefix(node_id))
        for address in (*BACKENDS, VIP_ONE, VIP_ALL):
            wait_serving(client, address)
        for _ in range(args.rounds):
            runs.append(wrk(client, BACKENDS[0], args, DIRECT))
            runs.append(wrk(client, VIP_ONE, args, THROUGH_VIP))
            runs.append(wrk(client, VIP_ALL, args, "VIP over 3 backends"))
    report(runs, args)


def report(runs: list[Run], args: argparse.Namespace) -> None:
    print(f"Data path: HTTP GET of {len(BODY)} bytes from nginx (1 worker per backend),")
    print(f"keep-alive, wrk -t2 -c{args.connections} -d{args.seconds}s in a client namespace on")
    print("the same bridge (so VIP traffic is source-NATed through the LB namespace both ways);")
    print(f"{os.cpu_count()} cores shared by wrk, the servers, the kernel and anything else.\n")
    print("| path | requests/s | p50 latency (ms) | p99 latency (ms) | errors |")
    print("|---|---:|---:|---:|---:|")
    for run in runs:
        latency = f"{run.p50_ms:.2f} | {run.p99_ms:.2f}"
        print(f"| {run.label} | {run.rps:,.0f} | {latency} | {run.errors} |")
    # Each round's runs are back to back, so their ratio is the least disturbed by other load.
    ours = [r.rps for r in runs if r.label == THROUGH_VIP]
    theirs = [r.rps for r in runs if r.label == DIRECT]
    ratios = [a / b for a, b in zip(ours, theirs, strict=True)]
    per_round = ", ".join(f"{r:.2f}" for r in ratios)
    print(f"\nVIP over backend 1 / direct to it, requests/s per round: {per_round}")
    print(f"median ratio: {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
