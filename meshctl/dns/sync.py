"""The embedded DNS kept in line with the view: its record table, and its sockets in every
wired task namespace (UDP and TCP on random ports, which the task's nat rules reach from
127.0.0.11:53)."""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping

from kernel.errors import KernelError
from meshctl import naming
from meshctl.controller.diff import write_dns_ports
from meshctl.dns import DnsServer, DnsView
from meshctl.dns.desired import dns_view
from meshctl.dns.thread import ServerThread
from meshctl.view import ClusterView

log = logging.getLogger("meshctl.dns")


class DnsSync:
    """One DNS server thread for the node, its records and endpoints."""

    def __init__(self, upstreams: list[str]) -> None:
        self.server = ServerThread(DnsServer(upstreams))
        self._view: DnsView | None = None
        self.ports: dict[str, tuple[int, int]] = {}  # task id → (udp, tcp) in its namespace
        self._networks: dict[str, frozenset[str]] = {}

    def start(self) -> None:
        self.server.__enter__()

    def stop(self) -> None:
        self.server.__exit__(None, None, None)

    def sync_records(self, view: ClusterView, node: str) -> None:
        """The record table, rebuilt when what it says changed."""
        records = dns_view(view, node)
        if records != self._view:
            self.server.update(records)
            self._view = records

    def sync_endpoints(
        self, view: ClusterView, wired: Collection[str], present: Collection[str],
        task_dirs: Mapping[str, str],
    ) -> bool:  # fmt: skip
        """Sockets in every wired task namespace that is present, none in the others; True if
        any was added (its redirect rules are then due). task_dirs: where `meshctl diff` reads
        each task's ports."""
        wanted = {
            tid: frozenset(view.tasks[tid].addresses)
            for tid in wired
            if tid in view.tasks and naming.task_netns(tid) in present
        }
        for task_id in set(self.ports) - set(wanted):
            self.server.remove_endpoint(task_id)
            del self.ports[task_id]
        added = False
        for task_id, networks in wanted.items():
            if task_id in self.ports and self._networks.get(task_id) == networks:
                continue
            try:
                ports = self.server.add_endpoint(task_id, naming.task_netns(task_id), networks)
            except KernelError as err:
                log.warning("no DNS for task %s yet: %s", task_id, err)
                continue
            self.ports[task_id] = ports
            self._networks[task_id] = networks
            write_dns_ports(task_dirs[task_id], ports)
            added = True
        return added
