"""The node planner against the fake kernel: plan, apply, and a second diff that is empty."""

from __future__ import annotations

from pathlib import Path

from kernel.system import Kernel, fake_kernel
from meshctl import ops
from meshctl.controller import names
from meshctl.controller.node import (
    FORWARD_CHAIN,
    ISOLATION_CHAIN,
    ISOLATION_DROP_CHAIN,
    NodeSpec,
    desired_node,
    plan_node,
)
from meshctl.controller.node_kernel import apply_node, observe_node
from meshctl.controller.view import ClusterView, read_view
from meshctl.model import NetworkAttachment, Service
from meshctl.store.sqlite import SqliteStore


def _store(tmp_path: Path) -> SqliteStore:
    store = SqliteStore(str(tmp_path / "state.db"))
    ops.create_network(store, "front", subnet="10.60.0.0/24")
    ops.create_network(store, "back", subnet="10.61.0.0/24", internal=True)
    ops.create_service(
        store,
        Service(
            "web",
            ("true",),
            replicas=2,
            networks=(NetworkAttachment("front"), NetworkAttachment("back")),
        ),
    )
    return store


def _wired_node(tmp_path: Path) -> tuple[ClusterView, Kernel, NodeSpec]:
    """Both tasks on node1, wired in a fake kernel as desired."""
    store = _store(tmp_path)
    for record in store.list("task"):
        store.put("task", record.name, {**record.value, "node": "node1"})
    view = read_view(store)
    kernel = fake_kernel()
    desired = desired_node(view, "node1", set(view.tasks))
    apply_node(kernel, plan_node(desired, *observe_node(kernel)))
    return view, kernel, desired


def test_apply_converges_and_a_second_plan_is_empty(tmp_path: Path) -> None:
    store = _store(tmp_path)
    view = read_view(store)
    kernel = fake_kernel()
    desired = desired_node(view, "node1", set(view.tasks))  # unclaimed: nothing for this node
    assert desired.tasks == {}
    tasks = list(view.tasks)
    for task_id in tasks:
        record = store.get("task", task_id)
        assert record is not None
        store.put("task", task_id, {**record.value, "node": "node1"})
    view = read_view(store)
    desired = desired_node(view, "node1", set(tasks))
    plan = plan_node(desired, *observe_node(kernel))
    assert len(plan.ensure_bridges) == 2 and len(plan.wire_tasks) == 2
    apply_node(kernel, plan)
    assert not plan_node(desired, *observe_node(kernel))
    # Each task: a leg per network, in the service's order, default route via front's gateway.
    spec = desired.tasks[tasks[0]]
    assert [link.task_end for link in spec.links] == ["eth0", "eth1"]
    assert spec.gateway == "10.60.0.1"
    rules = "\n".join(r.render() for r in desired.tables["nat"].chains["MESH-POSTROUTING"])
    assert "10.60.0.0/24" in rules and "10.61.0.0/24" not in rules  # internal: no masquerade


def test_drift_is_planned_back_and_removed_tasks_are_unwired(tmp_path: Path) -> None:
    view, kernel, desired = _wired_node(tmp_path)
    task_id = next(iter(view.tasks))
    kernel.links.delete_link(None, names.task_veth(task_id, 0))  # drift: a leg deleted by hand
    plan = plan_node(desired, *observe_node(kernel))
    assert [t.task_id for t in plan.wire_tasks] == [task_id]
    apply_node(kernel, plan)
    assert not plan_node(desired, *observe_node(kernel))
    gone = desired_node(view, "node1", set(view.tasks) - {task_id})
    plan = plan_node(gone, *observe_node(kernel))
    assert plan.unwire_tasks == (names.task_netns(task_id),)
    apply_node(kernel, plan)
    assert not kernel.netns.exists(names.task_netns(task_id))
    assert not plan_node(gone, *observe_node(kernel))


def test_no_networks_means_no_rules(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "state.db"))
    kernel = fake_kernel()
    ops.create_network(store, "front", subnet="10.62.0.0/24")
    desired = desired_node(read_view(store), "node1", ())
    apply_node(kernel, plan_node(desired, *observe_node(kernel)))
    ops.remove_network(store, "front")
    empty = desired_node(read_view(store), "node1", ())
    apply_node(kernel, plan_node(empty, *observe_node(kernel)))
    observed, stray = observe_node(kernel)
    assert observed.bridges == {} and stray == []
    assert all(not t.chains and not t.jumps for t in observed.tables.values())


