"""The HTTP routing mesh on one node: a real HAProxy in the router's namespace, real curl.

The client is a namespace outside the mesh with its own veth to the node (198.51.100.2 →
node 198.51.100.1); every task runs tests/kernel/echo_server.py, which answers with its task
name, the path and the headers it got.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kernel import netns
from meshctl import naming
from meshctl.commands.service import create_service
from meshctl.model import NetworkAttachment, Service
from tests.conftest import NetnsFactory, scaled, scaled_duration
from tests.kernel.mesh import Mesh, wait_for

# The router's ingress VIP is balanced by the LB backend (meshctl.lb.desired), HAProxy's servers
# are task addresses: one test (ipvs-marked) takes the VIP's path through IPVS in the QEMU lane;
# the others test HAProxy (TLS, headers, health, reloads, adoption), the same on any backend.
pytestmark = pytest.mark.root

NODE_IP, CLIENT_IP = "198.51.100.1", "198.51.100.2"
ECHO = str(Path(__file__).with_name("echo_server.py"))


@pytest.fixture
def world(node_ns: str, netns_factory: NetnsFactory, tmp_path: Path) -> Iterator[tuple[Mesh, str]]:
    client = netns_factory("client")
    ip = ["ip", "link", "add", "mtnode", "netns", node_ns, "type", "veth", "peer", "mtclient"]
    subprocess.run(["ip", "-n", client, *ip[1:]], check=True)
    for ns, dev, address in ((node_ns, "mtnode", NODE_IP), (client, "mtclient", CLIENT_IP)):
        subprocess.run(["ip", "-n", ns, "addr", "add", f"{address}/24", "dev", dev], check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", dev, "up"], check=True)
    subprocess.run(["ip", "-n", client, "link", "set", "lo", "up"], check=True)
    mesh = Mesh(node_ns, str(tmp_path / "state"))
    try:
        yield mesh, client
    finally:
        mesh.close()


def curl(client: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", client, "curl", "-sS", "--max-time", f"{scaled(5):g}", *args],
        capture_output=True, text=True, timeout=scaled(10),
    )  # fmt: skip


def get(client: str, host: str, path: str = "/", port: int = 80) -> tuple[int, str]:
    """(status, body) of GET http://NODE:port/path with Host: host."""
    result = curl(
        client, "-H", f"Host: {host}", "-w", "\n%{http_code}", f"http://{NODE_IP}:{port}{path}"
    )
    body, _, code = result.stdout.rpartition("\n")
    return (int(code) if code.isdigit() else 0), body


def answer(client: str, host: str, path: str = "/") -> dict[str, Any]:
    status, body = get(client, host, path)
    assert status == 200, (host, path, status, body)
    return json.loads(body)  # type: ignore[no-any-return]


def service(mesh: Mesh, name: str, replicas: int, *options: str) -> None:
    mesh.cli("service", "create", "--name", name, "--replicas", str(replicas), "--network",
             "front", "--stop-grace-period", "2s", "--detach", *options,
             "--", "python3", ECHO, "80")  # fmt: skip


def serving(client: str, host: str, path: str = "/") -> bool:
    return get(client, host, path)[0] == 200


def behind(client: str, host: str, asks: int) -> int:
    """How many tasks answered `asks` requests for host (0 if one failed)."""
    tasks = set()
    for _ in range(asks):
        status, body = get(client, host)
        if status != 200:
            return 0
        tasks.add(json.loads(body)["task"])
    return len(tasks)


def health(mesh: Mesh, task: str) -> set[Any]:
    """The health of every task named `task` (a slot's old and new ones), and each
    (health, pid) pair."""
    found = [(t["health"], t["pid"]) for t in mesh.ps(task.split(".")[0]) if t["name"] == task]
    return {h for h, _ in found} | set(found)


