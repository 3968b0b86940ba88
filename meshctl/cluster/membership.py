"""This node in the cluster: its record, its status under a lease, and the leadership.

join() records the node (its id, labels and availability kept from earlier starts) and puts
its status under a new lease. Another live controller's status for the same node name refuses
the start; one left behind by a controller of this host that has died (its pid gone, or reused
by another process) is taken over at once, so a restart after a crash need not wait for the
lease to run out. The takeover moves the status (and the leadership, if the dead controller
held it) to the new lease in one transaction: the leader never sees the node down, so a
restart replaces none of its tasks. A stopping controller leaves its lease to expire for the
same reason. A thread renews the lease every ttl/3. When it lapsed anyway (the store was out
of reach longer than the ttl, and the leader has meanwhile rescheduled this node's tasks), a
new lease is taken and the status put again. report() writes the status only when what it
says changed; lead() takes the leader key when it is free.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable

from meshctl.cluster.nodes import register_ops
from meshctl.model import (
    LEADER,
    LEADER_KEY,
    NODE,
    NODE_STATUS,
    MeshctlError,
    Node,
    NodeStatus,
    from_record,
)
from meshctl.router.sync import ROUTER, ROUTER_STARTING
from meshctl.runtime import read_start_time
from meshctl.store import Conflict, LeaseExpired, Op, Put, Record, Store, StoreError

log = logging.getLogger("meshctl.membership")

DEFAULT_TTL = 10.0
BOOT_ID = "/proc/sys/kernel/random/boot_id"


class NodeBusy(MeshctlError):
    """Another live controller runs this node."""


def boot_id() -> str:
    try:
        with open(BOOT_ID) as f:
            return f.read().strip()
    except OSError:
        return ""


def _process_alive(pid: int, start: int) -> bool:
    return pid > 0 and read_start_time(pid) == start


def controller_ended(status: NodeStatus) -> bool:
    """Whether the controller that wrote status ran on this host (since its boot) and ended:
    its status may be taken over, or ended, at once."""
    here = status.boot_id == boot_id() and status.boot_id != ""
    return here and not _process_alive(status.pid, status.pid_start)


class Membership:
    """One controller's place in the cluster: its node, its lease, its status."""

    def __init__(
        self, store: Store, node: Node, *, ttl: float = DEFAULT_TTL, may_lead: bool = True
    ) -> None:
        self.store = store
        self.node = node
        self.ttl = ttl
        self.may_lead = may_lead  # a worker of a cluster made by `cluster init` never leads
        self.lease = 0
        self._status = NodeStatus(
            node.name,
            since=time.time(),
            pid=os.getpid(),
            pid_start=read_start_time(os.getpid()) or 0,
            boot_id=boot_id(),
            errors={ROUTER: ROUTER_STARTING},  # until the first pass says how it does
        )
        self._written: NodeStatus | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._unreachable = False
        self.retired_lb_backend = ""  # the backend the node ran before, if it ran another
        self.failures: dict[str, str] = {}  # what failed in the last pass, by network or task

    # -- joining -------------------------------------------------------------------------------

    def join(self, lb_backend: str = "", vxlan_port: int = 0) -> Node:
        """Record the node (with the load-balancer backend it runs) and put its status under a
        new lease; NodeBusy if it is live."""
        record = self.store.get(NODE, self.node.name)
        existing = from_record(Node, record) if record else None
        node = dataclasses.replace(self.node, lb_backend=lb_backend)
        ops = register_ops(node, existing, record.mod_revision if record else 0)
        if ops:
            self.store.txn(ops)
        self.node = node
        if existing is not None:
            if existing.lb_backend not in ("", lb_backend):
                self.retired_lb_backend = existing.lb_backend
            self.node = dataclasses.replace(
                existing,
                address=node.address or existing.address,
                lb_backend=lb_backend or existing.lb_backend,
            )
        self._status = dataclasses.replace(
            self._status, lb_backend=lb_backend, vxlan_port=vxlan_port
        )
        self._take_status()
        return self.node

    def _take_status(self) -> None:
        """A new lease and the node's status under it, over a dead predecessor's if need be."""
        for _ in range(3):  # the predecessor's lease may run out between reading and writing
            current = self.store.get(NODE_STATUS, self.node.name)
            if current is not None:
                self._refuse_live(current)
            lease = self.store.grant_lease(self.ttl)
            try:
                self.store.txn(self._takeover_ops(current, lease))
            except Conflict:
                self.store.revoke_lease(lease)
                continue
            if current is not None:  # it holds none of this node's keys any more
                self.store.revoke_lease(int(current.value.get("lease", 0)))
            with self._lock:
                self.lease = lease
                self._written = self._status
            return
        raise NodeBusy(
            f"node {self.node.name}: another controller started for it just now; "
            "run one controller per node"
        )

    def _refuse_live(self, current: Record) -> None:
        """NodeBusy unless the status is a controller's of this host that has died."""
        other = from_record(NodeStatus, current)
        if controller_ended(other):
            log.info("node=%s taking over from pid %d, which ended", other.node, other.pid)
            return
        here = other.boot_id == self._status.boot_id and other.boot_id != ""
        where = f"pid {other.pid} on this host" if here else "on another host"
        raise NodeBusy(
            f"node {self.node.name} already has a live controller ({where}); stop it first, "
            f"or give this one another --node"
        )

    def _takeover_ops(self, current: Record | None, lease: int) -> list[Op]:
        """The status under the new lease, replacing the predecessor's in place, and the
        leadership if the predecessor held it: one transaction, so the node never looks down
        to the leader (which would reschedule its running tasks) and the cluster never
        leaderless while a controller restarts."""
        value = self._value(self._status, lease)
        if current is None:
            return [Put(NODE_STATUS, self.node.name, value, expect=0, lease=lease)]
        ops: list[Op] = [
            Put(NODE_STATUS, self.node.name, value, expect=current.mod_revision, lease=lease)
        ]
        leader = self.store.get(LEADER, LEADER_KEY)
        if leader is not None and leader.value.get("node") == self.node.name:
            ops.append(
                Put(LEADER, LEADER_KEY, leader.value, expect=leader.mod_revision, lease=lease)
            )
        return ops

    def _value(self, status: NodeStatus, lease: int) -> dict[str, object]:
        return {**status.to_dict(), "lease": lease}

    # -- staying -------------------------------------------------------------------------------

    def start(self, on_lost: Callable[[str], None]) -> None:
        """Renew the lease every ttl/3 in a thread; on_lost(why) if another controller took the
        node meanwhile (this one must stop)."""
        self._thread = threading.Thread(
            target=self._keep_alive, args=(on_lost,), name="membership", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _keep_alive(self, on_lost: Callable[[str], None]) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                if not self.store.keep_alive(self.lease):
                    log.warning("node=%s lease lapsed; joining again", self.node.name)
                    self._take_status()
                if self._unreachable:
                    log.info("node=%s store reachable again", self.node.name)
                    self._unreachable = False
            except NodeBusy as err:
                on_lost(str(err))
                return
            except StoreError as err:
                if not self._unreachable:
                    log.warning("node=%s cannot renew its lease: %s", self.node.name, err)
                    self._unreachable = True

    def report(self, message: str, errors: dict[str, str], programmed: int | None = None) -> None:
        """Say how this node is doing (written only when it changed); programmed: the task
        revision its load balancers now follow, if it has one to report."""
        status = dataclasses.replace(self._status, message=message, errors=dict(errors))
        if programmed is not None:
            status = dataclasses.replace(status, programmed=programmed)
        with self._lock:
            if status == self._written:
                return
            lease = self.lease
        try:
            self.store.put(NODE_STATUS, self.node.name, self._value(status, lease), lease=lease)
        except LeaseExpired:
            return  # the keep-alive thread joins again and writes the status then
        with self._lock:
            self._status, self._written = status, status

    def report_pass(
        self, failures: dict[str, str], message: str = "", programmed: int | None = None
    ) -> None:
        """Tell the cluster how this node does after a pass (message: why the pass itself
        failed, if it did); log each failure once, when it starts. A store out of reach is
        logged: the next pass says it again."""
        for what in sorted(set(failures) - set(self.failures)):
            log.warning("%s fails on this node: %s", what, failures[what])
        self.failures = failures
        try:
            self.report(message, failures, programmed)
        except StoreError as err:
            log.warning("cannot report the node's status: %s", err)

    def lead(self, leader: str | None) -> bool:
        """Whether this node places tasks now: it holds the leader key (leader: who holds it in
        the last view), or took it because it was free."""
        if leader is not None:
            return leader == self.node.name
        if not self.may_lead:
            return False
        try:
            self.store.put(LEADER, LEADER_KEY, {"node": self.node.name}, expect=0, lease=self.lease)
        except (Conflict, LeaseExpired):
            return False
        log.info("node=%s is the leader: it places tasks now", self.node.name)
        return True
