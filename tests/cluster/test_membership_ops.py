"""A node's role changed, and a node leaving (#26), on a cluster made by `cluster init`: roles
are the store's (etcd users), each node's controller follows the role the store gives it.
One cluster walks through promote, losing a manager, demote and leave."""

from __future__ import annotations

import os
import shutil
import signal

import pytest

from kernel import netns
from meshctl.cluster import config as cluster_config
from meshctl.cluster.config import ClusterPaths
from meshctl.commands.cluster import open_cluster_store
from meshctl.commands.cluster_roles import Admin
from meshctl.store import StoreError
from tests.cluster.harness import Cluster
from tests.cluster.workloads import nodes
from tests.conftest import kill_processes_in
from tests.kernel.mesh import wait_for

pytestmark = [pytest.mark.root, pytest.mark.cluster]


def _voters(cluster: Cluster, via: str) -> dict[str, bool]:
    """The store's members by name (learner: False), as manager `via` lists them."""
    node = cluster.nodes[via]
    admin = Admin.here(node.state_dir).through(f"https://{node.address}:2379")
    listed = netns.run_in(cluster.client.netns, admin.members)
    return {m.name: not m.learner for m in listed}


def _role(cluster: Cluster, node: str) -> str | None:
    config = cluster_config.load(cluster.nodes[node].state_dir)
    return config.role if config is not None else None


def _reaching_the_store(cluster: Cluster, *args: str, node: str) -> str:
    """`meshctl ARGS` on node, again while the store cannot be reached (with a manager lost on
    a loaded host, etcd may hold elections for a while); its output once it succeeds."""

    def attempt() -> str | None:
        done = cluster.cli(*args, node=node, check=False)
        if done.returncode == 0:
            return done.stdout
        assert "cannot be reached" in done.stderr, done.stderr
        return None

    return str(wait_for(attempt, 60, f"meshctl {' '.join(args)} on {node}"))


def _one_line(done: object) -> str:
    stderr = str(getattr(done, "stderr", "")).strip()
    assert getattr(done, "returncode", 0) == 1 and len(stderr.splitlines()) == 1, done
    return stderr


def test_promote_demote_and_leave(tmp_path: str) -> None:
    """node1 founds the cluster, node2 and node3 join as workers. Promoted, each runs a voting
    member and may write; with node1 lost whole, node2 writes on. Demoting the lost node1 keeps
    the store's quorum (node rm refuses it before), and node1's controller, back, starts as a
    worker; demoting node3 makes its controller stop its member and forget the managers'
    secrets, and its writes are refused; the last manager cannot be demoted. node3 leaves: its
    copied credentials open nothing at once."""
    with Cluster(nodes=3, trust=True, managers=1) as cluster:
        refused = cluster.cli("service", "create", "--name", "w", "--", "true", node="node2",
                              check=False)  # fmt: skip
        assert "this node is not a manager" in _one_line(refused)
        for name in ("node2", "node3"):
            said = cluster.cli("node", "promote", name).stdout
            assert said.strip() == f"node {name} is a manager now"
        assert cluster.cli("node", "promote", "node2").stdout.strip().endswith("already")
        wait_for(lambda: _voters(cluster, "node1") == dict.fromkeys(cluster.nodes, True), 90,
                 "node2's and node3's members to vote")  # fmt: skip
        wait_for(lambda: {_role(cluster, n) for n in cluster.nodes} == {"manager"}, 30,
                 "every controller to take its seat")  # fmt: skip
        for name in ("node2", "node3"):
            paths = ClusterPaths(cluster.nodes[name].state_dir)
            assert os.stat(paths.ca_key).st_mode & 0o077 == 0
        cluster.cli("network", "create", "front", node="node3")  # a promoted node writes

        # node1 lost whole: its controller, its member and its tasks; its leg cut.
        cluster.stop_controller("node1", signal.SIGKILL)
        cluster.cut("node1")
        kill_processes_in(f"/run/netns/{cluster.nodes['node1'].netns}")
        wait_for(lambda: cluster.cli("network", "create", "back", node="node2",
                                     check=False).returncode == 0,
                 60, "a write from node2 with node1 gone")  # fmt: skip
        # Without node1, node3's member leaving would leave node2's alone: no quorum.
        refused = cluster.cli("node", "demote", "node3", node="node2", check=False)
        assert "fewer than the 2 that writes need" in _one_line(refused)
        wait_for(lambda: nodes(cluster, node="node2")["node1"]["state"] == "down", 60,
                 "node1 down")  # fmt: skip
        refused = cluster.cli("node", "rm", "node1", node="node2", check=False)
        assert "node node1 is a manager: demote it first" in _one_line(refused)
        _reaching_the_store(cluster, "node", "demote", "node1", node="node2")
        assert _voters(cluster, "node2") == {"node2": True, "node3": True}
        # node1 back: its controller finds it demoted meanwhile and starts as a worker.
        cluster.heal("node1")
        cluster.start_controller("node1")
        wait_for(lambda: _role(cluster, "node1") == "worker", 60, "node1 to start as a worker")
        cluster.wait_registered()
        assert not os.path.exists(ClusterPaths(cluster.nodes["node1"].state_dir).etcd_dir)

        _reaching_the_store(cluster, "node", "demote", "node3", node="node2")
        node3 = ClusterPaths(cluster.nodes["node3"].state_dir)
        wait_for(lambda: _role(cluster, "node3") == "worker", 30, "node3 to step down")
        assert _voters(cluster, "node2") == {"node2": True}
        assert not os.path.exists(node3.ca_key) and not os.path.exists(node3.root_password)
        assert not os.path.exists(node3.etcd_dir)
        refused = cluster.cli("network", "create", "x", node="node3", check=False)
        assert "this node is not a manager" in _one_line(refused)
        refused = cluster.cli("node", "demote", "node2", node="node2", check=False)
        assert "node node2 is the last manager" in _one_line(refused)
        refused = cluster.cli("cluster", "leave", node="node2", check=False)
        assert "this node is a manager: demote it first" in _one_line(refused)

        # node3 leaves; whoever copied its state dir before gets nothing from the store.
        refused = cluster.cli("cluster", "leave", node="node3", check=False)
        assert "stop it first" in _one_line(refused)
        cluster.stop_controller("node3")
        copy = os.path.join(tmp_path, "node3-copy")
        shutil.copytree(cluster.nodes["node3"].state_dir, copy)
        said = cluster.cli("cluster", "leave", node="node3").stdout
        assert "left the cluster" in said
        assert cluster_config.load(cluster.nodes["node3"].state_dir) is None
        assert set(nodes(cluster, node="node2")) == {"node1", "node2"}

        def read_with_the_copy() -> object:
            with open_cluster_store(copy) as store:
                return store.list("node")

        with pytest.raises(StoreError, match="cannot log in"):
            netns.run_in(cluster.client.netns, read_with_the_copy)