@pytest.mark.ipvs
def test_routes_by_host_wildcard_and_path_and_refuses_unknown_hosts(
    world: tuple[Mesh, str],
) -> None:
    mesh, client = world
    mesh.cli("network", "create", "front", "--subnet", "10.91.0.0/24")
    mesh.cli("router", "enable")
    service(mesh, "a", 3, "--hostname", "a.test")
    service(mesh, "b", 1, "--hostname", "b.test", "--hostname", "*.wild.test")
    service(mesh, "api", 1, "--hostname", "a.test", "--hostname-path", "/api")
    mesh.start_controller()
    mesh.wait_running("a", 3)
    wait_for(lambda: behind(client, "a.test", 12) == 3, 20, "a's three tasks behind a.test")
    spread = collections.Counter(answer(client, "a.test")["task"] for _ in range(30))
    assert set(spread) == {"a.1", "a.2", "a.3"}, spread
    wait_for(
        lambda: serving(client, "b.test") and serving(client, "a.test", "/api"), 20, "b and api"
    )
    assert answer(client, "B.TEST:80")["task"] == "b.1"
    assert answer(client, "x.wild.test")["task"] == "b.1"
    assert answer(client, "y.x.wild.test")["task"] == "b.1"
    assert answer(client, "a.test", "/api")["task"] == "api.1"
    assert answer(client, "a.test", "/api/v1?x=1")["task"] == "api.1"
    assert answer(client, "a.test", "/apix")["task"].startswith("a.")
    assert get(client, "c.test") == (503, "no route for host c.test\n")
    assert get(client, "wild.test")[0] == 503
    mesh.wait_converged(15, "converged")


def _certificates(directory: Path, *hosts: str) -> Path:
    """A test CA (ca.pem) and for each host HOST.pem/HOST.key signed by it, in directory."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=directory)

    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=meshctl test CA")  # fmt: skip
    for host in hosts:
        openssl("req", *ec, "-keyout", f"{host}.key", "-out", f"{host}.csr", "-subj", f"/CN={host}")
        (directory / f"{host}.ext").write_text(f"subjectAltName=DNS:{host}\n")
        openssl("x509", "-req", "-in", f"{host}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{host}.pem", "-days", "2",
                "-extfile", f"{host}.ext")  # fmt: skip
    return directory / "ca.pem"


def https(client: str, ca: Path, host: str, *args: str) -> subprocess.CompletedProcess[str]:
    return curl(client, "--cacert", str(ca), "--resolve", f"{host}:443:{NODE_IP}", *args,
                f"https://{host}/")  # fmt: skip


def served(client: str, ca: Path, host: str) -> subprocess.CompletedProcess[str]:
    """The first answer to https://host that a task gave (JSON), not the router's 503."""
    return wait_for(
        lambda: (got := https(client, ca, host)).returncode == 0 and got.stdout.startswith("{")
        and got,
        20,
        f"https://{host} answered by a task",
    )  # fmt: skip


def test_tls_terminated_with_the_certificate_sni_names_and_passed_through(
    world: tuple[Mesh, str], tmp_path: Path
) -> None:
    mesh, client = world
    certs = tmp_path / "certs"
    certs.mkdir()
    ca = _certificates(certs, "a.test", "b.test", "p.test")
    mesh.cli("network", "create", "front", "--subnet", "10.92.0.0/24")
    mesh.cli("router", "enable")
    for host in ("a.test", "b.test"):
        mesh.cli("router", "cert", "add", host, "--cert", str(certs / f"{host}.pem"),
                 "--key", str(certs / f"{host}.key"))  # fmt: skip
    service(mesh, "a", 1, "--hostname", "a.test")
    service(mesh, "b", 1, "--hostname", "b.test")
    # p terminates TLS itself, with its own certificate; the router has none for p.test.
    mesh.cli("service", "create", "--name", "p", "--network", "front", "--detach",
             "--hostname", "p.test", "--hostname-tls", "passthrough", "--",
             "python3", ECHO, "443", "--tls", str(certs / "p.test.pem"),
             str(certs / "p.test.key"))  # fmt: skip
    mesh.start_controller()
    # curl checks the certificate against the name: each host got its own. Each is waited on
    # until a task answers it: the router may answer 503 until its servers are in.
    for host, task in (("a.test", "a.1"), ("b.test", "b.1")):
        got = json.loads(served(client, ca, host).stdout)
        assert got["task"] == task and got["headers"]["x-forwarded-proto"] == "https", got
        assert not got["tls"]  # the router terminated TLS and spoke HTTP to the task
    passed = json.loads(served(client, ca, "p.test").stdout)
    assert passed["task"] == "p.1" and passed["tls"], passed
    assert "x-forwarded-for" not in passed["headers"]  # untouched: the router never saw HTTP
    # A name without a certificate gets the default one (curl refuses it) and no route.
    assert https(client, ca, "c.test").returncode != 0
    unknown = https(client, ca, "c.test", "-k", "-w", "\n%{http_code}")
    assert unknown.stdout.endswith("\n503"), unknown.stdout
    # Keys are readable by root only, in the state dir.
    stored = Path(mesh.state_dir) / "router" / "certs" / "a.test.pem"
    assert stored.stat().st_mode & 0o777 == 0o600
    assert (Path(mesh.state_dir) / "router").stat().st_mode & 0o777 == 0o700
    listed = mesh.cli("router", "cert", "ls").stdout
    assert "a.test" in listed and "PRIVATE KEY" not in listed
    mesh.wait_converged(15, "converged")


