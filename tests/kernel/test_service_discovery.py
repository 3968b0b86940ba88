"""Service discovery and load balancing through the whole controller, as a user sees them.

A client task on the service's network resolves the service through its own resolv.conf
(127.0.0.11, redirected to the embedded DNS server) and connects to the VIP; the controller's
load balancer (iptables here, IPVS in the QEMU lane) spreads new connections over the healthy
tasks. `meshctl diff` must be empty after every step.
"""

from __future__ import annotations

import collections
import json
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from kernel import netns
from meshctl.naming import lb_netns, task_netns
from tests.conftest import NetnsFactory, scaled, scaled_duration
from tests.kernel.mesh import Mesh, ask, wait_for

# The ipvs-marked tests go through the LB backend (a VIP's traffic, health gating, draining,
# drift and restart of its objects); the others, bridge names and DNS, are the same on any.
pytestmark = pytest.mark.root

# TCP 80 answers the task name; UDP 81 answers it per datagram; TCP 82 echoes (long-lived).
BACKEND = [
    "sh", "-c",
    # The UDP answer reads the datagram first: a child that exits before socat wrote the
    # datagram to it makes socat fail on EPIPE and drop the answer. socat waits for the answer
    # as long as a client does (-t: by default it gives up 0.5 s after the datagram).
    f"socat -t{scaled(5):g} UDP-RECVFROM:81,fork SYSTEM:'head -c1 >/dev/null; hostname' & "
    "socat TCP-LISTEN:82,reuseaddr,fork EXEC:cat & "
    "exec socat TCP-LISTEN:80,reuseaddr,fork SYSTEM:hostname",
]  # fmt: skip


def _web(mesh: Mesh, subnet: str, replicas: int = 3, *extra: str) -> tuple[str, dict]:  # type: ignore[type-arg]
    """A network, the web service and a client task on it; returns (VIP, client task)."""
    mesh.cli("network", "create", "front", "--subnet", subnet)
    mesh.cli("service", "create", "--name", "web", "--replicas", str(replicas), "--network",
             "front:www", "--stop-grace-period", "3s", "--restart-delay", "0s", *extra,
             "--detach", "--", *BACKEND)  # fmt: skip
    mesh.cli("service", "create", "--name", "client", "--network", "front", "--detach",
             "--", "sleep", "3600")  # fmt: skip
    mesh.start_controller()
    mesh.wait_running("client", 1)
    inspect = json.loads(mesh.cli("service", "inspect", "web", "--format", "json").stdout)
    (client,) = mesh.running("client")
    return inspect["networks"][0]["vip"], client


def _converged(mesh: Mesh) -> None:
    mesh.wait_converged(15, "meshctl diff to be empty")
    assert mesh.diff().stdout == ""


def _get(client: dict, address: str, port: int = 80, udp: bool = False) -> str:  # type: ignore[type-arg]
    return ask(task_netns(client["id"]), address, port, udp)


def _spread(mesh: Mesh, client: dict, vip: str, count: int) -> collections.Counter[str]:  # type: ignore[type-arg]
    return collections.Counter(_get(client, vip) for _ in range(count))


@pytest.mark.ipvs
def test_vip_spreads_over_replicas_and_dns_answers(mesh: Mesh) -> None:
    vip, client = _web(mesh, "10.71.0.0/24")
    tasks = {t["name"]: t["addresses"]["front"] for t in mesh.wait_running("web", 3)}
    _converged(mesh)
    counts = _spread(mesh, client, vip, 60)
    assert set(counts) == {"web.1", "web.2", "web.3"}, counts
    assert all(10 <= n <= 30 for n in counts.values()), counts
    udp = collections.Counter(_get(client, vip, 81, udp=True) for _ in range(30))
    assert set(udp) == {"web.1", "web.2", "web.3"}, udp
    # DNS through the task's resolv.conf: service, alias, mixed case, tasks.*, a task, PTR.
    assert mesh.dig(client, "web") == [vip]
    assert mesh.dig(client, "www") == [vip]
    assert mesh.dig(client, "WeB") == [vip]
    assert mesh.dig(client, "tasks.web") == sorted(tasks.values())
    assert mesh.dig(client, "web.2") == [tasks["web.2"]]
    assert mesh.dig(client, "-x", vip)[0].startswith("web")
    assert mesh.dig(client, "-x", tasks["web.1"])[0].startswith("web.1")
    assert mesh.dig(client, "web", "AAAA") == []
    assert mesh.diff().returncode == 0