def test_known_tasks_and_rules_are_not_read_back_until_a_full_observe(tmp_path: Path) -> None:
    _, kernel, desired = _wired_node(tmp_path)
    task_id = next(iter(desired.tasks))
    kernel.netns.delete(names.task_netns(task_id))
    kernel.netns.create(names.task_netns(task_id))  # drift: the namespace is back, empty
    kernel.iptables.flush_owned(None, "nat")  # and the node's nat rules are gone

    trusting = plan_node(
        desired,
        *observe_node(kernel, known=desired.tasks, mine=desired.tasks, known_tables=desired.tables),
    )
    full = plan_node(desired, *observe_node(kernel, mine=desired.tasks))

    assert not trusting
    assert [t.task_id for t in full.wire_tasks] == [task_id]
    assert "nat" in full.tables


def test_another_nodes_task_namespaces_are_not_this_nodes(tmp_path: Path) -> None:
    store = _store(tmp_path)
    tasks = [record.name for record in store.list("task")]
    kernel = fake_kernel()
    foreign = names.task_netns("f0f0f0f0f0f0")  # another node's task on the same host
    kernel.netns.create(foreign)
    for task_id, node in zip(tasks, ("node1", "node2"), strict=True):
        record = store.get("task", task_id)
        assert record is not None
        store.put("task", task_id, {**record.value, "node": node})
    view = read_view(store)
    desired = desired_node(view, "node1", set(tasks))
    apply_node(kernel, plan_node(desired, *observe_node(kernel, mine={tasks[0]})))
    kernel.netns.create(names.task_netns(tasks[1]))  # node2's, made in its own node

    observed, _ = observe_node(kernel, mine={tasks[0]})
    plan = plan_node(desired, observed)

    assert set(observed.tasks) == {tasks[0]}
    assert not plan.unwire_tasks
    assert kernel.netns.exists(foreign)


def test_a_new_dns_endpoint_changes_only_the_tasks_rules(tmp_path: Path) -> None:
    store = _store(tmp_path)
    for record in store.list("task"):
        store.put("task", record.name, {**record.value, "node": "node1"})
    view = read_view(store)
    kernel = fake_kernel()
    tasks = set(view.tasks)
    apply_node(kernel, plan_node(desired_node(view, "node1", tasks), *observe_node(kernel)))
    task_id = sorted(tasks)[0]
    desired = desired_node(view, "node1", tasks, {task_id: (40001, 40002)})

    plan = plan_node(desired, *observe_node(kernel))

    assert not plan.wire_tasks
    ((ns, change),) = plan.task_rules
    assert ns == names.task_netns(task_id) and change.replace
    apply_node(kernel, plan)
    assert not plan_node(desired, *observe_node(kernel))


def test_isolation_names_every_bridge_and_no_pattern(tmp_path: Path) -> None:
    view = read_view(_store(tmp_path))
    bridges = sorted(names.bridge(n.id) for n in view.networks.values())
    filter_table = desired_node(view, "node1", ()).tables["filter"]
    rules = [rule for chain in filter_table.chains.values() for rule in chain]
    assert not [r for r in rules if "+" in f"{r.in_interface}{r.out_interface}"]
    assert all(r.comment.startswith("meshctl:") for r in rules)
    stage1 = filter_table.chains[ISOLATION_CHAIN]
    stage2 = filter_table.chains[ISOLATION_DROP_CHAIN]
    assert sorted(r.in_interface or "" for r in stage1) == bridges
    assert {r.target for r in stage1} == {ISOLATION_DROP_CHAIN}
    assert sorted(r.out_interface or "" for r in stage2) == bridges
    assert {r.target for r in stage2} == {"DROP"}
    # Replies and published ports (conntrack) and traffic within a bridge go before isolation.
    forward = filter_table.chains[FORWARD_CHAIN]
    jump = next(i for i, r in enumerate(forward) if r.target == ISOLATION_CHAIN)
    early = [r for r in forward if r.matches or r.in_interface == r.out_interface is not None]
    assert len(early) == 3  # front's replies, front's and back's own traffic
    assert all(forward.index(r) < jump for r in early)
