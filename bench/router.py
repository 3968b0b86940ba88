"""The HTTP router (#19): how fast a store change reaches HAProxy, and what HAProxy costs.

Builds a node as the root tests do (tests/kernel/mesh.py: a controller in a node namespace)
with the router enabled in host mode, and a client namespace outside the mesh on its own veth
to the node, with routes to the task network and the ingress network through the node.

Reconfiguration latency, from the moment the command's store transaction returned until a
client sees the change through the node's published port 80 (probes from the client in a
tight loop, one connection each), each change a second after the last one (so it finds the
controller idle; one that arrives during a pass waits for its end):
- route added (`service update --hostname-add`): HAProxy is reloaded, the new config checked
  with `haproxy -c` first; done when the new host answers 200;
- route removed: reloaded; done when the host gets 503;
- a server drained (`service scale b=1` from 2): the leader marks a task to shut down, the
  node's controller puts its server in maintenance through the runtime API; done when the
  last answer from the leaving task came (probes every ~1 ms).
`haproxy -c` on the same configuration is timed alone, and the controller's log says how long
each reload's two steps took (configuration written and checked; SIGUSR2 until the new worker
answers on the runtime API).

Data path: wrk (keep-alive) against one nginx task serving a 612-byte file, directly (routed
via the node) and through HAProxy as the controller configures it, reached at the router's own
address (the same routed path) and through the published port (host mode: the node's DNAT),
and through nginx configured by hand as a proxy for the same route, run in the router's
namespace (the same path as HAProxy). HAProxy runs 2 threads (its default here), the proxy
nginx 2 workers, the task's nginx 1.

    /opt/meshvenv/bin/python bench/router.py [--rounds 10] [--wrk-rounds 3] [--seconds 10]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from kernel import netns
from kernel.links import Links, Route
from meshctl.commands.service import scale_services, update_service
from meshctl.naming import router_netns
from meshctl.router.config import RouterFiles
from meshctl.store import open_store

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.datapath import BODY, NGINX_CONF, Run, private_netns_dir, wrk  # noqa: E402
from tests.kernel.mesh import Mesh, wait_for  # noqa: E402

PREFIX = f"mrbench{os.getpid()}-"
NODE_IP, OUTSIDE = "198.51.100.1", "198.51.100.2"
TASK_SUBNET, INGRESS_SUBNET = "10.77.0.0/24", "10.255.0.0/16"
DIRECT, HAPROXY, NGINX, PUBLISHED = (
    "direct to the task, routed via the node",
    "HAProxy (meshctl's config) at the router's address",
    "nginx proxy by hand, same namespace and path",
    "HAProxy through the published port nodeIP:80 (host mode)",
)
PROXY_PORT = 8081
# Between measured changes: the controller finishes the pass the last change started (a
# change that arrives during a pass waits for its end; passes never overlap).
SETTLE = 1.0
# The task: nginx naming itself in a header, so probes know which task answered.
TASK_CONF = NGINX_CONF.replace("root {dir};", "root {dir};\n        add_header X-Task $hostname;")
PROXY_CONF = """
user root;
daemon off;
worker_processes 2;
pid {dir}/nginx.pid;
error_log stderr error;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 100000;
    upstream task {{ server {task}:80; keepalive 64; }}
    server {{
        listen {port};
        server_name a.test;
        location / {{
            proxy_pass http://task;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto http;
        }}
    }}
}}
"""


def ask(host: str, address: str = NODE_IP, port: int = 80) -> tuple[int, str]:
    """(status, the answering task) of one GET with Host: host, on a connection of its own."""
    try:
        with socket.create_connection((address, port), timeout=1) as sock:
            sock.sendall(f"GET / HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
    except OSError:
        return 0, ""
    head = data.split(b"\r\n\r\n", 1)[0].decode(errors="replace").split("\r\n")
    status = int(head[0].split()[1]) if head and len(head[0].split()) > 1 else 0
    task = next((h.split(":", 1)[1].strip() for h in head if h.lower().startswith("x-task:")), "")
    return status, task


def until(
    client: str, host: str, done: Callable[[tuple[int, str]], bool], timeout: float = 10
) -> float:
    """Probe host from the client until done(answer); the monotonic time it first held."""

    def loop() -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if done(ask(host)):
                return time.monotonic()
        raise TimeoutError(f"no change seen for {host} within {timeout}s")

    return netns.run_in(client, loop)


def answers(client: str, host: str, seconds: float) -> list[tuple[float, int, str]]:
    """(time, status, task) of every probe for `seconds`."""

    def loop() -> list[tuple[float, int, str]]:
        seen, end = [], time.monotonic() + seconds
        while time.monotonic() < end:
            status, task = ask(host)
            seen.append((time.monotonic(), status, task))
        return seen

    return netns.run_in(client, loop)


@contextmanager
def namespace(tag: str) -> Iterator[str]:
    name = f"{PREFIX}{tag}"
    netns.create(name)
    try:
        yield name
    finally:
        netns.delete(name)


def nginx_conf(directory: Path, template: str, **values: object) -> Path:
    directory.mkdir(parents=True)
    (directory / "index.html").write_bytes(BODY)
    conf = directory / "nginx.conf"
    conf.write_text(template.format(dir=directory, **values))
    return conf


@contextmanager
def world(stack: ExitStack, tmp: Path) -> Iterator[tuple[Mesh, str]]:
    links = Links()
    node = stack.enter_context(namespace("node"))
    outside = stack.enter_context(namespace("outside"))
    links.set_up(node, "lo")
    links.set_up(outside, "lo")
    links.ensure_veth(outside, "mrclient", "mrnode", node)
    for ns, dev, address in ((node, "mrnode", NODE_IP), (outside, "mrclient", OUTSIDE)):
        links.ensure_address(ns, dev, f"{address}/24")
        links.set_up(ns, dev)
    for subnet in (TASK_SUBNET, INGRESS_SUBNET):
        links.ensure_route(outside, Route(subnet, gateway=NODE_IP))
    mesh = Mesh(node, str(tmp / "state"))
    try:
        yield mesh, outside
    finally:
        mesh.close()


def store_call(mesh: Mesh, fn: Callable[..., object], *args: object) -> float:
    """fn(store, *args) on the mesh's store; the monotonic time it returned."""
    with open_store(f"sqlite:///{mesh.state_dir}/state.db") as store:
        fn(store, *args)
        return time.monotonic()


