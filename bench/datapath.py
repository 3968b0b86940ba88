"""Load-balancer data path, per backend: HTTP through a VIP and through a published port vs the
same servers directly.

VIP: a node namespace with a network bridge, three backend namespaces on it each running nginx
(one worker) serving a small static file, and a client namespace on the same bridge; the LB
namespace is built by `LbReconciler.sync` with two VIPs: one over the first backend only (the
same server capacity as the direct path, so the ratio is the LB's cost) and one over all three.
Each round runs the direct path, then for each backend of --backends (those the kernel runs) a
fresh LB namespace of that backend and its two VIP paths, side by side.

Published port: a second node run as the product runs it (tests/kernel/mesh.py: a controller
in the node namespace, `meshctl service create --publish 8080:80` of one nginx task), and a
client namespace outside the mesh with its own veth to the node. wrk asks nodeIP:8080 (nat
DNAT to the service's ingress VIP, masquerade, the ingress LB namespace, the task) and the same
task directly, routed through the node to the task's address.

wrk runs every path once per round, back to back, and the bench prints a markdown table and the
ratios to direct. Needs root, nginx (nginx-light), wrk and curl.

    /opt/meshvenv/bin/python bench/datapath.py [--seconds 10] [--rounds 3] [--connections 32]
        [--backends iptables,nftables,ipvs]
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
from kernel.links import Links, Route
from kernel.neighbours import Neighbours
from kernel.system import real_kernel
from meshctl.lb.backends import backend_named
from meshctl.lb.reconcile import LbReconciler
from meshctl.lb.spec import Backend, VirtualIp, lb_spec
from meshctl.naming import lb_netns_prefix, lb_node_end

# The root tests' mesh is reused as is; it lives under tests/, importable from the repo root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.kernel.mesh import Mesh, wait_for  # noqa: E402

PREFIX = f"mbench{os.getpid()}-"
SUBNET = "10.78.0"
LB_ADDRESS, CLIENT = f"{SUBNET}.2", f"{SUBNET}.50"
VIP_ONE, VIP_ALL = f"{SUBNET}.100", f"{SUBNET}.101"  # over the first backend, over all three
BACKENDS = (f"{SUBNET}.11", f"{SUBNET}.12", f"{SUBNET}.13")
DIRECT = "direct to backend 1"
NODE_IP, OUTSIDE = "198.51.100.1", "198.51.100.2"  # the published node's veth to the client
TASK_SUBNET, PUBLISHED_PORT = "10.79.0.0/24", 8080
TASK_DIRECT, PUBLISHED = "direct to the task, routed via the node", "published port nodeIP:8080"
PRIVATE_NETNS = "MBENCH_PRIVATE_NETNS"  # set once the bench runs with its own /var/run/netns
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


def wrk(client: str, address: str, args: argparse.Namespace, label: str, *extra: str) -> Run:
    """One wrk run from client against http://address/ (address may carry a :port); extra:
    more wrk options (a header: "-H", "Host: a.test")."""
    out = sh(
        "nsenter", f"--net={netns.path(client)}", "wrk", "--latency", "-t", "2",
        "-c", str(args.connections), "-d", f"{args.seconds}s", *extra, f"http://{address}/",
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


def attach(links: Links, node: str, bridge: str, ns: str, address: str, prefix: int = 24) -> None:
    """A veth from the node's bridge to eth0 in ns with address/prefix."""
    end = f"mb{uuid.uuid4().hex[:8]}"
    links.ensure_veth(node, end, "eth0", ns)
    links.set_master(node, end, bridge)
    links.set_up(node, end)
    links.set_up(ns, "lo")
    links.ensure_address(ns, "eth0", f"{address}/{prefix}")
    links.set_up(ns, "eth0")


@contextmanager
def published_task(stack: ExitStack, tmp: Path) -> Iterator[tuple[str, str]]:
    """A mesh node with one nginx task published on 8080 and a client outside the mesh:
    yields (client namespace, the task's address)."""
    links = Links()
    node = stack.enter_context(namespace("mesh-node"))
    outside = stack.enter_context(namespace("outside"))
    links.set_up(node, "lo")
    links.set_up(outside, "lo")
    links.ensure_veth(outside, "mbclient", "mbnode", node)
    for ns, dev, address in ((node, "mbnode", NODE_IP), (outside, "mbclient", OUTSIDE)):
        links.ensure_address(ns, dev, f"{address}/24")
        links.set_up(ns, dev)
    # The peer path: the client reaches the task's network through the node, as a router would.
    links.ensure_route(outside, Route(TASK_SUBNET, gateway=NODE_IP))
    root = tmp / "task"
    root.mkdir()
    (root / "index.html").write_bytes(BODY)
    conf = root / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=root, address="0.0.0.0"))
    mesh = Mesh(node, str(tmp / "state"))
    try:
        mesh.cli("network", "create", "front", "--subnet", TASK_SUBNET)
        mesh.cli("service", "create", "--name", "web", "--network", "front",
                 "--publish", f"{PUBLISHED_PORT}:80", "--stop-grace-period", "2s", "--detach",
                 "--", "nginx", "-c", str(conf), "-e", "stderr")  # fmt: skip
        mesh.start_controller()
        (task,) = mesh.wait_running("web", 1)
        try:
            wait_for(lambda: mesh.diff().returncode == 0, 60, "the controller to converge")
        except AssertionError as err:
            log = Path(mesh.controller_log).read_text()[-3000:]
            sys.exit(f"{err}\nmeshctl diff:\n{mesh.diff().stdout}\ncontroller log:\n{log}")
        yield outside, task["addresses"]["front"]
    finally:
        mesh.close()