@pytest.mark.ipvs
def test_unhealthy_task_leaves_the_vip_and_dns_and_comes_back(mesh: Mesh, tmp_path: Path) -> None:
    sick = tmp_path / "sick"
    sick.mkdir()
    vip, client = _web(
        mesh, "10.72.0.0/24", 3,
        "--health-cmd", f"test ! -e {sick}/$HOSTNAME", "--health-interval", scaled_duration(1),
        "--health-retries", "2", "--restart-condition", "none",
    )  # fmt: skip
    wait_for(
        lambda: len([t for t in mesh.running("web") if t["health"] == "healthy"]) == 3,
        20,
        "healthy",
    )
    _converged(mesh)
    (sick / "web.2").touch()
    became_sick = time.monotonic()
    wait_for(lambda: "web.2" not in _spread(mesh, client, vip, 30), 10, "web.2 out of the VIP")
    # interval × retries + 1 s, with the time one spread takes as slack for the observation.
    assert time.monotonic() - became_sick < scaled(1 * 2 + 1 + 3)
    assert "web.2" not in _spread(mesh, client, vip, 30)
    web2 = next(t for t in mesh.ps("web") if t["name"] == "web.2")
    assert web2["health"] == "unhealthy"
    assert web2["addresses"]["front"] not in mesh.dig(client, "tasks.web")
    (sick / "web.2").unlink()
    wait_for(lambda: "web.2" in _spread(mesh, client, vip, 12), 15, "web.2 back in the VIP")
    _converged(mesh)


@pytest.mark.ipvs
def test_scale_down_during_requests_loses_none(mesh: Mesh) -> None:
    vip, client = _web(mesh, "10.73.0.0/24")
    mesh.wait_running("web", 3)
    _converged(mesh)
    answers: list[str] = []
    stop = threading.Event()

    def requests() -> None:
        while not stop.is_set():
            answers.append(_get(client, vip))

    worker = threading.Thread(target=requests)
    worker.start()
    try:
        time.sleep(scaled(1))
        mesh.cli("service", "scale", "web=1", "--detach")
        wait_for(lambda: len(mesh.ps("web")) == 1, 20, "scaled to 1")
        time.sleep(scaled(1))
    finally:
        stop.set()
        worker.join()
    assert len(answers) > 20
    assert "" not in answers, f"{answers.count('')} of {len(answers)} requests failed"
    assert set(answers[-5:]) == {"web.1"}
    _converged(mesh)


# Another tool's links in the node namespace, named as meshctl names its own: a bridge like a
# network's (up) with namespace A behind it on a veth like a task's, an unrelated `meshfoo`
# bridge with namespace B behind it on a veth like an attached container's, and a veth like an
# LB leg. The node forwards between A and B.
FOREIGN_BRIDGES = (
    ("mesh1234abcd", "meshv1234abcd0", "198.51.100.1/26", "198.51.100.2/26"),
    ("meshfoo", "meshc1234abcd", "198.51.100.65/26", "198.51.100.66/26"),
)
FOREIGN_LEG = ("meshl1234abcd", "fgnl1234abcd")
FOREIGN_LINKS = (
    *(n for bridge, port, _, _ in FOREIGN_BRIDGES for n in (bridge, port)),
    *FOREIGN_LEG,
)
B_ADDRESS = "198.51.100.66"


def _foreign_links(mesh: Mesh, netns_factory: NetnsFactory) -> str:
    """Make the foreign links and the namespaces A and B behind them; returns A."""
    behind = []
    for bridge, port, gateway, address in FOREIGN_BRIDGES:
        ns = netns_factory("fgn")
        behind.append(ns)
        for argv in (
            ["-n", mesh.node_ns, "link", "add", bridge, "type", "bridge"],
            ["-n", mesh.node_ns, "link", "add", port, "type", "veth", "peer", "eth0", "netns", ns],
            ["-n", mesh.node_ns, "link", "set", port, "master", bridge],
            ["-n", mesh.node_ns, "addr", "add", gateway, "dev", bridge],
            ["-n", ns, "addr", "add", address, "dev", "eth0"],
        ):
            subprocess.run(["ip", *argv], check=True)
        for where, dev in ((mesh.node_ns, bridge), (mesh.node_ns, port), (ns, "eth0")):
            # No IPv6 link-local address (set before up): its DAD state would change on its own.
            for change in (["addrgenmode", "none"], ["up"]):
                subprocess.run(["ip", "-n", where, "link", "set", dev, *change], check=True)
        subprocess.run(["ip", "-n", ns, "route", "add", "default", "via", gateway.split("/")[0]],
                       check=True)  # fmt: skip
    leg, peer = FOREIGN_LEG
    subprocess.run(["ip", "-n", mesh.node_ns, "link", "add", leg, "type", "veth", "peer", peer],
                   check=True)  # fmt: skip
    mesh.in_node("sysctl", "-qw", "net.ipv4.ip_forward=1", check=True)
    return behind[0]