def test_headers_for_the_client_in_host_mode_sticky_keepalive_and_websocket(
    world: tuple[Mesh, str],
) -> None:
    mesh, client = world
    mesh.cli("network", "create", "front", "--subnet", "10.93.0.0/24")
    mesh.cli("router", "enable", "--publish-mode", "host")
    service(mesh, "a", 3, "--hostname", "a.test", "--hostname-sticky")
    mesh.start_controller()
    mesh.wait_running("a", 3)
    wait_for(lambda: serving(client, "a.test"), 20, "a.test")
    headers = answer(client, "a.test")["headers"]
    # mode=host: the router sees the client's own address.
    assert headers["x-forwarded-for"] == CLIENT_IP, headers
    assert headers["x-forwarded-proto"] == "http"
    assert headers["forwarded"] == f"for={CLIENT_IP};proto=http"
    assert headers["host"] == "a.test"
    # Sticky: the first answer sets the cookie; with it, every request reaches that task.
    wait_for(lambda: behind(client, "a.test", 9) == 3, 20, "3 tasks")
    jar = str(Path(mesh.state_dir) / "cookies")
    first = curl(client, "-c", jar, "-H", "Host: a.test", f"http://{NODE_IP}/")
    task = json.loads(first.stdout)["task"]
    again = [json.loads(curl(client, "-b", jar, "-H", "Host: a.test", f"http://{NODE_IP}/").stdout)["task"]
             for _ in range(10)]  # fmt: skip
    assert set(again) == {task}, again
    # Keep-alive: ten requests on one connection, still spread (without the cookie).
    many = curl(client, "-H", "Host: a.test", "-w", "\n%{num_connects}\n",
                *[f"http://{NODE_IP}/"] * 10)  # fmt: skip
    connects = [int(line) for line in many.stdout.splitlines() if line.isdigit()]
    assert sum(connects) == 1, many.stdout
    # A websocket (any Upgrade): 101, then bytes both ways through the router.
    script = (
        "import socket\n"
        f"s = socket.create_connection(('{NODE_IP}', 80), timeout={scaled(5)})\n"
        "s.sendall(b'GET /ws HTTP/1.1\\r\\nHost: a.test\\r\\nUpgrade: websocket\\r\\n'\n"
        "          b'Connection: Upgrade\\r\\nSec-WebSocket-Version: 13\\r\\n'\n"
        "          b'Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\\r\\n\\r\\n')\n"
        "head = b''\n"
        "while b'\\r\\n\\r\\n' not in head:\n"
        "    head += s.recv(1)\n"
        "assert head.startswith(b'HTTP/1.1 101'), head\n"
        "for i in range(3):\n"
        "    s.sendall(b'ping %d' % i)\n"
        "    assert s.recv(100) == b'ping %d' % i\n"
        "print('tunnel ok')\n"
    )
    ws = subprocess.run(["ip", "netns", "exec", client, "python3", "-c", script],
                        capture_output=True, text=True, timeout=scaled(20))  # fmt: skip
    assert ws.stdout.strip() == "tunnel ok", ws.stderr
    mesh.wait_converged(15, "converged")


class RequestLoop:
    """Clients asking for host through the router all the time, as `curl` does it: each run
    sends a batch of requests over one kept-alive connection (curl retries a request on a
    reused connection the server closed, as HTTP allows for idempotent requests). Every
    status is recorded; curl's 000 is a request that failed."""

    def __init__(self, client: str, host: str, directory: Path, clients: int = 2) -> None:
        self.stop = directory / "stop"
        self.outputs = [directory / f"codes{i}" for i in range(clients)]
        urls = " ".join([f"-o /dev/null http://{NODE_IP}/"] * 20)
        loop = (
            f"while [ ! -e {self.stop} ]; do curl -s --max-time {scaled(5):g} "
            f"-H 'Host: {host}' -w '%{{http_code}}\\n' {urls}; done"
        )
        self.processes = [
            subprocess.Popen(["ip", "netns", "exec", client, "sh", "-c", f"{loop} > {out}"])
            for out in self.outputs
        ]

    def codes(self) -> collections.Counter[str]:
        return collections.Counter(
            line for out in self.outputs if out.exists() for line in out.read_text().split()
        )

    def finish(self) -> collections.Counter[str]:
        self.stop.touch()
        for process in self.processes:
            process.wait(timeout=scaled(30))
        return self.codes()


