"""The embedded DNS kept in line with the view: its record table, and its sockets in every
wired task namespace (UDP and TCP on random ports, which the task's redirect rules reach from
127.0.0.11:53). Two reconcilers of the pass share the node's one server thread: the records
first (answers follow the store at once), the endpoints after the node's wiring (a socket is
opened inside its task's namespace). Each task's ports are also written to its directory,
where `meshctl diff` reads them. Every endpoint's sockets are also held by the node's socket
keeper (meshctl.keeper), and a starting controller takes them back from it: its predecessor's
sockets, ports and redirects stay, and what tasks asked in between is answered."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from kernel.errors import KernelError
from kernel.netns import NETNS_DIR
from meshctl import naming
from meshctl.dns import DnsServer, DnsView
from meshctl.dns.desired import dns_view
from meshctl.dns.thread import ServerThread
from meshctl.keeper import KeeperClient, KeeperError
from meshctl.reconcile import PassContext, Ports
from meshctl.view import ClusterView

log = logging.getLogger("meshctl.dns")

DNS_PORTS_FILE = "dns-ports"
KEEPER_SOCKET = "dns-keeper.sock"  # in the state directory


def write_dns_ports(task_dir: str, ports: Ports) -> None:
    os.makedirs(task_dir, exist_ok=True)
    with open(os.path.join(task_dir, DNS_PORTS_FILE), "w") as f:
        json.dump(list(ports), f)


def read_dns_ports(state_dir: str, task_ids: list[str]) -> dict[str, Ports]:
    """The ports a controller left in each task's directory (for `meshctl diff`)."""
    ports = {}
    for task_id in task_ids:
        try:
            with open(os.path.join(naming.task_dir(state_dir, task_id), DNS_PORTS_FILE)) as f:
                udp, tcp = json.load(f)
        except (FileNotFoundError, ValueError):
            continue
        ports[task_id] = (int(udp), int(tcp))
    return ports


class DnsSync:
    """One DNS server thread for the node, and the reconcilers of its records and endpoints."""

    def __init__(self, upstreams: list[str], node: str, state_dir: str) -> None:
        self.server = ServerThread(DnsServer(upstreams))
        self.records = DnsRecords(self.server, node)
        keeper = KeeperClient(os.path.join(state_dir, KEEPER_SOCKET))
        self.endpoints = DnsEndpoints(self.server, state_dir, keeper)

    def start(self) -> None:
        """Serve, starting with the sockets a controller before this one left to the keeper."""
        self.server.__enter__()
        self.endpoints.adopt()

    def stop(self) -> None:
        """Stop serving; the keeper keeps every endpoint's sockets for the next controller."""
        self.server.__exit__(None, None, None)
        self.endpoints.close()


class DnsRecords:
    """The record table, rebuilt when what it says changed (a plan of None: it did not)."""

    name = "dns"
    converges = True

    def __init__(self, server: ServerThread, node: str) -> None:
        self.server = server
        self.node = node
        self._view: DnsView | None = None

    def plan(self, view: ClusterView, ctx: PassContext) -> DnsView | None:
        records = dns_view(view, self.node)
        return records if records != self._view else None

    def apply(self, records: DnsView | None, ctx: PassContext) -> dict[str, str]:
        if records is not None:
            self.server.update(records)
            self._view = records
        return {}

    def describe(self, records: DnsView | None) -> Iterator[str]:
        return iter(())  # the table lives in the controller's process: nothing to compare


@dataclass(frozen=True)
class EndpointPlan:
    """Endpoints to close (task ids) and to open (task id → the networks it answers for)."""

    remove: tuple[str, ...] = ()
    add: tuple[tuple[str, frozenset[str]], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.remove or self.add)


class DnsEndpoints:
    """Sockets in every wired task namespace that is present (ctx.present), none in the others.
    Not checked by a second plan: an endpoint that cannot open yet is logged and retried."""

    name = "dns"
    converges = False

    def __init__(
        self, server: ServerThread, state_dir: str, keeper: KeeperClient | None = None
    ) -> None:
        self.server = server
        self.state_dir = state_dir
        self.keeper = keeper
        self.ports: dict[str, Ports] = {}  # task id → (udp, tcp) in its namespace
        self._networks: dict[str, frozenset[str]] = {}

    def adopt(self) -> None:
        """Serve the sockets the keeper holds (a stopped controller's): same ports, so the
        tasks' redirects stay. The first plan then closes those of tasks that are gone."""
        if self.keeper is None:
            return
        try:
            taken = self.keeper.take()
        except (KeeperError, OSError) as err:
            log.warning("no DNS sockets taken back from the keeper: %s", err)
            self.keeper.close()  # reached again (or started) on the next change
            return
        for task_id, info, socks in taken:
            networks = frozenset(info.get("networks", ()))
            if len(socks) != 2:
                for sock in socks:
                    sock.close()
                continue
            udp, tcp = socks
            ports = self.server.adopt_endpoint(task_id, networks, udp, tcp, waiting=True)
            self.ports[task_id] = ports
            self._networks[task_id] = networks
        if taken:
            log.info("DNS: took the sockets of %d task(s) back from the keeper", len(taken))

    def close(self) -> None:
        if self.keeper is not None:
            self.keeper.close()

    def plan(self, view: ClusterView, ctx: PassContext) -> EndpointPlan:
        wanted = {
            tid: frozenset(view.tasks[tid].addresses)
            for tid in sorted(ctx.wired)
            if tid in view.tasks and naming.task_netns(tid) in ctx.present
        }
        return EndpointPlan(
            tuple(sorted(set(self.ports) - set(wanted))),
            tuple(
                (tid, networks)
                for tid, networks in wanted.items()
                if tid not in self.ports or self._networks.get(tid) != networks
            ),
        )

    def apply(self, plan: EndpointPlan, ctx: PassContext) -> dict[str, str]:
        """Close and open; the ports opened go to ctx.dns_added (their redirects follow)."""
        for task_id in plan.remove:
            self.server.remove_endpoint(task_id)
            del self.ports[task_id]
            self._keep(task_id, None)
        for task_id, networks in plan.add:
            netns = naming.task_netns(task_id)
            try:
                ports = self.server.add_endpoint(task_id, netns, networks)
            except KernelError as err:
                log.warning("no DNS for task %s yet: %s", task_id, err)
                continue
            self.ports[task_id] = ctx.dns_added[task_id] = ports
            self._networks[task_id] = networks
            write_dns_ports(naming.task_dir(self.state_dir, task_id), ports)
            info = {"namespace": os.path.join(NETNS_DIR, netns), "networks": sorted(networks)}
            self._keep(task_id, info)
        return {}

    def _keep(self, task_id: str, info: dict[str, Any] | None) -> None:
        """Hand the endpoint's sockets to the keeper (info None: tell it to close them). A
        keeper out of reach costs only the DNS gap of the next restart: said, not fatal."""
        if self.keeper is None:
            return
        try:
            if info is None:
                self.keeper.drop(task_id)
            else:
                self.keeper.put(task_id, info, list(self.server.sockets(task_id)))
        except (KeeperError, OSError) as err:
            log.warning("DNS sockets of task %s not kept across a restart: %s", task_id, err)
            self.keeper.close()  # reached again (or started) on the next change

    def describe(self, plan: EndpointPlan) -> Iterator[str]:
        return iter(())  # sockets of the controller's process: nothing `meshctl diff` can see
