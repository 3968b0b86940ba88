"""The HTTP routing mesh across the cluster (#19): every node's router, reached through every
node's published port, routes to the service's tasks on any node."""

from __future__ import annotations

from collections import Counter

import pytest

from tests.cluster.harness import Cluster
from tests.cluster.workloads import live, wait_live, web
from tests.kernel.mesh import wait_for

pytestmark = [pytest.mark.root, pytest.mark.cluster]


def test_every_nodes_port_80_routes_to_tasks_on_any_node(cluster: Cluster) -> None:
    cluster.cli("router", "enable")
    web(cluster, 3, "--hostname", "a.test", "--replicas-max-per-node", "1")
    tasks = wait_live(cluster, "web", 3)
    assert {t["node"] for t in tasks} == {"node1", "node2", "node3"}
    names = {t["name"] for t in tasks}

    def ask(node: str, host: str = "a.test") -> tuple[str, str]:
        address = cluster.nodes[node].address
        got = cluster.in_client("curl", "-s", "--max-time", "3", "-H", f"Host: {host}",
                                "-w", "\n%{http_code}", f"http://{address}/")  # fmt: skip
        body, _, code = got.stdout.rpartition("\n")
        return code, body.strip()

    for node in cluster.nodes:
        wait_for(lambda n=node: ask(n)[0] == "200", 30, f"a.test through {node}")  # type: ignore[misc]
        answers = Counter(ask(node) for _ in range(30))
        assert {body for _, body in answers} == names, (node, answers)
        assert {code for code, _ in answers} == {"200"}
        assert ask(node, "c.test") == ("503", "no route for host c.test")
    # A task leaves (scaled down): no node's router sends to it any more.
    cluster.cli("service", "scale", "web=2", "-d")
    wait_for(lambda: len(cluster.ps("web")) == 2, 30, "one task gone")
    left = {t["name"] for t in live(cluster, "web")}
    for node in cluster.nodes:
        assert {ask(node)[1] for _ in range(20)} == left