def test_no_request_fails_while_tasks_scale_fail_health_and_routes_change(
    world: tuple[Mesh, str], tmp_path: Path
) -> None:
    mesh, client = world
    sick = tmp_path / "sick"
    sick.mkdir()
    mesh.cli("network", "create", "front", "--subnet", "10.94.0.0/24")
    mesh.cli("router", "enable")
    # Healthy while it listens and no file names it sick. The start period covers a fresh
    # process's start before it listens (and a.2's below, while still named sick): without it
    # one failed probe (retries 1) replaces a process still starting, which under TCG takes
    # longer than an interval, again and again.
    service(mesh, "a", 4, "--hostname", "a.test", "--health-cmd",
            f'test ! -e {sick}/$(hostname) && nc -z 127.0.0.1 80',
            "--health-interval", scaled_duration(0.3), "--health-retries", "1",
            "--health-start-period", scaled_duration(10))  # fmt: skip
    mesh.start_controller()
    mesh.wait_running("a", 4)
    wait_for(lambda: behind(client, "a.test", 16) == 4, 30, "4 tasks serving")
    loop = RequestLoop(client, "a.test", tmp_path)
    try:

        def served(count: int) -> bool:
            return loop.codes().total() >= count

        wait_for(lambda: served(100), 30, "the loop running")
        # Scale 4 → 1 → 4: servers drained, then emptied; new ones take free slots.
        mesh.cli("service", "scale", "a=1", "--detach")
        wait_for(lambda: len(mesh.ps("a")) == 1, 30, "3 tasks gone")
        mark = loop.codes().total()
        wait_for(lambda: served(mark + 100), 30, "requests after scaling down")
        mesh.cli("service", "scale", "a=4", "--detach")
        wait_for(lambda: len([t for t in mesh.running("a") if t["health"] == "healthy"]) == 4, 30,
                 "4 healthy tasks")  # fmt: skip
        mark = loop.codes().total()
        wait_for(lambda: served(mark + 100), 30, "requests after scaling up")
        # A task's health fails: it leaves the backend, is restarted, comes back. It stays sick
        # until its process is replaced: cured as soon as it shows unhealthy, it may pass a
        # probe before the controller's next pass acts on it, and stay in its old process.
        (victim,) = [t for t in mesh.running("a") if t["name"] == "a.2"]
        (sick / "a.2").touch()
        wait_for(lambda: "unhealthy" in health(mesh, "a.2"), 30, "a.2 unhealthy")

        def restarted() -> bool:
            pids = {t["pid"] for t in mesh.ps("a") if t["name"] == "a.2"}
            return bool(pids - {None, victim["pid"]})

        wait_for(restarted, 30, "a.2 in a new process")
        (sick / "a.2").unlink()

        def recovered() -> bool:
            now = health(mesh, "a.2")
            return "healthy" in now and ("healthy", victim["pid"]) not in now

        wait_for(recovered, 30, "a.2 healthy again, a new process")
        # Routes change: HAProxy reloads, its listening sockets handed over.
        mesh.cli("service", "update", "a", "--hostname-add", "a2.test", "--detach")
        wait_for(lambda: serving(client, "a2.test"), 30, "the new route")
        service(mesh, "b", 1, "--hostname", "b.test")
        wait_for(lambda: serving(client, "b.test"), 30, "b's route")
        mark = loop.codes().total()
        wait_for(lambda: served(mark + 100), 30, "requests after the route changes")
    finally:
        codes = loop.finish()
    assert set(codes) == {"200"} and codes["200"] > 500, codes
    mesh.wait_converged(15, "converged")


