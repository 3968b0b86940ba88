"""The node planner against the fake kernel: plan, apply, and a second diff that is empty."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kernel.links import Link, NamespaceLinks
from kernel.system import Kernel, fake_kernel
from meshctl import naming
from meshctl.commands.network import create_network, remove_network
from meshctl.commands.service import create_service
from meshctl.controller.passes import reconcile
from meshctl.model import NetworkAttachment, Service
from meshctl.node.desired import (
    FORWARD_CHAIN,
    ISOLATION_CHAIN,
    ISOLATION_DROP_CHAIN,
    NodeSpec,
    desired_node,
    plan_node,
)
from meshctl.node.kernel import apply_node, observe_node
from meshctl.node.reconciler import NodeReconciler
from meshctl.node.task_dns import NAT_REDIRECT, NFT_REWRITE, dns_redirect, dns_rewrite
from meshctl.reconcile import PassContext, ResyncClock
from meshctl.store.sqlite import SqliteStore
from meshctl.view import ClusterView, read_view
from tests.unit.leader import settle


def _store(tmp_path: Path) -> SqliteStore:
    store = SqliteStore(str(tmp_path / "state.db"))
    create_network(store, "front", subnet="10.60.0.0/24")
    create_network(store, "back", subnet="10.61.0.0/24", internal=True)
    create_service(
        store,
        Service(
            "web",
            ("true",),
            replicas=2,
            networks=(NetworkAttachment("front"), NetworkAttachment("back")),
        ),
    )
    settle(store)  # the leader makes the tasks
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
    kernel.links.delete_link(None, naming.task_veth(task_id, 0))  # drift: a leg deleted by hand
    plan = plan_node(desired, *observe_node(kernel))
    assert [t.task_id for t in plan.wire_tasks] == [task_id]
    apply_node(kernel, plan)
    assert not plan_node(desired, *observe_node(kernel))
    gone = desired_node(view, "node1", set(view.tasks) - {task_id})
    plan = plan_node(gone, *observe_node(kernel))
    assert plan.unwire_tasks == (naming.task_netns(task_id),)
    # Its legs go by name, before the namespace: the kernel frees a deleted namespace (and the
    # node ends of its veths with it) later, so the second diff would still see them.
    assert plan.delete_links == (naming.task_veth(task_id, 0), naming.task_veth(task_id, 1))
    apply_node(kernel, plan)
    assert not kernel.netns.exists(naming.task_netns(task_id))
    assert not plan_node(gone, *observe_node(kernel))


def test_no_networks_means_no_rules(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "state.db"))
    kernel = fake_kernel()
    create_network(store, "front", subnet="10.62.0.0/24")
    desired = desired_node(read_view(store), "node1", ())
    apply_node(kernel, plan_node(desired, *observe_node(kernel)))
    remove_network(store, "front")
    empty = desired_node(read_view(store), "node1", ())
    apply_node(kernel, plan_node(empty, *observe_node(kernel)))
    observed, stray = observe_node(kernel)
    assert observed.bridges == {} and stray == []
    assert all(not t.chains and not t.jumps for t in observed.tables.values())


def test_known_tasks_and_rules_are_not_read_back_until_a_full_observe(tmp_path: Path) -> None:
    _, kernel, desired = _wired_node(tmp_path)
    task_id = next(iter(desired.tasks))
    kernel.netns.delete(naming.task_netns(task_id))
    kernel.netns.create(naming.task_netns(task_id))  # drift: the namespace is back, empty
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
    foreign = naming.task_netns("f0f0f0f0f0f0")  # another node's task on the same host
    kernel.netns.create(foreign)
    for task_id, node in zip(tasks, ("node1", "node2"), strict=True):
        record = store.get("task", task_id)
        assert record is not None
        store.put("task", task_id, {**record.value, "node": node})
    view = read_view(store)
    desired = desired_node(view, "node1", set(tasks))
    apply_node(kernel, plan_node(desired, *observe_node(kernel, mine={tasks[0]})))
    kernel.netns.create(naming.task_netns(tasks[1]))  # node2's, made in its own node

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
    ((ns, change),) = plan.task_dns
    assert ns == naming.task_netns(task_id)
    ((redirect, nat),) = change.parts  # the nat redirect: nothing it replaces
    assert redirect == NAT_REDIRECT
    assert nat.change.replace == dns_redirect(task_id, 40001, 40002).chains
    apply_node(kernel, plan)
    assert not plan_node(desired, *observe_node(kernel))


def test_with_nftables_the_dns_redirect_is_a_stateless_rewrite_replacing_the_nat_rule(
    tmp_path: Path,
) -> None:
    """A node that moves to nftables (or starts with it) rewrites 127.0.0.11:53 in the task's
    own nftables table and drops the nat rule; a second plan is empty."""
    view, kernel, _ = _wired_node(tmp_path)
    task_id = sorted(view.tasks)[0]
    ns = naming.task_netns(task_id)
    ports = {task_id: (40001, 40002)}
    apply_node(
        kernel,
        plan_node(desired_node(view, "node1", set(view.tasks), ports), *observe_node(kernel)),
    )
    assert kernel.iptables.list_owned(ns, "nat").chains  # the nat redirect, as without nftables
    desired = desired_node(view, "node1", set(view.tasks), ports, task_dns=NFT_REWRITE)

    plan = plan_node(desired, *observe_node(kernel, task_dns=NFT_REWRITE))

    assert not plan.wire_tasks
    ((dns_ns, change),) = plan.task_dns
    assert dns_ns == ns
    (replaced, nat), (in_use, dns) = change.parts  # the nat rule goes first
    assert (replaced, in_use) == (NAT_REDIRECT, NFT_REWRITE)
    assert nat.change.delete == ("MESH-DNS",)
    assert dns.change.replace == dns_rewrite(40001, 40002).chains
    assert dict(desired.tasks[task_id].dns.parts)[NFT_REWRITE] == dns_rewrite(40001, 40002)
    assert f"- {ns}: nat chain MESH-DNS" in change.lines(ns)
    assert f"~ {ns}: nftables chain dns" in change.lines(ns)
    apply_node(kernel, plan)
    assert not kernel.iptables.list_owned(ns, "nat").chains
    assert not plan_node(desired, *observe_node(kernel, task_dns=NFT_REWRITE))


class _CountedNft:
    """The fake's nftables, counting the namespaces whose table is read (each an `nft` run on
    the real kernel)."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.read = inner, []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def list_table(self, ns: str) -> Any:
        self.read.append(ns)
        return self.inner.list_table(ns)