def private_netns_dir() -> None:
    """Re-run this bench in its own mount namespace with an empty /var/run/netns of its own.

    The controller takes every task namespace (mesh-t-*) under /var/run/netns that its store
    does not know for a leftover of its own and deletes it: on a host shared with other meshes
    (tests, benches) it must see only this bench's namespaces.
    """
    if os.environ.get(PRIVATE_NETNS) == "1":
        sh("mount", "-t", "tmpfs", "mbench-netns", netns.NETNS_DIR)
        return
    env = {**os.environ, PRIVATE_NETNS: "1"}
    argv = ["unshare", "--mount", "--propagation", "private", sys.executable, *sys.argv]
    os.execvpe("unshare", argv, env)


def forget(ns: str, addresses: set[str]) -> None:
    """Delete ns's neighbour entries on eth0 for these addresses, whatever their MAC."""
    neighbours = Neighbours()
    known = neighbours.list_neighbours(ns, "eth0")
    neighbours.delete_neighbours(ns, [n for n in known if n.address in addresses])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10, help="per wrk run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs per path")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--backends", default="iptables,nftables,ipvs", help="comma-separated")
    args = parser.parse_args()
    for tool in ("nginx", "wrk", "curl"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is missing: apt-get install nginx-light wrk curl")
    private_netns_dir()
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
        links.ensure_bridge(node, spec.bridge, alias=spec.mark)
        links.set_up(node, spec.bridge)
        attach(links, node, spec.bridge, client, CLIENT)
        for index, address in enumerate(BACKENDS):
            backend = stack.enter_context(namespace(f"backend{index}"))
            attach(links, node, spec.bridge, backend, address)
            stack.enter_context(nginx(backend, address, tmp / f"www{index}"))

        def remove_lb() -> None:
            for name in netns.list_namespaces(lb_netns_prefix(node_id)):
                links.delete_link(node, lb_node_end(network_id))
                netns.delete(name)
            # The next LB leg has a new MAC for the same addresses: forget the old entries.
            forget(client, {VIP_ONE, VIP_ALL, LB_ADDRESS})
            for index in range(len(BACKENDS)):
                forget(f"{PREFIX}backend{index}", {LB_ADDRESS})

        stack.callback(remove_lb)
        kernel = real_kernel()
        backends = []
        for name in args.backends.split(","):
            reason = backend_named(name).available(kernel, node)
            if reason is None:
                backends.append(backend_named(name))
            else:
                print(f"{name} backend: not measured here, {reason}")
        for address in BACKENDS:
            wait_serving(client, address)
        outside, task = stack.enter_context(published_task(stack, tmp))
        for address in (task, f"{NODE_IP}:{PUBLISHED_PORT}"):
            wait_serving(outside, address)
        for _ in range(args.rounds):
            runs.append(wrk(client, BACKENDS[0], args, DIRECT))
            for backend in backends:
                LbReconciler(kernel, backend, node_ns=node).sync([spec], lb_netns_prefix(node_id))
                for address in (VIP_ONE, VIP_ALL):
                    wait_serving(client, address)
                runs.append(wrk(client, VIP_ONE, args, through_vip(backend.name)))
                runs.append(wrk(client, VIP_ALL, args, f"VIP over 3 backends ({backend.name})"))
                remove_lb()
            runs.append(wrk(outside, task, args, TASK_DIRECT))
            runs.append(wrk(outside, f"{NODE_IP}:{PUBLISHED_PORT}", args, PUBLISHED))
    report(runs, args, [b.name for b in backends])


def through_vip(backend: str) -> str:
    return f"VIP over backend 1 ({backend})"


def report(runs: list[Run], args: argparse.Namespace, backends: list[str]) -> None:
    print(f"Data path: HTTP GET of {len(BODY)} bytes from nginx (1 worker per backend),")
    print(f"keep-alive, wrk -t2 -c{args.connections} -d{args.seconds}s in a client namespace on")
    print("the same bridge (so VIP traffic is source-NATed through the LB namespace both ways);")
    print("published port: a client outside the mesh on its own veth to a controller-run node")
    print("(its controller's backend: --lb-backend auto);")
    print(f"{os.cpu_count()} cores shared by wrk, the servers, the kernel and anything else.\n")
    print("| path | requests/s | p50 latency (ms) | p99 latency (ms) | errors |")
    print("|---|---:|---:|---:|---:|")
    for run in runs:
        latency = f"{run.p50_ms:.2f} | {run.p99_ms:.2f}"
        print(f"| {run.label} | {run.rps:,.0f} | {latency} | {run.errors} |")
    pairs = [(through_vip(b), DIRECT) for b in backends] + [(PUBLISHED, TASK_DIRECT)]
    for ours, theirs in pairs:
        # Each round's runs are back to back, so their ratio is the least disturbed by other load.
        ratios = [
            a.rps / b.rps
            for a, b in zip(
                (r for r in runs if r.label == ours),
                (r for r in runs if r.label == theirs),
                strict=True,
            )
        ]
        per_round = ", ".join(f"{r:.2f}" for r in ratios)
        print(f"\n{ours} / {theirs}, requests/s per round: {per_round}; "
              f"median {statistics.median(ratios):.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
