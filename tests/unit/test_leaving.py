"""A leaving task across nodes: its node stops it only once every other node that balances over
it has reported taking it out of its spread (meshctl.lb.endpoints, the end of the file)."""

from __future__ import annotations

from dataclasses import replace

from meshctl import naming
from meshctl.lb.endpoints import out_of_every_spread, out_of_spread, programmed_revision
from meshctl.model import Network, NodeStatus, Task
from meshctl.view import ClusterView

FRONT = Network("front", "10.0.1.0/24", driver="overlay", vni=4096, id="net00001")
LOCAL = Network("local", "10.0.2.0/24", id="net00002")


def task(name: str, node: str, desired: str = "running", **addresses: str) -> Task:
    return Task(
        "web", "svc-web", int(name.rpartition(".")[2]), 1,
        desired_state=desired, state="running", node=node, addresses=addresses, pid=100,
        id=f"task-{name}",
    )  # fmt: skip


def view(*tasks: Task, programmed: dict[str, int], revisions: dict[str, int]) -> ClusterView:
    return ClusterView(
        revision=max(revisions.values()) + 5,
        networks={"front": FRONT, "local": LOCAL},
        services={},
        tasks={t.id: t for t in tasks},
        task_revisions={t.id: revisions[t.name] for t in tasks},
        nodes={},
        gateways={},
        lb_addresses={},
        containers={},
        statuses={n: NodeStatus(n, programmed=p) for n, p in programmed.items()},
    )


def test_a_task_to_stop_or_unhealthy_is_out_of_the_spread() -> None:
    assert out_of_spread(task("web.1", "node1", "shutdown", front="10.0.1.2"))
    assert not out_of_spread(task("web.1", "node1", front="10.0.1.2"))
    ill = replace(task("web.1", "node1", front="10.0.1.2"), health="unhealthy")
    assert out_of_spread(ill)
    assert not out_of_spread(replace(ill, health="starting"))


def test_a_node_reports_only_while_a_task_elsewhere_it_balances_over_is_leaving() -> None:
    going = task("web.1", "node1", "shutdown", front="10.0.1.2")
    staying = task("web.2", "node2", front="10.0.1.3")
    revisions = {"web.1": 40, "web.2": 44}
    both = view(going, staying, programmed={"node1": 0, "node2": 0}, revisions=revisions)
    assert programmed_revision(both, "node2", "n2", {}) == 44  # the newest task revision
    assert programmed_revision(both, "node1", "n1", {}) is None  # its own: it stops it itself
    at_rest = view(replace(going, desired_state="running"), staying,
                   programmed={"node1": 0, "node2": 0}, revisions=revisions)  # fmt: skip
    assert programmed_revision(at_rest, "node2", "n2", {}) is None  # nothing leaves: no write
    # Its load balancer on that network failed this pass: it may still send there.
    failed = {naming.lb_netns("n2", FRONT.id): "cannot set up its load balancer"}
    assert programmed_revision(both, "node2", "n2", failed) is None
    assert programmed_revision(both, "node2", "n2", {"meshb-other": "broken"}) == 44


def test_a_task_is_out_of_every_spread_once_each_other_node_reported_its_revision() -> None:
    going = task("web.1", "node1", "shutdown", front="10.0.1.2")
    client = task("client.1", "node3", front="10.0.1.9")  # node3 takes part in front
    revisions = {"web.1": 40, "client.1": 12}

    def out(node2: int, node3: int) -> bool:
        programmed = {"node1": 0, "node2": node2, "node3": node3}
        return out_of_every_spread(view(going, client, programmed=programmed,
                                        revisions=revisions), going)  # fmt: skip

    assert not out(40, 39)
    assert out(40, 41)
    # node2 has no task on front and publishes nothing: it balances nothing over it.
    assert out(0, 40)


def test_nodes_that_cannot_reach_the_task_are_not_waited_for() -> None:
    """A bridge network is its node's own: no other node sends to its tasks."""
    going = task("web.1", "node1", "shutdown", local="10.0.2.2")
    assert out_of_every_spread(
        view(going, programmed={"node1": 0, "node2": 0}, revisions={"web.1": 40}), going
    )
    assert (
        programmed_revision(
            view(going, programmed={"node1": 0, "node2": 0}, revisions={"web.1": 40}),
            "node2",
            "n2",
            {},
        )
        is None
    )