def test_a_tasks_first_wiring_runs_no_nft_and_the_nat_redirect_never_does(tmp_path: Path) -> None:
    """Wiring a task before its DNS server has ports there reads no nftables table (300 tasks
    would cost 300 nft runs), and a node on the nat redirect reads none at all."""
    store = _store(tmp_path)
    for record in store.list("task"):
        store.put("task", record.name, {**record.value, "node": "node1"})
    view = read_view(store)
    for task_dns in (NFT_REWRITE, NAT_REDIRECT):
        kernel = fake_kernel()
        nft = _CountedNft(kernel.nftables)
        kernel = dataclasses.replace(kernel, nftables=nft)
        desired = desired_node(view, "node1", set(view.tasks), task_dns=task_dns)
        plan = plan_node(desired, *observe_node(kernel, task_dns=task_dns))
        assert len(plan.wire_tasks) == 2
        nft.read.clear()

        apply_node(kernel, plan)

        assert nft.read == []
        assert not plan_node(desired, *observe_node(kernel, task_dns=task_dns))
    assert nft.read == []  # on the nat redirect, not even to observe


def test_a_container_whose_pid_names_another_process_now_is_not_wired(tmp_path: Path) -> None:
    """A PID reused after the attached process ended names a stranger's namespace (perhaps
    the node's own): the controller wires nothing there, and unwires a leg it made before."""
    from meshctl.model import Container
    from meshctl.node.desired import container_spec

    view = read_view(_store(tmp_path))
    attached = Container(
        "legacy", "/proc/4242/ns/net", "front", "node1", "10.60.0.9", start_time=1000
    )
    assert container_spec(view, attached, lambda pid: 1000 if pid == 4242 else None) is not None
    assert container_spec(view, attached, lambda pid: 2000) is None  # the PID was reused
    assert container_spec(view, attached, lambda pid: None) is None  # the process is gone
    by_path = Container("byname", "/run/netns/x", "front", "node1", "10.60.0.10")
    assert container_spec(view, by_path, lambda pid: None) is not None


def _foreign_links(kernel: Kernel) -> list[Link]:
    """Another tool's links in the node namespace, named as meshctl names its own (one with an
    alias of its own), up where that matters to the old name-based rules; returns them."""
    kernel.netns.create("other")
    kernel.links.ensure_bridge(None, "mesh1234abcd")
    kernel.links.set_up(None, "mesh1234abcd")
    kernel.links.ensure_veth(None, "meshv1234abcd0", "eth0", "other")
    kernel.links.ensure_veth(None, "meshc1234abcd", "eth1", "other", alias="other-tool")
    kernel.links.ensure_veth(None, "meshl1234abcd", "eth2", "other")
    kernel.links.ensure_bridge(None, "meshfoo")
    kernel.links.set_up(None, "meshfoo")
    kernel.links.ensure_veth(None, "fport", "eth3", "other")
    kernel.links.set_master(None, "fport", "meshfoo")
    return [link for link in kernel.links.list_links(None) if link.name != "lo"]


