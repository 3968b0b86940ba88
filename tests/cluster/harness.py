"""A meshctl cluster in network namespaces on one host, made and removed by this one module.

    <prefix>ul       the underlay: bridge br0, gateway .1 of the subnet, ip_forward=1
      ├ <prefix>etcd     eth0 .2   etcd (tests/etcd.py), the cluster's store
      ├ <prefix>client   eth0 .3   a host outside every node, for connections from outside
      └ <prefix>nodeN    eth0 .(10+N), default route via .1, a controller `--node nodeN`

Each namespace is a Host that knows how to run commands (mininet's model); its leg is a veth
whose underlay end, named after the host, is a port of br0. The root namespace gets no leg and
no route: everything runs through `nsenter --net` (not `ip netns exec`, whose private mount
namespace would hide the task namespaces the controllers make), and the harness reads the
store from a thread inside the client namespace.

close() removes what the cluster made and nothing else: its controllers, the task and
load-balancer namespaces its controllers made (known from its store and from the links that
hang off its nodes), its own namespaces, etcd and its directories. It is safe after a start
that failed halfway and when called twice. `python -m tests.cluster.harness up|down --dir DIR`
does the same across processes, recording what it made in DIR/cluster.json (scripts/demo).
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from kernel import netns
from kernel.errors import NotFound
from meshctl.naming import (
    LB_NETNS_PREFIX,
    ROUTER_NETNS_PREFIX,
    TASK_NETNS_PREFIX,
    lb_netns_prefix,
    router_netns,
    task_netns,
)
from meshctl.store import StoreError
from meshctl.store.etcd import EtcdStore, parse_etcd_url
from tests.conftest import TEST_NETNS_PREFIX, kill_processes_in
from tests.etcd import EtcdServer
from tests.kernel.mesh import LB_BACKEND, MESHCTL, invoke_cli, wait_for

T = TypeVar("T")
BRIDGE = "br0"
ETCD_PORT = 2379
STATE_FILE = "cluster.json"
_clusters = itertools.count()


@dataclass
class Host:
    """A namespace on the underlay: runs commands inside, reached through its leg."""

    netns: str
    address: str
    leg: str  # the underlay end of its veth (≤ 15 characters), a port of br0; eth0 inside

    def argv(self, *argv: str) -> list[str]:
        return nsenter(self.netns, *argv)

    def run(
        self, *argv: str, timeout: float = 60, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return run_in_netns(self.netns, *argv, timeout=timeout, env=env)


@dataclass
class Node(Host):
    """A host with a controller of its own, named `name` in the store, with its own state dir."""

    name: str = ""
    state_dir: str = ""
    pid: int | None = None  # its controller's, while one runs

    @property
    def log_path(self) -> str:
        return os.path.join(self.state_dir, "controller.log")

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "MESHCTL_STATE_DIR": self.state_dir}


class Cluster:
    """`nodes` controllers on one etcd, each in a node namespace on one underlay.

    prefix starts every namespace name (default: the test run's prefix and a counter, unique
    per cluster); subnet is the underlay's; base_dir holds the state dirs and etcd's data (made,
    if missing, and removed; default: a temporary directory, made here); state_file, if given,
    records what was made as it is made, for `Cluster.load` in another process.
    """

    def __init__(
        self,
        nodes: int = 3,
        *,
        prefix: str | None = None,
        subnet: str = "10.99.0.0/24",
        base_dir: str | None = None,
        controller_args: Sequence[str] = (),
        state_file: str | None = None,
        trust: bool = False,
        managers: int = 1,
        init_args: Sequence[str] = (),
    ) -> None:
        self.prefix = prefix if prefix is not None else f"{TEST_NETNS_PREFIX}c{next(_clusters)}-"
        self.subnet = ipaddress.IPv4Network(subnet)
        if self.subnet.num_addresses < 10 + nodes + 2:
            raise ValueError(f"subnet {subnet} has no room for {nodes} nodes at .11 and up")
        self.base_dir = base_dir or tempfile.mkdtemp(prefix="meshctl-cluster-")
        self.made_dirs: list[str] = [] if base_dir else [self.base_dir]
        self.made: list[str] = []  # namespaces, in the order they were made
        self.controller_args = tuple(controller_args)
        self.state_file = state_file
        self.underlay = f"{self.prefix}ul"
        self.etcd_host = Host(f"{self.prefix}etcd", self._address(2), "etcd")
        self.client = Host(f"{self.prefix}client", self._address(3), "client")
        self.nodes = {
            f"node{i}": Node(
                f"{self.prefix}node{i}", self._address(10 + i), f"node{i}", name=f"node{i}",
                state_dir=os.path.join(self.base_dir, f"node{i}"),
            )
            for i in range(1, nodes + 1)
        }  # fmt: skip
        self.store_url = f"etcd://{self.etcd_host.address}:{ETCD_PORT}"
        self.etcd = EtcdServer(
            address=self.etcd_host.address, client_port=ETCD_PORT, peer_port=ETCD_PORT + 1,
            netns=self.etcd_host.netns, name="cluster",
            data_dir=os.path.join(self.base_dir, "etcd"),
        )  # fmt: skip
        # trust: the cluster forms itself (#26): node1 runs `cluster init` (its etcd member, TLS
        # and users), the others `cluster join`; nobody passes --store. Else one plain etcd.
        self.trust = trust
        self.managers = managers  # with trust: node1 to node<managers> are managers
        self.init_args = tuple(init_args)  # more `cluster init` options
        self.joined_in: dict[str, float] = {}  # seconds from `cluster join` to the node up
        self.etcd_pid: int | None = None
        self._record: str | None = None  # state_file once it is this cluster's, kept up to date
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    def _address(self, index: int) -> str:
        return str(self.subnet[index])

    @property
    def gateway(self) -> str:
        return self._address(1)

    # -- making it -----------------------------------------------------------------------------

    def start(self) -> Cluster:
        """Make everything and wait until every controller has registered its node; on any
        failure remove what was made and raise."""
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def _start(self) -> None:
        if self.state_file and os.path.exists(self.state_file):
            raise RuntimeError(f"{self.state_file} records a running cluster: `down` removes it")
        if not os.path.isdir(self.base_dir):
            os.makedirs(self.base_dir)
            self.made_dirs.append(self.base_dir)
        self._record = self.state_file
        self._save()
        self._add_netns(self.underlay)
        _ip("-n", self.underlay, "link", "add", BRIDGE, "type", "bridge")
        _ip("-n", self.underlay, "addr", "add", f"{self.gateway}/{self.subnet.prefixlen}",
            "dev", BRIDGE)  # fmt: skip
        _ip("-n", self.underlay, "link", "set", BRIDGE, "up")
        _ip("netns", "exec", self.underlay, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        for host in (self.etcd_host, self.client, *self.nodes.values()):
            self._attach(host)
        for node in self.nodes.values():
            self._mkdir(node.state_dir)
        if self.trust:
            self._form()
            return
        self._mkdir(self.etcd.data_dir)
        self.etcd.start()
        assert self.etcd.process is not None
        self.etcd_pid = self.etcd.process.pid
        self._save()
        for node in self.nodes.values():
            self.start_controller(node.name)
        self.wait_registered()

    def _form(self) -> None:
        """node1 founds the cluster and takes joins once its controller runs; the others join
        it, as managers up to `managers`, then as workers."""
        first = self.nodes["node1"]
        self.cli("cluster", "init", "--advertise-addr", first.address, "--node", "node1",
                 *self.init_args)  # fmt: skip
        self.start_controller("node1")
        self.wait_registered()
        tokens = {
            role: self.cli("cluster", "join-token", role, "--quiet").stdout.strip()
            for role in ("manager", "worker")
        }
        for index, node in enumerate(list(self.nodes.values())[1:], start=2):
            token = tokens["manager" if index <= self.managers else "worker"]
            join = ("cluster", "join", "--token", token, "--advertise-addr", node.address,
                    "--node", node.name, first.address)  # fmt: skip
            began = time.monotonic()
            wait_for(lambda n=node, j=join: self.cli(*j, node=n.name, check=False).returncode == 0,
                     60, f"{node.name} to join")  # fmt: skip
            self.start_controller(node.name)
            self.wait_registered()
            self.joined_in[node.name] = time.monotonic() - began

    def _add_netns(self, name: str) -> None:
        _ip("netns", "add", name)  # fails if the name is taken: never adopt another's namespace
        self.made.append(name)
        self._save()
        _ip("-n", name, "link", "set", "lo", "up")

    def _attach(self, host: Host) -> None:
        """A namespace for host with its leg on the bridge, its address and a default route."""
        self._add_netns(host.netns)
        _ip("-n", self.underlay, "link", "add", host.leg, "type", "veth",
            "peer", "name", "eth0", "netns", host.netns)  # fmt: skip
        _ip("-n", self.underlay, "link", "set", host.leg, "master", BRIDGE, "up")
        _ip("-n", host.netns, "addr", "add", f"{host.address}/{self.subnet.prefixlen}",
            "dev", "eth0")  # fmt: skip
        _ip("-n", host.netns, "link", "set", "eth0", "up")
        _ip("-n", host.netns, "route", "add", "default", "via", self.gateway)

    def _mkdir(self, path: str) -> None:
        os.mkdir(path)  # fails if it exists: never remove another's directory
        self.made_dirs.append(path)
        self._save()

    # -- controllers ---------------------------------------------------------------------------

    def start_controller(self, node: str, *extra: str) -> None:
        """Start node's controller (extra: more `controller run` options), logging to
        <state dir>/controller.log, in a session of its own so it outlives `up`."""
        n = self.nodes[node]
        assert n.pid is None, f"the controller of {node} runs already"
        argv = [*MESHCTL, *self._store_args(), "controller", "run", "--node", node,
                "--advertise-addr", n.address, "--resync-period", "2s", "--lb-backend", LB_BACKEND,
                *self.controller_args, *extra]  # fmt: skip
        with open(n.log_path, "ab") as log:
            proc = subprocess.Popen(
                n.argv(*argv), env=n.env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True,
            )  # fmt: skip
        self._children[proc.pid] = proc
        n.pid = proc.pid
        self._save()

    def stop_controller(self, node: str, sig: int = signal.SIGTERM, timeout: float = 15) -> None:
        """Signal node's controller and wait until it has ended (SIGKILL after timeout)."""
        n = self.nodes[node]
        if n.pid is not None:
            self._end(n.pid, n.netns, sig, timeout)
            n.pid = None
            self._save()

    def kill_controller(self, node: str) -> None:
        self.stop_controller(node, signal.SIGKILL)

    def wait_registered(self, timeout: float = 60) -> None:
        """Wait until every node whose controller runs is up (its status is in the store);
        fail early with the log of a controller that exited."""

        def registered() -> bool:
            for n in self.nodes.values():
                if n.pid is not None and self._ended(n.pid, n.netns):
                    raise RuntimeError(f"the controller of {n.name} exited: {self.logs(n.name)}")
            running = {n.name for n in self.nodes.values() if n.pid is not None}
            return running <= set(self.node_statuses())

        wait_for(registered, timeout, "every controller to register its node", interval=0.2)

    def logs(self, node: str) -> str:
        try:
            with open(self.nodes[node].log_path, errors="replace") as log:
                return log.read()
        except FileNotFoundError:
            return ""

    def _ended(self, pid: int, ns: str) -> bool:
        if pid in self._children:
            return self._children[pid].poll() is not None
        return not _runs_in(pid, ns)  # started by another process (`up`): a pid reused is not it

    def _end(self, pid: int, ns: str, sig: int, timeout: float) -> None:
        if not self._ended(pid, ns):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            deadline = time.monotonic() + timeout
            while not self._ended(pid, ns):
                if time.monotonic() > deadline:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                    deadline = float("inf")
                time.sleep(0.05)
        self._children.pop(pid, None)

    # -- failures ------------------------------------------------------------------------------

    def cut(self, node: str) -> None:
        """Take node's leg down on the underlay side: it loses etcd and the other nodes."""
        _ip("-n", self.underlay, "link", "set", self.nodes[node].leg, "down")

    def heal(self, node: str) -> None:
        _ip("-n", self.underlay, "link", "set", self.nodes[node].leg, "up")

    def stop_etcd(self) -> None:
        """Stop etcd; start_etcd() brings the same data back."""
        self.etcd.stop()

    def start_etcd(self) -> None:
        self.etcd.start()
        assert self.etcd.process is not None
        self.etcd_pid = self.etcd.process.pid
        self._save()

    def compact(self) -> None:
        """Compact etcd's history to the current revision: watchers behind it must re-list."""
        self.call_store(lambda store: store.compact(store.revision()))

    # -- running things ------------------------------------------------------------------------

    def cli(
        self, *args: str, node: str = "node1", check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """The meshctl CLI on the cluster's store, run inside node's namespace."""
        n = self.nodes[node]
        result = n.run(*MESHCTL, *self._store_args(), *args, env=n.env, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"meshctl {' '.join(args)} on {node}: {result.stderr.strip()}")
        return result

    def diff(self, node: str) -> subprocess.CompletedProcess[str]:
        """`meshctl diff` of node, run where its controller runs: in this process (a new
        interpreter costs seconds on a loaded host), in a thread inside node's namespace."""
        argv = [*self._store_args(), "diff", "--node", node]
        return netns.run_in(self.nodes[node].netns, invoke_cli, argv, self.nodes[node].env)

    def ps(self, service: str, node: str = "node1") -> list[dict[str, Any]]:
        """`service ps SERVICE --format json`."""
        tasks: list[dict[str, Any]] = json.loads(
            self.cli("service", "ps", service, "--format", "json", node=node).stdout
        )
        return tasks

    def in_node(
        self, node: str, *argv: str, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return self.nodes[node].run(*argv, timeout=timeout)

    def in_client(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return self.client.run(*argv, timeout=timeout)

    def in_task(
        self, task_id: str, *argv: str, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """A command in a task's network namespace (not its mount namespace)."""
        return run_in_netns(task_netns(task_id), *argv, timeout=timeout)

    def _store_args(self) -> tuple[str, ...]:
        """A node's CLI finds a trusted cluster's store in its state dir; else --store."""
        return () if self.trust else ("--store", self.store_url)

    def call_store(
        self, fn: Callable[[EtcdStore], T], identity: str = "node1", prefix: str | None = None
    ) -> T:
        """fn(store) on the cluster's etcd, from a thread in the client namespace (the root
        namespace has no route to the underlay); in a trusted cluster with the certificate
        and login that the node `identity` keeps in its state dir."""

        def call() -> T:
            if self.trust:
                from meshctl.commands.cluster import open_cluster_store

                with open_cluster_store(self.nodes[identity].state_dir, prefix) as store:
                    return fn(store)
            with EtcdStore(*parse_etcd_url(self.store_url), timeout=3) as store:
                return fn(store)

        return netns.run_in(self.client.netns, call)

    def node_records(self) -> dict[str, dict[str, Any]]:
        """The `node` records of this cluster's nodes, by name."""
        records = self.call_store(lambda store: store.list("node"))
        return {r.name: r.value for r in records if r.name in self.nodes}

    def node_statuses(self) -> dict[str, dict[str, Any]]:
        """The statuses of this cluster's nodes whose controller is live, by name."""
        records = self.call_store(lambda store: store.list("node-status"))
        return {r.name: r.value for r in records if r.name in self.nodes}

    # -- removing it ---------------------------------------------------------------------------

    def close(self) -> None:
        """Remove everything the cluster made. Every step runs even when one before it failed
        (the first error is raised at the end); a second call finds nothing left to do."""
        errors = []
        for step in (self._stop_controllers, self._remove_meshctl_namespaces, self.etcd.stop,
                     self._remove_namespaces, self._remove_dirs):  # fmt: skip
            try:
                step()
            except Exception as err:
                errors.append(err)
        if errors:
            raise errors[0]  # the record stays: `down` can try again
        if self._record:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._record)
            self._record = None
        if self.base_dir in self.made_dirs:
            shutil.rmtree(self.base_dir, ignore_errors=True)
            self.made_dirs.remove(self.base_dir)

    def _stop_controllers(self) -> None:
        for node in self.nodes:
            self.stop_controller(node)

    def _remove_meshctl_namespaces(self) -> None:
        """The task, LB and router namespaces the controllers made: the tasks' and the nodes'
        ids from the store (while etcd still runs), and whatever hangs off a node by a link."""
        names = self._linked_namespaces()
        try:
            tasks = self.call_store(lambda store: store.list("task"))
            names |= {TASK_NETNS_PREFIX + r.name for r in tasks}
            for record in self.node_records().values():
                names |= set(netns.list_namespaces(lb_netns_prefix(str(record["id"]))))
                names.add(router_netns(str(record["id"])))
        except (StoreError, NotFound, OSError):
            pass  # etcd or the client never came up, or is gone: the links tell the rest
        for name in sorted(names):
            kill_processes_in(netns.path(name))
            netns.delete(name)

    def _linked_namespaces(self) -> set[str]:
        """meshctl's namespaces with a veth peer in one of this cluster's node namespaces."""
        found: set[str] = set()
        for node in self.nodes:
            found |= self.linked_namespaces(node)
        return found

    def linked_namespaces(self, node: str) -> set[str]:
        """meshctl's namespaces (task, LB, router) with a veth peer in node's namespace."""
        n = self.nodes[node]
        if n.netns not in self.made or not netns.exists(n.netns):
            return set()
        links = json.loads(_ip("-n", n.netns, "-j", "link", "show"))
        ids = json.loads(_ip("-n", n.netns, "-j", "netns", "list-id") or "[]")
        names = {i["nsid"]: i.get("name", "") for i in ids}
        peers = {names.get(link["link_netnsid"], "") for link in links if "link_netnsid" in link}
        ours = (TASK_NETNS_PREFIX, LB_NETNS_PREFIX, ROUTER_NETNS_PREFIX)
        return {p for p in peers if p.startswith(ours)}

    def _remove_namespaces(self) -> None:
        for name in reversed(self.made[:]):
            kill_processes_in(netns.path(name))
            netns.delete(name)
            self.made.remove(name)
            self._save()
        for node in self.nodes.values():
            node.pid = None
        self.etcd_pid = None

    def _remove_dirs(self) -> None:
        """Every directory it made but the base dir, which holds the record until the end."""
        for path in reversed(self.made_dirs[:]):
            if path != self.base_dir:
                shutil.rmtree(path, ignore_errors=True)
                self.made_dirs.remove(path)
                self._save()

    # -- the record for `down` -----------------------------------------------------------------

    def _save(self) -> None:
        if not self._record:
            return
        record = {
            "nodes": len(self.nodes), "prefix": self.prefix, "subnet": str(self.subnet),
            "base_dir": self.base_dir, "made_dirs": self.made_dirs, "netns": self.made,
            "controllers": {n.name: n.pid for n in self.nodes.values()},
            "etcd_pid": self.etcd_pid, "store": self.store_url, "trust": self.trust,
        }  # fmt: skip
        tmp = self._record + ".tmp"
        with open(tmp, "w") as out:
            json.dump(record, out, indent=2)
        os.replace(tmp, self._record)

    @classmethod
    def load(cls, state_file: str) -> Cluster:
        """The cluster another process made, as its state file records it."""
        with open(state_file) as f:
            record = json.load(f)
        cluster = cls(record["nodes"], prefix=record["prefix"], subnet=record["subnet"],
                      base_dir=record["base_dir"], state_file=state_file,
                      trust=record.get("trust", False))  # fmt: skip
        cluster.made, cluster.made_dirs = record["netns"], record["made_dirs"]
        for name, pid in record["controllers"].items():
            cluster.nodes[name].pid = pid
        cluster.etcd_pid = record["etcd_pid"]  # etcd ends with its namespace
        cluster._record = state_file
        return cluster

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _ip(*args: str) -> str:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


def nsenter(ns: str, *argv: str) -> list[str]:
    """argv run in namespace ns: `nsenter --net`, which keeps the host's mounts (/run/netns)."""
    return ["nsenter", f"--net={netns.path(ns)}", "--", *argv]


def run_in_netns(
    ns: str, *argv: str, timeout: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(nsenter(ns, *argv), capture_output=True, text=True, timeout=timeout,
                          env=env)  # fmt: skip


def _runs_in(pid: int, ns: str) -> bool:
    """Whether pid is a live process in namespace ns (a zombie has no namespace left)."""
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(netns.path(ns)).st_ino
    except (FileNotFoundError, PermissionError):
        return False


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tests.cluster.harness",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=["up", "down"])
    parser.add_argument("--dir", default="/var/lib/meshctl-cluster", help="state and record")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--prefix", default="meshcl-", help="of every namespace name")
    parser.add_argument("--subnet", default="10.99.0.0/24", help="the underlay's")
    parser.add_argument(
        "--trust",
        action="store_true",
        help="form it with `cluster init` and `join` (TLS, a user per node)",
    )
    args = parser.parse_args(argv)
    state_file = os.path.join(args.dir, STATE_FILE)
    try:
        if args.command == "up":
            cluster = Cluster(args.nodes, prefix=args.prefix, subnet=args.subnet,
                              base_dir=args.dir, state_file=state_file,
                              trust=args.trust).start()  # fmt: skip
        elif os.path.exists(state_file):
            Cluster.load(state_file).close()
            print(f"cluster of {state_file} removed")
            return
        else:
            print(f"no cluster recorded in {state_file}")
            return
    except (RuntimeError, ValueError, OSError) as err:
        sys.exit(f"harness {args.command}: {err}")
    for node in cluster.nodes.values():
        print(f"{node.name}  netns {node.netns}  {node.address}  state {node.state_dir}")
    store = "node1's etcd member (TLS)" if cluster.trust else cluster.store_url
    print(f"store {store}; client netns {cluster.client.netns} {cluster.client.address}")


if __name__ == "__main__":
    main()
