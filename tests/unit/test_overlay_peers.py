"""The VXLAN peers a node programs (meshctl.overlay.vxlan.remote_peers)."""

from __future__ import annotations

from meshctl.model import Network, Node, NodeStatus, Task
from meshctl.overlay.vxlan import remote_peers
from meshctl.view import ClusterView

FRONT = Network("front", "10.10.0.0/24", driver="overlay", vni=4096)


def _view(*up: str) -> ClusterView:
    task = Task("web", "svc", 1, 1, state="running", node="node2",
                addresses={"front": "10.10.0.5"})  # fmt: skip
    return ClusterView(
        revision=1, networks={"front": FRONT}, services={}, tasks={task.id: task},
        task_revisions={}, nodes={n: Node(n, address=f"10.99.0.{i}")
                                  for i, n in enumerate(("node1", "node2"), start=11)},
        gateways={}, lb_addresses={("front", "node2"): "10.10.0.3"}, containers={},
        statuses={n: NodeStatus(n) for n in up},
    )  # fmt: skip


def test_a_peer_node_that_is_down_keeps_its_entries() -> None:
    """A node cut from the store only still serves: replies to its load balancer and its
    tasks' answers must still reach it over the overlay (#27)."""
    peers = remote_peers(_view("node1"), FRONT, "node1")
    assert {(p.address, p.vtep) for p in peers} == {
        ("10.10.0.5", "10.99.0.12"),
        ("10.10.0.3", "10.99.0.12"),
    }
    assert peers == remote_peers(_view("node1", "node2"), FRONT, "node1")