def latencies(mesh: Mesh, client: str, rounds: int) -> dict[str, list[float]]:
    found: dict[str, list[float]] = {"route added": [], "route removed": [], "server drained": []}
    hosts = ("a.test",)
    for index in range(rounds):
        new = f"r{index}.test"
        time.sleep(SETTLE)
        t0 = store_call(mesh, update_service, "a", {"hostnames": (*hosts, new)})
        found["route added"].append(until(client, new, lambda a: a[0] == 200) - t0)
        time.sleep(SETTLE)
        t0 = store_call(mesh, update_service, "a", {"hostnames": hosts})
        found["route removed"].append(until(client, new, lambda a: a[0] == 503) - t0)
        # Server drained: b from 2 tasks to 1; the probes find when the last one left.
        mesh.wait_running("b", 2)
        wait_for(lambda: len({t for _, _, t in answers(client, "b.test", 0.3)}) == 2, 20, "b's 2")
        time.sleep(SETTLE)
        t0 = store_call(mesh, scale_services, {"b": 1})
        seen = answers(client, "b.test", 2.0)
        (survivor,) = {t for _, s, t in seen[-50:] if s == 200}
        leaving = [at for at, status, task in seen if task and task != survivor]
        failed = [at for at, status, _ in seen if status != 200]
        if failed:
            sys.exit(f"{len(failed)} probe(s) for b.test failed while it was scaled down")
        found["server drained"].append((max(leaving) if leaving else t0) - t0)
        store_call(mesh, scale_services, {"b": 2})
    return found