def test_unmarked_links_are_never_in_a_delete_plan(tmp_path: Path) -> None:
    store = _store(tmp_path)
    for record in store.list("task"):
        store.put("task", record.name, {**record.value, "node": "node1"})
    view = read_view(store)
    kernel = fake_kernel()
    foreign = _foreign_links(kernel)
    # Through a whole life: everything wired, then nothing wanted any more.
    for desired in (desired_node(view, "node1", set(view.tasks)), desired_node(view, "node1", ())):
        plan = plan_node(desired, *observe_node(kernel, mine=view.tasks))
        assert not {link.name for link in foreign} & set(plan.delete_links)
        assert plan.clashes == ()
        apply_node(kernel, plan)
        assert not plan_node(desired, *observe_node(kernel, mine=view.tasks))
    empty = NodeSpec(bridges={}, tasks={}, tables={})
    plan = plan_node(empty, *observe_node(kernel))
    apply_node(kernel, plan)
    assert [link for link in kernel.links.list_links(None) if link.name != "lo"] == foreign


def test_marked_links_left_over_are_deleted(tmp_path: Path) -> None:
    _, kernel, desired = _wired_node(tmp_path)
    kernel.netns.create("other")
    kernel.links.ensure_bridge(
        None, naming.bridge("0ld0ld0ld0ld"), alias=naming.mark("0ld0ld0ld0ld")
    )
    stray = naming.task_veth("0ld0ld0ld0ld", 0)
    kernel.links.ensure_veth(None, stray, "eth0", "other", alias=naming.mark("0ld0ld0ld0ld"))

    plan = plan_node(desired, *observe_node(kernel, mine=desired.tasks))

    assert plan.delete_links == (naming.bridge("0ld0ld0ld0ld"), stray)
    apply_node(kernel, plan)
    assert not plan_node(desired, *observe_node(kernel, mine=desired.tasks))


def test_a_name_held_by_another_link_is_a_clash_left_alone(tmp_path: Path) -> None:
    store = _store(tmp_path)
    for record in store.list("task"):
        store.put("task", record.name, {**record.value, "node": "node1"})
    view = read_view(store)
    front, back = view.networks["front"], view.networks["back"]
    kernel = fake_kernel()
    taken = naming.bridge(back.id)
    kernel.links.ensure_bridge(None, taken)  # another tool's, with the name back's bridge needs
    (before,) = [link for link in kernel.links.list_links(None) if link.name == taken]
    desired = desired_node(view, "node1", set(view.tasks))

    plan = plan_node(desired, *observe_node(kernel))
    apply_node(kernel, plan)

    assert plan.clashes == ((taken, None),)
    assert [b.name for b in plan.ensure_bridges] == [naming.bridge(front.id)]
    assert plan.wire_tasks == ()  # both tasks need a leg on back
    assert kernel.links.list_links(None)[1:2] == [before]
    assert kernel.links.list_addresses(None, taken) == []
    again = plan_node(desired, *observe_node(kernel))
    assert again.clashes == plan.clashes and not again.ensure_bridges and not again.delete_links
    # Once the other tool's bridge is gone, meshctl makes its own.
    kernel.links.delete_link(None, taken)
    apply_node(kernel, plan_node(desired, *observe_node(kernel)))
    assert not plan_node(desired, *observe_node(kernel))
    assert kernel.links.get_link(None, taken).alias == naming.mark(back.id)


def test_a_task_leg_name_held_by_another_link_stops_only_that_task(tmp_path: Path) -> None:
    store = _store(tmp_path)
    for record in store.list("task"):
        store.put("task", record.name, {**record.value, "node": "node1"})
    view = read_view(store)
    kernel = fake_kernel()
    blocked, free = sorted(view.tasks)
    kernel.netns.create("other")
    leg = naming.task_veth(blocked, 1)
    kernel.links.ensure_veth(None, leg, "eth0", "other", alias="meshctl:someone-else")
    desired = desired_node(view, "node1", set(view.tasks))

    plan = plan_node(desired, *observe_node(kernel, mine=view.tasks))
    apply_node(kernel, plan)

    assert plan.clashes == ((leg, "meshctl:someone-else"),)
    assert [t.task_id for t in plan.wire_tasks] == [free]
    assert not kernel.netns.exists(naming.task_netns(blocked))
    assert kernel.links.get_link(None, leg).alias == "meshctl:someone-else"
    assert leg not in plan_node(desired, *observe_node(kernel, mine=view.tasks)).delete_links


