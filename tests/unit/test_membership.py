"""A controller's membership: node record, status under a lease, one controller per node,
take-over from a dead controller of this host, leadership. Runs on both stores."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from meshctl.cluster import nodes
from meshctl.cluster.membership import Membership, NodeBusy, boot_id
from meshctl.commands.node import update_node
from meshctl.model import LEADER, LEADER_KEY, NODE_STATUS, Node, NodeStatus
from meshctl.router.sync import ROUTER, ROUTER_STARTING
from meshctl.runtime import read_start_time
from meshctl.store import Store
from tests.conftest import scaled


def wait_until(probe: object, timeout: float) -> bool:
    deadline = time.monotonic() + scaled(timeout)
    while time.monotonic() < deadline:
        if probe():  # type: ignore[operator]
            return True
        time.sleep(0.1)
    return False


def test_join_records_the_node_and_its_status_and_keeps_id_labels_availability(
    store: Store,
) -> None:
    first = Membership(store, Node("node1", "10.0.0.1"), ttl=5)
    node = first.join("iptables")
    (view,) = nodes.node_views(store)
    assert (view.state, view.node.address, view.status.lb_backend) == (  # type: ignore[union-attr]
        "ready",
        "10.0.0.1",
        "iptables",
    )
    update_node(store, "node1", availability="pause", labels_add={"zone": "a"})
    store.revoke_lease(first.lease)  # as if it had stopped long ago
    assert nodes.node_views(store)[0].state == "down"
    assert nodes.node_views(store)[0].node.lb_backend == "iptables"  # recorded, also when down
    moved = Membership(store, Node("node1", "10.0.0.9"), ttl=5)
    again = moved.join("nftables")
    assert moved.retired_lb_backend == "iptables"  # the controller clears its objects
    assert nodes.node_views(store)[0].node.lb_backend == "nftables"
    assert (again.id, again.labels, again.availability, again.address) == (
        node.id,
        {"zone": "a"},
        "pause",
        "10.0.0.9",
    )


def test_a_second_controller_for_a_live_node_is_refused(store: Store) -> None:
    Membership(store, Node("node1"), ttl=5).join()
    with pytest.raises(NodeBusy, match="node node1 already has a live controller"):
        Membership(store, Node("node1"), ttl=5).join()  # this process is alive
    other_host = NodeStatus("node2", pid=1, pid_start=1, boot_id="another-boot")
    store.put(NODE_STATUS, "node2", other_host.to_dict(), lease=store.grant_lease(5))
    with pytest.raises(NodeBusy, match="on another host"):
        Membership(store, Node("node2"), ttl=5).join()


def test_a_dead_controllers_status_on_this_host_is_taken_over_at_once(store: Store) -> None:
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    start = read_start_time(ended.pid)
    ended.wait()
    lease = store.grant_lease(30)
    dead = NodeStatus("node1", pid=ended.pid, pid_start=start or 1, boot_id=boot_id())
    store.put(NODE_STATUS, "node1", {**dead.to_dict(), "lease": lease}, lease=lease)
    store.put(LEADER, LEADER_KEY, {"node": "node1"}, lease=lease)  # the dead one led
    before = store.revision()
    member = Membership(store, Node("node1"), ttl=5)
    member.join()
    assert member.lease != lease
    assert nodes.statuses(store)["node1"].pid != ended.pid
    assert not store.keep_alive(lease)  # the dead one's lease was revoked
    # The status and the leadership moved to the new lease in place: neither key was ever
    # deleted, so the leader never saw the node down (which reschedules its tasks).
    events = store.watch(before, timeout=1)
    assert [(e.kind, e.type) for e in events if e.type != "put"] == []
    assert {(NODE_STATUS, "node1"), (LEADER, LEADER_KEY)} <= {(e.kind, e.name) for e in events}
    assert store.get(LEADER, LEADER_KEY).value == {"node": "node1"}  # type: ignore[union-attr]
    store.revoke_lease(member.lease)
    assert store.get(LEADER, LEADER_KEY) is None  # it is under the new lease now


def test_the_lease_keeps_the_node_up_until_it_stops_being_renewed(store: Store) -> None:
    member = Membership(store, Node("node1"), ttl=2)
    member.join()
    lost: list[str] = []
    member.start(lost.append)
    time.sleep(3)  # over the ttl: only the renewals keep it
    assert nodes.controller_running(store)
    member.stop()
    assert wait_until(lambda: not nodes.controller_running(store), 6)
    assert lost == []


def test_a_lapsed_lease_is_replaced_and_the_status_put_again(store: Store) -> None:
    member = Membership(store, Node("node1"), ttl=2)
    member.join()
    store.revoke_lease(member.lease)  # as etcd does when renewals stopped reaching it
    member.start(lambda why: None)
    try:
        assert wait_until(lambda: "node1" in nodes.statuses(store), 5)
    finally:
        member.stop()


def test_report_writes_only_changes_and_one_leader_at_a_time(store: Store) -> None:
    one = Membership(store, Node("node1"), ttl=5)
    one.join()
    two = Membership(store, Node("node2"), ttl=5)
    two.join()
    assert nodes.statuses(store)["node1"].errors == {ROUTER: ROUTER_STARTING}
    one.report("", {})  # the first pass says the router runs (#27)
    assert nodes.statuses(store)["node1"].errors == {}
    before = store.revision()
    one.report("", {})
    assert store.revision() == before  # nothing new to say
    one.report("degraded: boom", {"front": "no free address"})
    status = nodes.statuses(store)["node1"]
    assert (status.message, status.errors) == ("degraded: boom", {"front": "no free address"})
    assert one.lead(None) and not two.lead(None)
    assert nodes.leader(store) == "node1"
    assert one.lead("node1") and not two.lead("node1")
    store.revoke_lease(one.lease)  # node1 dies: the leader key goes with its lease
    assert store.get(LEADER, LEADER_KEY) is None
    assert two.lead(None)