def check_time(mesh: Mesh, rounds: int) -> list[float]:
    """`haproxy -c` alone on the router's configuration."""
    config = RouterFiles(str(Path(mesh.state_dir) / "router")).config
    times = []
    for _ in range(rounds):
        started = time.monotonic()
        subprocess.run(["haproxy", "-c", "-f", config], check=True, capture_output=True)
        times.append(time.monotonic() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="of each latency")
    parser.add_argument("--wrk-rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=10, help="per wrk run")
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    for tool in ("haproxy", "nginx", "wrk"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is missing: run scripts/bootstrap")
    private_netns_dir()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=PREFIX)))
        mesh, client = stack.enter_context(world(stack, tmp))
        task_conf = nginx_conf(tmp / "task", TASK_CONF, address="0.0.0.0")
        mesh.cli("network", "create", "front", "--subnet", TASK_SUBNET)
        mesh.cli("router", "enable", "--publish-mode", "host")
        for name, replicas in (("a", 1), ("b", 2)):
            mesh.cli("service", "create", "--name", name, "--replicas", str(replicas),
                     "--network", "front", "--hostname", f"{name}.test", "--detach",
                     "--stop-grace-period", "1s", "--",
                     "nginx", "-c", str(task_conf), "-e", "stderr")  # fmt: skip
        mesh.start_controller("--resync-period", "10s")  # the default, not the tests' 2 s
        (task,) = mesh.wait_running("a", 1)
        mesh.wait_running("b", 2)
        mesh.wait_converged(60, "the controller to converge")
        until(client, "a.test", lambda a: a[0] == 200, 30)
        found = latencies(mesh, client, args.rounds)
        found["haproxy -c alone"] = check_time(mesh, args.rounds)
        # What the controller says each reload took: writing and checking, then reloading.
        reloads = re.findall(r"checked in (\d+) ms, the new worker serving (\d+) ms later",
                             Path(mesh.controller_log).read_text())[-2 * args.rounds :]  # fmt: skip
        found["reloads: write and haproxy -c"] = [int(c) / 1000 for c, _ in reloads]
        found["reloads: SIGUSR2 to the new worker serving"] = [int(r) / 1000 for _, r in reloads]
        node_id = mesh.node_id()
        assert node_id is not None
        router_ns = router_netns(node_id)
        shown = mesh.in_node("ip", "netns", "exec", router_ns, "ip", "-o", "-4", "addr").stdout
        router_address = next(
            word.split("/")[0] for word in shown.split() if word.startswith("10.255.")
        )
        proxy_conf = nginx_conf(tmp / "proxy", PROXY_CONF, task=task["addresses"]["front"],
                                port=PROXY_PORT)  # fmt: skip
        proxy = subprocess.Popen(["nsenter", f"--net={netns.path(router_ns)}", "nginx", "-c",
                                  str(proxy_conf), "-e", "stderr"])  # fmt: skip
        stack.callback(lambda: (proxy.terminate(), proxy.wait()))
        host = ("-H", "Host: a.test")
        wait_for(lambda: netns.run_in(client, ask, "a.test", router_address, PROXY_PORT)[0] == 200,
                 10, "the nginx proxy")  # fmt: skip
        runs: list[Run] = []
        for _ in range(args.wrk_rounds):
            runs.append(wrk(client, task["addresses"]["front"], args, DIRECT))
            runs.append(wrk(client, router_address, args, HAPROXY, *host))
            runs.append(wrk(client, f"{router_address}:{PROXY_PORT}", args, NGINX, *host))
            runs.append(wrk(client, NODE_IP, args, PUBLISHED, *host))
        report(found, runs, args)


def report(found: dict[str, list[float]], runs: list[Run], args: argparse.Namespace) -> None:
    print(f"Reconfiguration, {args.rounds} rounds each (ms): median, min-max")
    for what, times in found.items():
        ms = [t * 1000 for t in times]
        print(f"- {what}: {statistics.median(ms):.0f} ({min(ms):.0f}-{max(ms):.0f})")
    print(f"\nwrk -t2 -c{args.connections} -d{args.seconds}s, {len(BODY)}-byte file, keep-alive;")
    print(f"{os.cpu_count()} cores shared by wrk, the proxies, nginx, the kernel and the rest.\n")
    print("| path | requests/s | p50 latency (ms) | p99 latency (ms) | errors |")
    print("|---|---:|---:|---:|---:|")
    for run in runs:
        print(
            f"| {run.label} | {run.rps:,.0f} | {run.p50_ms:.2f} | {run.p99_ms:.2f} | {run.errors} |"
        )
    for ours, theirs in ((HAPROXY, DIRECT), (NGINX, DIRECT), (HAPROXY, NGINX), (PUBLISHED, DIRECT)):
        ratios = [
            a.rps / b.rps
            for a, b in zip((r for r in runs if r.label == ours),
                            (r for r in runs if r.label == theirs), strict=True)
        ]  # fmt: skip
        per_round = ", ".join(f"{r:.2f}" for r in ratios)
        print(f"\n{ours} / {theirs}: {per_round}; median {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