def _foreign_state(mesh: Mesh) -> dict[str, str]:
    """Each foreign link as `ip` shows it (details, master, addresses) and each bridge's ports;
    bridge timers, which run on their own, left out."""
    state = {}
    for name in FOREIGN_LINKS:
        link = mesh.in_node("ip", "-d", "-o", "link", "show", "dev", name).stdout
        addresses = mesh.in_node("ip", "-o", "addr", "show", "dev", name).stdout
        state[name] = re.sub(r"\w+_timer +[\d.]+ ?", "", link) + addresses
    for bridge, _, _, _ in FOREIGN_BRIDGES:
        state[f"ports of {bridge}"] = mesh.in_node(
            "ip", "-o", "link", "show", "master", bridge
        ).stdout
    return state


@pytest.mark.ipvs
def test_drift_restart_and_foreign_rules_and_links(mesh: Mesh, netns_factory: NetnsFactory) -> None:
    # Another tool's rules and links in the node namespace, before meshctl starts.
    foreign = [
        ["-t", "nat", "-A", "POSTROUTING", "-s", "192.0.2.0/24", "-j", "RETURN"],
        ["-t", "filter", "-N", "OTHER-TOOL"],
        ["-t", "filter", "-A", "FORWARD", "-j", "OTHER-TOOL"],
        ["-t", "filter", "-A", "OTHER-TOOL", "-p", "tcp", "--dport", "9", "-j", "DROP"],
    ]
    for rule in foreign:
        mesh.in_node("iptables-legacy", *rule, check=True)
    a = _foreign_links(mesh, netns_factory)

    def foreign_rules() -> list[str]:
        """Every rule and user chain not meshctl's, by table (tables that the kernel makes on
        first use hold no rule and do not count)."""
        table, found = "", []
        for line in mesh.in_node("iptables-legacy-save").stdout.splitlines():
            if line.startswith("*"):
                table = line
            elif (
                line.startswith("-A")
                and "meshctl:" not in line
                or line.startswith(":")
                and line.endswith("- [0:0]")
                and "MESH-" not in line
            ):
                found.append(f"{table} {line}")
        return found

    def foreign_path_works() -> None:
        """A reaches B through the node: from one foreign `mesh*` bridge into the other."""
        ping = subprocess.run(["ip", "netns", "exec", a, "ping", "-c1", "-W2", B_ADDRESS],
                              capture_output=True, text=True)  # fmt: skip
        assert ping.returncode == 0, ping.stdout + ping.stderr

    before, links_before = foreign_rules(), _foreign_state(mesh)
    foreign_path_works()
    vip, client = _web(mesh, "10.74.0.0/24")
    mesh.wait_running("web", 3)
    _converged(mesh)
    foreign_path_works()
    # A task reaches B too: out of its bridge into a foreign `mesh*` one, like any egress.
    assert mesh.in_task(client["id"], "ping", "-c1", "-W2", B_ADDRESS).returncode == 0
    node_id = mesh.node_id()
    (lb_ns,) = [n for n in netns.list_namespaces("mesh-lb-") if node_id and node_id[:8] in n]

    # Drift: the VIP address and a service's balancing deleted by hand come back. Made and seen
    # while the controller is stopped: a pass running meanwhile would repair it before diff saw it.
    backend = mesh.lb_backend()
    assert mesh.controller is not None
    mesh.controller.send_signal(signal.SIGSTOP)
    try:
        subprocess.run(["ip", "-n", lb_ns, "addr", "del", f"{vip}/32", "dev", "eth0"], check=True)
        if backend == "ipvs":  # an IPVS virtual service (by its fwmark), backends and all
            saved = subprocess.run(["ip", "netns", "exec", lb_ns, "ipvsadm-save", "-n"],
                                   capture_output=True, text=True).stdout  # fmt: skip
            mark = next(ln.split()[2] for ln in saved.splitlines() if ln.startswith("-A -f "))
            drop = ["ipvsadm", "-D", "-f", mark]
        else:  # a balancing chain's rules
            if backend == "nftables":
                listing = ["nft", "list", "table", "ip", "meshctl"]
                flush, prefix = ["nft", "flush", "chain", "ip", "meshctl"], "service-"
            else:
                listing = ["iptables-legacy-save", "-t", "nat"]
                flush, prefix = ["iptables-legacy", "-t", "nat", "-F"], "MESH-SVC-"
            chains = subprocess.run(["ip", "netns", "exec", lb_ns, *listing],
                                    capture_output=True, text=True).stdout  # fmt: skip
            drop = [*flush, next(w.rstrip(",") for w in chains.split() if w.startswith(prefix))]
        subprocess.run(["ip", "netns", "exec", lb_ns, *drop], check=True)
        drifted = mesh.diff()
        assert drifted.returncode == 1, drifted.stdout
    finally:
        mesh.controller.send_signal(signal.SIGCONT)
    _converged(mesh)  # within the resync period (mesh.RESYNC_PERIOD, scaled)
    # 30 new connections: all 3 backends answer (a miss by chance is about 1 in 70,000).
    assert set(_spread(mesh, client, vip, 30)) == {"web.1", "web.2", "web.3"}

    # An established connection through the VIP survives a controller restart.
    with _connect(client["id"], vip, 82) as conn:
        conn.sendall(b"before\n")
        assert conn.recv(64) == b"before\n"
        pids = {t["id"]: t["pid"] for t in mesh.running("web")}
        mesh.stop_controller(signal.SIGKILL)
        mesh.start_controller()
        mesh.wait_converged(20, "converged after restart")
        conn.sendall(b"after\n")
        assert conn.recv(64) == b"after\n"
    assert {t["id"]: t["pid"] for t in mesh.running("web")} == pids
    foreign_path_works()

    # The rest of the lifecycle; the foreign rules and links stay byte-identical throughout.
    mesh.cli("service", "scale", "web=1", "--detach")
    wait_for(lambda: len(mesh.ps("web")) == 1, 20, "scaled to 1")
    mesh.cli("service", "update", "web", "--env", "RELEASE=2", "--detach")
    # Updated once the old task is gone too: until then the node is still changing.
    wait_for(lambda: [(t["spec_version"], t["state"]) for t in mesh.ps("web")] == [(2, "running")],
             30, "updated")  # fmt: skip
    _converged(mesh)
    foreign_path_works()
    assert _foreign_state(mesh) == links_before
    mesh.cli("service", "rm", "web")
    mesh.cli("service", "rm", "client")
    wait_for(lambda: mesh.task_ids() == [], 20, "tasks gone")
    mesh.cli("network", "rm", "front")
    _converged(mesh)
    foreign_path_works()
    assert foreign_rules() == before
    assert _foreign_state(mesh) == links_before
    assert not [n for n in netns.list_namespaces("mesh-lb-") if node_id and node_id[:8] in n]