def test_a_bad_route_is_refused_and_never_takes_the_router_down(
    world: tuple[Mesh, str], tmp_path: Path
) -> None:
    mesh, client = world
    # An haproxy that refuses any configuration naming refused.test, as it would a bad one.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "haproxy"
    wrapper.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = -c ] && grep -q refused.test "$3"; then\n'
        '  echo "[ALERT]    (1) : config : parsing [$3:9] : refused.test is not allowed here" >&2\n'
        "  exit 1\n"
        "fi\n"
        f'exec {shutil.which("haproxy")} "$@"\n'
    )
    wrapper.chmod(0o755)
    mesh.env["PATH"] = f"{bin_dir}:{os.environ['PATH']}"
    mesh.cli("network", "create", "front", "--subnet", "10.95.0.0/24")
    mesh.cli("router", "enable")
    service(mesh, "a", 1, "--hostname", "a.test")
    mesh.start_controller()
    wait_for(lambda: serving(client, "a.test"), 20, "a.test")
    # Refused before anything is stored, with one line each.
    for options, says in (
        (["--hostname", "bad host"], "invalid --hostname 'bad host'"),
        (["--hostname", "a.test"], "service a already routes a.test"),
        (["--hostname", "refused.test"], "refused.test is not allowed here"),
    ):
        refused = mesh.cli("service", "create", "--name", "x", "--network", "front", "--detach",
                           *options, "--", "true", check=False)  # fmt: skip
        assert refused.returncode == 1 and says in refused.stderr, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "x" not in mesh.cli("service", "ls").stdout
    updated = mesh.cli("service", "update", "a", "--hostname-add", "refused.test", check=False)
    assert updated.returncode == 1 and "refused.test is not allowed here" in updated.stderr
    # Written past the CLI (an older one, a race): the controller's own check refuses it, says
    # why, and the router keeps serving what it had.
    from meshctl.store import open_store

    with open_store(f"sqlite:///{mesh.state_dir}/state.db") as store:
        create_service(store, Service("x", ("true",), networks=(NetworkAttachment("front"),),
                                          hostnames=("refused.test",)))  # fmt: skip

    def reported() -> str:
        shown = json.loads(mesh.cli("router", "inspect", "--format", "json").stdout)
        return str(shown["nodes"].get("node1", ""))

    wait_for(lambda: "refused.test is not allowed here" in reported(), 20, "the refusal reported")
    assert all(serving(client, "a.test") for _ in range(10))
    assert get(client, "refused.test")[0] == 503
    # Meanwhile the servers it runs still follow their tasks (runtime API, no reload).
    mesh.cli("service", "scale", "a=2", "--detach")
    wait_for(lambda: behind(client, "a.test", 8) == 2, 20, "a's new task behind a.test")
    assert "reload due" in mesh.diff().stdout
    mesh.cli("service", "rm", "x")
    wait_for(lambda: reported() == "", 20, "the refusal cleared")
    mesh.wait_converged(15, "converged")


def test_the_router_is_adopted_restarted_and_removed(world: tuple[Mesh, str]) -> None:
    mesh, client = world
    mesh.cli("network", "create", "front", "--subnet", "10.96.0.0/24")
    mesh.cli("router", "enable")
    service(mesh, "a", 2, "--hostname", "a.test")
    mesh.start_controller()
    wait_for(lambda: behind(client, "a.test", 8) == 2, 20, "a.test")
    record = Path(mesh.state_dir) / "router" / "process.json"
    pid = json.loads(record.read_text())["pid"]
    # The controller dies: HAProxy goes on serving, and the next controller adopts it.
    assert mesh.controller is not None
    mesh.controller.kill()
    mesh.controller.wait()
    assert all(serving(client, "a.test") for _ in range(5))
    mesh.start_controller()
    wait_for(lambda: "adopted haproxy" in Path(mesh.controller_log).read_text(), 20, "adoption")
    mesh.wait_converged(15, "converged after the restart")
    assert json.loads(record.read_text())["pid"] == pid and serving(client, "a.test")
    # HAProxy dies: the controller starts it again.
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: json.loads(record.read_text())["pid"] != pid, 20, "a new haproxy")
    wait_for(lambda: serving(client, "a.test"), 20, "a.test served again")
    # Disabled: HAProxy, the namespace and the published ports go; the port is free again.
    new_pid = json.loads(record.read_text())["pid"]
    mesh.cli("router", "disable")
    wait_for(lambda: not Path(f"/proc/{new_pid}").exists(), 20, "haproxy stopped")
    node_id = mesh.node_id()
    assert node_id is not None
    wait_for(lambda: not netns.exists(naming.router_netns(node_id)), 20, "the namespace gone")
    assert get(client, "a.test")[0] == 0  # refused
    mesh.wait_converged(15, "converged after disabling")
    service(mesh, "b", 1, "--publish", "80:80")
    wait_for(lambda: serving(client, "anything"), 20, "port 80 published by b")
