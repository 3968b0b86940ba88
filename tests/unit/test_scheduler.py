"""Task placement (the leader's plan): spread, constraints, per-node limits, down nodes, drain.

The plan is a pure function of a view; these tests build views by hand and check decisions,
then apply them to a real store to see the writes land (and a stale one be dropped).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from meshctl import ipam
from meshctl.cluster import scheduler
from meshctl.cluster.scheduler import Assign, Pending, Reschedule, Retire
from meshctl.commands.network import create_network
from meshctl.commands.node import update_node
from meshctl.commands.read import get_network, list_tasks
from meshctl.commands.service import create_service
from meshctl.model import NODE, NODE_STATUS, NetworkAttachment, Node, NodeStatus, Service, Task
from meshctl.store import open_store
from meshctl.view import ClusterView, read_view
from tests.unit.leader import settle


def view(
    nodes: Iterable[Node], tasks: Iterable[Task], services: Iterable[Service], up: Iterable[str]
) -> ClusterView:
    task_map = {t.id: t for t in tasks}
    return ClusterView(
        revision=1,
        networks={},
        services={s.id: s for s in services},
        tasks=task_map,
        task_revisions=dict.fromkeys(task_map, 1),
        nodes={n.name: n for n in nodes},
        gateways={},
        lb_addresses={},
        containers={},
        statuses={name: NodeStatus(name) for name in up},
    )


def service(name: str = "web", replicas: int = 6, **fields: object) -> Service:
    return Service(name, ("sleep", "infinity"), replicas=replicas, **fields)  # type: ignore[arg-type]


def pending(svc: Service) -> list[Task]:
    return [Task(svc.name, svc.id, slot, 1) for slot in range(1, svc.replicas + 1)]


NODES = [Node("node1"), Node("node2", labels={"zone": "b"}), Node("node3")]
UP = ["node1", "node2", "node3"]


def placed(decisions: list[scheduler.Decision]) -> Counter[str]:
    return Counter(d.node for d in decisions if isinstance(d, Assign))


def test_six_tasks_spread_two_per_node() -> None:
    web = service()
    assert placed(scheduler.plan(view(NODES, pending(web), [web], UP))) == {
        "node1": 2,
        "node2": 2,
        "node3": 2,
    }


def test_spread_counts_the_service_first_then_every_task() -> None:
    web, api = service("web", 1), service("api", 2)
    busy = [dataclasses.replace(t, node="node1") for t in pending(service("db", 3))]
    decisions = scheduler.plan(view(NODES, [*pending(web), *pending(api), *busy], [web, api], UP))
    assert placed(decisions) == {"node2": 2, "node3": 1}


def test_constraints_and_the_per_node_limit_decide_where_and_say_why_not() -> None:
    only_b = service(replicas=3, constraints=("node.labels.zone==b",))
    decisions = scheduler.plan(view(NODES, pending(only_b), [only_b], UP))
    assert placed(decisions) == {"node2": 3}

    nowhere = service("x", 2, constraints=("node.labels.zone==c",))
    reasons = {d.reason for d in scheduler.plan(view(NODES, pending(nowhere), [nowhere], UP))
               if isinstance(d, Pending)}  # fmt: skip
    assert reasons == {"no suitable node: 0 of 3 match node.labels.zone==c"}

    capped = service("y", 4, max_replicas_per_node=1)
    decisions = scheduler.plan(view(NODES, pending(capped), [capped], UP))
    assert placed(decisions) == {"node1": 1, "node2": 1, "node3": 1}
    (why,) = [d.reason for d in decisions if isinstance(d, Pending)]
    assert why == (
        "no suitable node: 3 of 3 match, and each runs 1 task(s) of y (--replicas-max-per-node)"
    )


def test_only_ready_active_nodes_take_tasks() -> None:
    web = service(replicas=4)
    nodes = [NODES[0], dataclasses.replace(NODES[1], availability="pause"), NODES[2]]
    decisions = scheduler.plan(view(nodes, pending(web), [web], ["node1", "node2"]))
    assert placed(decisions) == {"node1": 4}
    nobody = scheduler.plan(view(nodes, pending(web), [web], []))
    assert {d.reason for d in nobody if isinstance(d, Pending)} == {
        "no suitable node: no node is ready and active"
    }


def test_a_pending_reason_already_written_is_not_written_again() -> None:
    nowhere = service("x", 1, constraints=("node.name==nope",))
    (task,) = pending(nowhere)
    decisions = scheduler.plan(view(NODES, [task], [nowhere], UP))
    (decision,) = decisions
    assert isinstance(decision, Pending)
    told = dataclasses.replace(task, error=decision.reason)
    assert scheduler.plan(view(NODES, [told], [nowhere], UP)) == []


def test_a_down_nodes_tasks_are_rescheduled_unless_the_leader_just_started() -> None:
    web = service(replicas=3)
    tasks = [dataclasses.replace(t, node=n) for t, n in zip(pending(web), UP, strict=True)]
    decisions = scheduler.plan(view(NODES, tasks, [web], ["node1", "node2"]))
    assert decisions == [Reschedule(tasks[2].id, "node node3 is down: rescheduled", retire=True)]
    assert scheduler.plan(view(NODES, tasks, [web], ["node1", "node2"]), judge_down=False) == []
    removed = scheduler.plan(view(NODES[:2], tasks, [web], ["node1", "node2"]), judge_down=False)
    assert removed == [Reschedule(tasks[2].id, "node node3 was removed: rescheduled", True)]


def test_drain_moves_one_task_per_service_at_a_time_new_before_old() -> None:
    web = service(replicas=2)
    nodes = [dataclasses.replace(NODES[0], availability="drain"), *NODES[1:]]
    old = [dataclasses.replace(t, node="node1", state="running") for t in pending(web)]
    first = scheduler.plan(view(nodes, old, [web], UP))
    assert first == [Reschedule(old[0].id, "node node1 is draining: moved", retire=False)]
    # The replacement exists but does not run yet: nothing to do; once it runs, retire.
    new = dataclasses.replace(Task(web.name, web.id, 1, 1), node="node2", state="assigned")
    assert scheduler.plan(view(nodes, [*old, new], [web], UP)) == []
    running = dataclasses.replace(new, state="running")
    assert scheduler.plan(view(nodes, [*old, running], [web], UP)) == [
        Retire(old[0].id, "node node1 is draining: replaced")
    ]


def test_apply_writes_decisions_and_drops_stale_ones(tmp_path: Path) -> None:
    with open_store(f"sqlite://{tmp_path}/state.db") as store:
        for node in NODES:
            store.put(NODE, node.name, node.to_dict())
            store.put(NODE_STATUS, node.name, NodeStatus(node.name).to_dict())
        web = create_service(store, service(replicas=3))
        settle(store)
        before = read_view(store)
        decisions = scheduler.plan(before)
        assert scheduler.apply(store, before, decisions) == (True, "")
        after = read_view(store)
        assert sorted(t.node for t in after.tasks.values()) == UP
        assert all(t.state == "assigned" for t in after.tasks.values())
        # The same decisions again, on the stale view: every compare-and-swap loses.
        assert scheduler.apply(store, before, decisions) == (False, "")
        # A down node: its task is replaced in one txn, the old one sent to shutdown.
        store.delete(NODE_STATUS, "node3")
        gone = read_view(store)
        assert scheduler.apply(store, gone, scheduler.plan(gone)) == (True, "")
        tasks = list_tasks(store, web)
        old = [t for t in tasks if t.node == "node3"]
        assert [t.desired_state for t in old] == ["shutdown"]
        assert old[0].history[-1].message == "node node3 is down: rescheduled"
        settle(store)  # the orchestrator fills the slot the down node's task left
        fresh = read_view(store)
        scheduler.apply(store, fresh, scheduler.plan(fresh))
        live = [t for t in list_tasks(store, web) if t.desired_state == "running"]
        assert sorted(t.node for t in live) == ["node1", "node1", "node2"] or sorted(
            t.node for t in live
        ) == ["node1", "node2", "node2"]


def test_a_drain_on_a_full_network_reports_and_keeps_the_task(tmp_path: Path) -> None:
    """The replacement of a draining node's task cannot get an address: the leader says so
    (its node's error) and goes on; the old task keeps running. It raised, and the leader's
    every pass failed, for every service."""
    with open_store(f"sqlite://{tmp_path}/state.db") as store:
        for node in NODES:
            store.put(NODE, node.name, node.to_dict())
            store.put(NODE_STATUS, node.name, NodeStatus(node.name).to_dict())
        create_network(store, "tiny", subnet="10.30.0.0/29")  # gateway + 5
        web = create_service(store, service(replicas=1, networks=(NetworkAttachment("tiny"),)))
        settle(store)
        first = read_view(store)
        scheduler.apply(store, first, scheduler.plan(first))
        # VIP + 1 task + 3 nodes' load balancers: the pool is full.
        network = get_network(store, "tiny")
        for node in UP:
            ipam.allocate_lb_address(store, network, node)
        draining = next(t.node for t in list_tasks(store, web))
        update_node(store, draining, availability="drain")
        drained = read_view(store)
        changed, problem = scheduler.apply(store, drained, scheduler.plan(drained))
        assert not changed
        assert "network tiny (10.30.0.0/29) has no free address" in problem
        assert [t.desired_state for t in list_tasks(store, web)] == ["running"]