def test_a_bridge_name_held_by_another_link_is_reported_and_left_alone(mesh: Mesh) -> None:
    mesh.cli("network", "create", "front", "--subnet", "10.76.0.0/24")
    network = json.loads(mesh.cli("network", "inspect", "front", "--format", "json").stdout)
    bridge = f"mesh{network['id'][:8]}"
    # Another tool's bridge with the name meshctl gives front's, up, with an address of its own.
    for argv in (
        ["link", "add", bridge, "type", "bridge"],
        ["addr", "add", "192.0.2.1/24", "dev", bridge],
        ["link", "set", bridge, "addrgenmode", "none"],  # no IPv6 address whose DAD moves on
        ["link", "set", bridge, "up"],
    ):
        subprocess.run(["ip", "-n", mesh.node_ns, *argv], check=True)

    def shown() -> str:
        link = mesh.in_node("ip", "-d", "-o", "link", "show", "dev", bridge).stdout
        return (
            re.sub(r"\w+_timer +[\d.]+ ?", "", link)
            + mesh.in_node("ip", "-o", "addr", "show", "dev", bridge).stdout
        )

    before = shown()
    mesh.cli("service", "create", "--name", "web", "--network", "front", "--detach", "--",
             "sleep", "3600")  # fmt: skip
    mesh.start_controller()
    clash = f"! link {bridge} in the node namespace does not carry meshctl's mark for it (no alias)"
    wait_for(lambda: clash in mesh.diff().stdout, 20, "the clash in meshctl diff")
    wait_for(lambda: clash[2:] in Path(mesh.controller_log).read_text(), 10, "a warning")
    time.sleep(scaled(3))  # more than a resync period: still left alone
    diff = mesh.diff()
    assert diff.returncode == 1
    rest = (
        ": left alone, and what needs it is not made; delete or rename it to let meshctl make "
        "its own"
    )
    lb_ns = lb_netns(mesh.node_id() or "", network["id"])
    assert [line for line in diff.stdout.splitlines() if line.startswith("! ")] == [
        f"{clash}{rest}",
        f"! {lb_ns}: {clash[2:]}{rest}",
        f"! network front fails on node node1: {clash[2:]}{rest}",  # the node's own report
    ]
    assert shown() == before
    assert mesh.running("web") == []  # its leg would hang off the other tool's bridge
    # Once the other tool's bridge is gone, meshctl makes its own and the task runs.
    subprocess.run(["ip", "-n", mesh.node_ns, "link", "del", bridge], check=True)
    mesh.wait_running("web", 1)
    _converged(mesh)
    assert (
        f"alias meshctl:{network['id']}" in mesh.in_node("ip", "-o", "link", "show", bridge).stdout
    )