def test_isolation_names_every_bridge_and_no_pattern(tmp_path: Path) -> None:
    view = read_view(_store(tmp_path))
    bridges = sorted(naming.bridge(n.id) for n in view.networks.values())
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


def _passes(
    reconciler: NodeReconciler, view: ClusterView, clock: list[float]
) -> Callable[[], dict[str, str]]:
    """A pass of the node reconciler alone, on the view, full when a resync period passed."""
    resync = ResyncClock(10.0, clock=lambda: clock[0])

    def sync() -> dict[str, str]:
        ctx = PassContext("node1", "n1", resync.full(), wired=frozenset(view.tasks))
        return reconcile(reconciler, view, ctx)

    return sync


def _counted_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[ClusterView, Kernel, list[float], list[str | None]]:
    """A view of two tasks placed on node1, a fake kernel with their namespaces, a clock the
    node reconciler reads (set it), and the namespaces read_namespace visits (None: the node)."""
    from meshctl.node import reconciler as node_reconciler

    store = _store(tmp_path)
    for record in store.list("task"):
        store.put("task", record.name, {**record.value, "node": "node1"})
    view = read_view(store)
    kernel = fake_kernel()
    for task_id in view.tasks:
        kernel.netns.create(naming.task_netns(task_id))
    clock = [1000.0]
    monkeypatch.setattr(node_reconciler.time, "monotonic", lambda: clock[0])
    reads: list[str | None] = []
    read_namespace = kernel.links.read_namespace

    def counted(ns: str | None, routes: bool = True) -> NamespaceLinks:
        reads.append(ns)
        return read_namespace(ns, routes)

    monkeypatch.setattr(kernel.links, "read_namespace", counted)
    return view, kernel, clock, reads


def test_task_namespaces_are_read_again_each_at_its_own_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each wired task namespace is read again within TASK_REREAD resync periods, at a random
    point of the second half: never all in one pass (which took seconds at 300 tasks a node),
    never later (drift in it is still repaired)."""
    from meshctl.controller.dataplane import choose_task_dns
    from meshctl.node import reconciler as node_reconciler

    view, kernel, clock, reads = _counted_reads(tmp_path, monkeypatch)
    reconciler = NodeReconciler(
        kernel, "node1", resync_period=10.0, task_dns=choose_task_dns(kernel)
    )
    sync = _passes(reconciler, view, clock)
    assert sync() == {}
    dues = sorted(due for _, due in reconciler._wired.values())
    longest = 10.0 * node_reconciler.TASK_REREAD
    assert len(dues) == 2 and all(1000 + longest / 2 <= due <= 1000 + longest for due in dues)
    assert reconciler.next_read() == dues[0]

    reads.clear()
    clock[0] = dues[0] - 0.01
    sync()
    assert [ns for ns in reads if ns is not None] == []  # none due yet: nothing read
    clock[0] = dues[0] + 0.001
    sync()
    assert len([ns for ns in reads if ns is not None]) == 1  # the first one, due again later
    assert reconciler.next_read() == dues[1]


def test_the_node_is_read_again_only_after_a_change_or_a_resync_period(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The node's own links and addresses (300-odd at 300 tasks) are dumped again only when this
    controller changed them, a task namespace came or went, or a resync period passed; drift
    by another is repaired at that full observe, as a rule's is."""
    from meshctl.controller.dataplane import choose_task_dns

    view, kernel, clock, reads = _counted_reads(tmp_path, monkeypatch)
    reconciler = NodeReconciler(
        kernel, "node1", resync_period=10.0, task_dns=choose_task_dns(kernel)
    )
    sync = _passes(reconciler, view, clock)
    assert sync() == {}
    assert reads.count(None) == 2  # before and after wiring
    bridge = next(iter(desired_node(view, "node1", set(view.tasks)).bridges))

    reads.clear()
    clock[0] += 1
    assert sync() == {}
    assert None not in reads  # nothing changed: the node is not read

    kernel.links.delete_link(None, bridge)  # another's drift
    kernel.netns.create(naming.task_netns("t-new"))  # a namespace came: read again, not ours
    reads.clear()
    clock[0] += 1
    sync()
    assert reads.count(None) == 2  # the drift was seen: read, repaired, read again
    assert kernel.links.get_link(None, bridge) is not None

    kernel.links.delete_link(None, bridge)
    reads.clear()
    clock[0] += 1
    sync()
    assert None not in reads and kernel.links.get_link(None, bridge) is None  # not yet seen
    clock[0] += 10  # a resync period: the full observe reads the node and repairs it
    sync()
    assert kernel.links.get_link(None, bridge) is not None