class _connect:
    """A TCP connection made from inside a task's namespace (the socket keeps the namespace)."""

    def __init__(self, task_id: str, address: str, port: int) -> None:
        self.sock = netns.run_in(
            task_netns(task_id), socket.create_connection, (address, port), scaled(5)
        )

    def __enter__(self) -> socket.socket:
        self.sock.settimeout(scaled(10))
        return self.sock

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


def test_task_keeps_its_own_dns_server_and_other_names_go_upstream_from_the_node(
    mesh: Mesh, netns_factory: NetnsFactory, tmp_path: Path
) -> None:
    # An upstream resolver in its own namespace, reachable from the node only.
    upstream = netns_factory("upstream")
    subprocess.run(["ip", "-n", mesh.node_ns, "link", "add", "mtup", "type", "veth",
                    "peer", "mtdns", "netns", upstream], check=True)  # fmt: skip
    for ns, dev, address in (
        (mesh.node_ns, "mtup", "198.51.100.1"),
        (upstream, "mtdns", "198.51.100.53"),
    ):
        subprocess.run(["ip", "-n", ns, "addr", "add", f"{address}/24", "dev", dev], check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", dev, "up"], check=True)
    subprocess.run(["ip", "-n", upstream, "link", "set", "lo", "up"], check=True)
    dnsmasq = subprocess.Popen(
        ["ip", "netns", "exec", upstream, "dnsmasq", "--no-daemon", "--no-resolv", "--no-hosts",
         "--listen-address=198.51.100.53", "--bind-interfaces",
         "--address=/outside.test/203.0.113.9",
         f"--pid-file={tmp_path}/up.pid"],
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        mesh.cli("network", "create", "front", "--subnet", "10.75.0.0/24")
        # The task runs its own DNS server on port 53 of every address.
        mesh.cli("service", "create", "--name", "dnsd", "--network", "front", "--detach", "--",
                 "dnsmasq", "--no-daemon", "--no-resolv", "--no-hosts", "--port=53",
                 "--address=/own.test/192.0.2.77", f"--pid-file={tmp_path}/own.pid")  # fmt: skip
        mesh.start_controller("--upstream-dns", "198.51.100.53")
        (task,) = mesh.wait_running("dnsd", 1)
        own = task["addresses"]["front"]
        vip = json.loads(mesh.cli("service", "inspect", "dnsd", "--format", "json").stdout)
        assert wait_for(lambda: mesh.dig(task, "dnsd"), 10, "an answer for dnsd") == [
            vip["networks"][0]["vip"]
        ]
        # Its own server, on its address.
        assert mesh.dig(task, f"@{own}", "own.test") == ["192.0.2.77"]
        assert mesh.dig(task, "outside.test") == ["203.0.113.9"]  # forwarded from the node side
    finally:
        dnsmasq.kill()
        dnsmasq.wait()
