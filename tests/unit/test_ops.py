"""The operations layer against both stores: cross-object rules, tasks, VIPs, atomicity."""

from __future__ import annotations

import dataclasses
import multiprocessing
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meshctl import ipam, ops
from meshctl.ipam import AddressExhausted
from meshctl.model import (
    NODE,
    TASK,
    NetworkAttachment,
    Node,
    NotFoundError,
    PublishedPort,
    Service,
    Task,
    ValidationError,
)
from meshctl.orchestrator import plan_tasks
from meshctl.store import Conflict, Store, open_store
from tests.etcd import EtcdServer


@pytest.fixture(params=["sqlite", "etcd"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Every operation runs on both stores: a new SQLite file, or a new prefix on the run's etcd."""
    if request.param == "sqlite":
        return f"sqlite://{tmp_path}/state.db"
    server: EtcdServer = request.getfixturevalue("etcd_server")
    return server.url(f"/test-{uuid.uuid4().hex[:12]}")


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    with open_store(store_url) as opened:
        yield opened


def spec(name: str = "web", *networks: str, **fields: Any) -> Service:
    return Service(
        name=name,
        command=("sleep", "infinity"),
        networks=tuple(NetworkAttachment(n) for n in networks),
        **fields,
    )


def claim(store: Store, task: Task, node: str = "node1") -> Task:
    """What a node's controller does: take an unassigned task with a compare-and-swap."""
    record = store.get(TASK, task.id)
    assert record is not None
    claimed = dataclasses.replace(task, node=node, state="running")
    store.put(TASK, task.id, claimed.to_dict(), expect=record.mod_revision)
    return claimed


def snapshot(store: Store) -> dict[str, list[Any]]:
    kinds = ("network", "ipam", "address", "registry", "service", "task", "port")
    return {k: [(r.name, r.value) for r in store.list(k)] for k in kinds}


# -- networks --------------------------------------------------------------------------------


def _create_network(url: str, name: str, start: Any, results: Any) -> None:
    """One `meshctl network create NAME` (no --subnet) in its own process."""
    start.wait()
    try:
        with open_store(url) as own:
            results.put((name, ops.create_network(own, name).subnet))
    except Exception as err:  # reported to the test, not lost in a child's stderr
        results.put((name, repr(err)))


def test_concurrent_network_creates_never_share_a_subnet(store_url: str) -> None:
    """12 `network create` at once once stored two pairs of networks on one subnet (#14)."""
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Barrier(12), ctx.Queue()
    procs = [
        ctx.Process(target=_create_network, args=(store_url, f"n{i}", start, results))
        for i in range(12)
    ]
    for proc in procs:
        proc.start()
    try:
        outcomes = dict(results.get(timeout=60) for _ in procs)
    finally:
        for proc in procs:
            proc.join(timeout=10)
    assert all(subnet.startswith("10.10.") for subnet in outcomes.values()), outcomes
    assert len(set(outcomes.values())) == 12, outcomes
    with open_store(store_url) as check:
        stored = [r.value["subnet"] for r in check.list("network")]
        assert sorted(stored) == sorted(outcomes.values())
        vnis = [r.value["vni"] for r in check.list("network")]
        if check.distributed:  # overlays, each with a VNI of its own
            assert sorted(vnis) == list(range(4096, 4108))
            assert sorted(int(r.name) for r in check.list("vni")) == sorted(vnis)
        else:
            assert vnis == [0] * 12


def test_the_driver_follows_the_store_and_an_overlay_gives_its_vni_back(store: Store) -> None:
    first = ops.create_network(store, "a")
    assert first.driver == ("overlay" if store.distributed else "bridge")
    one = ops.create_network(store, "one", driver="overlay")
    two = ops.create_network(store, "two", driver="overlay")
    assert two.vni == one.vni + 1
    ops.remove_network(store, "one")
    assert ops.create_network(store, "three", driver="overlay").vni == one.vni
    assert ops.create_network(store, "plain", driver="bridge").vni == 0


def test_an_allocation_never_lands_on_a_network_removed_meanwhile(store: Store) -> None:
    network = ops.create_network(store, "front", subnet="10.20.0.0/24")
    stale = ipam.load(store, network)  # a command read the network, then lost the race
    ops.remove_network(store, "front")
    state, _ = ipam.allocate(stale.state, "task:late")
    with pytest.raises(Conflict, match="network front"):
        store.txn(ipam.commit_ops(stale, state))
    assert store.list(ipam.ADDRESS) == []
    assert store.list(ipam.KIND) == []
    assert store.get(ipam.REGISTRY, ipam.SUBNETS).value == {"networks": {}}  # type: ignore[union-attr]


def test_network_rm_takes_the_claims_of_draining_tasks_with_it(store: Store) -> None:
    network = ops.create_network(store, "front", subnet="10.20.0.0/24")
    ipam.allocate_lb_address(store, network, "node1")
    ops.remove_network(store, "front")
    assert store.list(ipam.ADDRESS) == []
    again = ops.create_network(store, "front", subnet="10.20.0.0/24")
    assert ops.network_ipam(store, again).allocations == {}


def test_networks_get_the_next_free_24_of_the_pool(store: Store) -> None:
    assert ops.create_network(store, "a").subnet == "10.10.0.0/24"
    assert ops.create_network(store, "b", subnet="10.10.1.0/24").subnet == "10.10.1.0/24"
    assert ops.create_network(store, "c").subnet == "10.10.2.0/24"
    custom = ops.create_network(store, "d", pool="172.31.0.0/16", prefix=28)
    assert custom.subnet == "172.31.0.0/28"
    assert [n.name for n in ops.list_networks(store)] == ["a", "b", "c", "d"]


def test_network_names_are_unique(store: Store) -> None:
    ops.create_network(store, "front")
    with pytest.raises(ValidationError, match="network front already exists; choose another name"):
        ops.create_network(store, "front")


def test_overlapping_subnets_are_rejected_naming_the_other_network(store: Store) -> None:
    ops.create_network(store, "front", subnet="10.20.0.0/24")
    before = snapshot(store)
    with pytest.raises(ValidationError, match=r"10.20.0.0/16: it overlaps network front \(10.20"):
        ops.create_network(store, "wide", subnet="10.20.0.0/16")
    assert snapshot(store) == before


def test_network_rm_refuses_while_a_service_uses_it(store: Store) -> None:
    network = ops.create_network(store, "front")
    ops.create_service(store, spec("web", "front"))
    with pytest.raises(ValidationError, match="network front is in use by service web; remove"):
        ops.remove_network(store, "front")
    ops.remove_service(store, "web")
    ops.remove_network(store, "front")
    assert ops.list_networks(store) == []
    assert store.get("ipam", network.id) is None
    with pytest.raises(NotFoundError, match="network front not found"):
        ops.remove_network(store, "front")


# -- services --------------------------------------------------------------------------------


def test_create_stores_the_spec_vip_and_pending_tasks_in_one_transaction(store: Store) -> None:
    ops.create_network(store, "front", subnet="10.20.0.0/24")
    revision = store.revision()
    created = ops.create_service(store, spec("web", "front", replicas=3))
    assert store.revision() == revision + 1  # one transaction
    assert created.networks[0].vip == "10.20.0.2"
    assert ops.get_service(store, "web") == created
    tasks = ops.list_tasks(store, created)
    assert [t.name for t in tasks] == ["web.1", "web.2", "web.3"]
    assert {(t.desired_state, t.state, t.node, t.spec_version) for t in tasks} == {
        ("running", "pending", "", 1)
    }
    assert [t.addresses for t in tasks] == [
        {"front": "10.20.0.3"},
        {"front": "10.20.0.4"},
        {"front": "10.20.0.5"},
    ]


def test_dnsrr_services_get_no_vip(store: Store) -> None:
    ops.create_network(store, "front")
    created = ops.create_service(store, spec("db", "front", endpoint_mode="dnsrr"))
    assert created.vips() == {}
    assert created.networks[0].vip is None


def test_service_names_are_unique(store: Store) -> None:
    ops.create_service(store, spec("web"))
    with pytest.raises(ValidationError, match="service web already exists; choose another --name"):
        ops.create_service(store, spec("web"))


def test_unknown_network_is_rejected_and_nothing_is_written(store: Store) -> None:
    before = snapshot(store)
    with pytest.raises(NotFoundError, match="network back not found; create it with: meshctl"):
        ops.create_service(store, spec("web", "back"))
    assert snapshot(store) == before


def test_a_published_port_is_used_by_one_service_only(store: Store) -> None:
    ops.create_service(store, spec("web", ports=(PublishedPort(8000, 80),)))
    ops.create_network(store, "front", subnet="10.31.0.0/24")
    with pytest.raises(ValidationError, match="port 8000/tcp is already published by service web"):
        ops.create_service(
            store, spec("api", "front", ports=(PublishedPort(8000, 81, mode="host"),))
        )
    ops.create_service(store, spec("dns", ports=(PublishedPort(8000, 53, "udp"),)))
    ops.remove_service(store, "web")
    ops.create_service(store, spec("api", ports=(PublishedPort(8000, 81),)))


def test_a_full_29_with_more_replicas_than_addresses_fails_cleanly(store: Store) -> None:
    ops.create_network(store, "tiny", subnet="10.30.0.0/29")  # 6 hosts: gateway + 5
    before, revision = snapshot(store), store.revision()
    with pytest.raises(
        AddressExhausted, match=r"network tiny \(10.30.0.0/29\) has no free address"
    ):
        ops.create_service(store, spec("web", "tiny", replicas=5))  # VIP + 5 tasks = 6
    assert snapshot(store) == before
    assert store.revision() == revision
    # The last address is the node's load balancer's: a 4th task would leave it none and
    # stop the network's load balancing (and, before, every pass of the controller).
    ops.create_service(store, spec("web", "tiny", replicas=3))
    with pytest.raises(AddressExhausted, match="for task web.4.*1 kept for the nodes' load"):
        ops.scale_services(store, {"web": 4})
    assert len(ops.list_tasks(store)) == 3
    network = ops.get_network(store, "tiny")
    assert ipam.allocate_lb_address(store, network, "node1")


def test_the_pool_keeps_one_address_per_node_for_load_balancers(store: Store) -> None:
    for node in ("node1", "node2", "node3"):
        store.put(NODE, node, Node(node).to_dict())
    network = ops.create_network(store, "tiny", subnet="10.30.0.0/29")  # gateway + 5
    ipam.allocate_lb_address(store, network, "node1")
    ops.create_service(store, spec("web", "tiny", replicas=1))  # VIP + 1 task
    with pytest.raises(AddressExhausted, match="2 kept for the nodes' load balancers"):
        ops.scale_services(store, {"web": 2})
    ipam.allocate_lb_address(store, network, "node2")
    ipam.allocate_lb_address(store, network, "node3")
    assert len(ops.network_ipam(store, network).allocations) == 5


def test_scale_down_drops_unclaimed_tasks_and_marks_claimed_ones(store: Store) -> None:
    network = ops.create_network(store, "front")
    created = ops.create_service(store, spec("web", "front", replicas=3))
    tasks = ops.list_tasks(store, created)
    claimed = claim(store, tasks[2])  # web.3 runs on node1
    ops.scale_services(store, {"web": 1})
    after = {t.name: t for t in ops.list_tasks(store, created)}
    assert set(after) == {"web.1", "web.3"}  # web.2 never ran: gone at once
    assert after["web.3"].desired_state == "shutdown"
    owners = set(ops.network_ipam(store, network).allocations.values())
    assert f"task:{tasks[1].id}" not in owners
    assert f"task:{claimed.id}" in owners  # still in use until its controller forgets it
    ops.forget_task(store, claimed.id)
    assert f"task:{claimed.id}" not in set(ops.network_ipam(store, network).allocations.values())
    assert ops.get_service(store, "web").version == 1  # scaling rolls nothing


def test_scale_up_again_while_an_old_task_drains_makes_a_new_task(store: Store) -> None:
    created = ops.create_service(store, spec("web", replicas=2))
    old = claim(store, ops.list_tasks(store, created)[1])
    ops.scale_services(store, {"web": 1})
    ops.scale_services(store, {"web": 2})
    slot2 = [t for t in ops.list_tasks(store, created) if t.slot == 2]
    assert {(t.id == old.id, t.desired_state) for t in slot2} == {
        (True, "shutdown"),
        (False, "running"),
    }


def test_scale_of_several_services_is_all_or_nothing(store: Store) -> None:
    ops.create_service(store, spec("web"))
    with pytest.raises(NotFoundError, match="service nope not found"):
        ops.scale_services(store, {"web": 3, "nope": 1})
    assert ops.get_service(store, "web").replicas == 1
    with pytest.raises(ValidationError, match="invalid --replicas -2"):
        ops.scale_services(store, {"web": -2})


def test_rm_hides_the_service_and_hands_claimed_tasks_to_their_controller(store: Store) -> None:
    network = ops.create_network(store, "front")
    created = ops.create_service(store, spec("web", "front", replicas=2))
    running = claim(store, ops.list_tasks(store, created)[0])
    ops.remove_service(store, "web")
    assert ops.list_services(store) == []
    left = ops.list_tasks(store)
    assert [(t.id, t.desired_state) for t in left] == [(running.id, "removed")]
    assert set(ops.network_ipam(store, network).allocations.values()) == {f"task:{running.id}"}
    # Lingering tasks do not block the network; a new service with the name starts afresh.
    ops.create_service(store, spec("web", "front"))
    with pytest.raises(NotFoundError, match="service gone not found; list services with"):
        ops.remove_service(store, "gone")


def test_update_bumps_the_version_keeps_vips_and_readdresses_tasks(store: Store) -> None:
    front = ops.create_network(store, "front")
    back = ops.create_network(store, "back")
    created = ops.create_service(store, spec("web", "front", replicas=2))
    vip = created.vips()["front"]
    updated = ops.update_service(
        store,
        "web",
        {"networks": (NetworkAttachment("front", ("www",)), NetworkAttachment("back"))},
    )
    assert updated.version == 2
    assert updated.vips()["front"] == vip
    assert updated.networks[0].aliases == ("www",)
    tasks = ops.list_tasks(store, updated)
    assert all(set(t.addresses) == {"front", "back"} and t.spec_version == 1 for t in tasks)
    ops.update_service(store, "web", {"networks": (NetworkAttachment("back"),)})
    front_owners = set(ops.network_ipam(store, front).allocations.values())
    assert front_owners == set()  # VIP and task addresses on front released
    assert len(ops.network_ipam(store, back).allocations) == 3


def test_update_to_dnsrr_releases_the_vip_and_validates(store: Store) -> None:
    network = ops.create_network(store, "front")
    ops.create_service(store, spec("web", "front", ports=(PublishedPort(8000, 80),)))
    with pytest.raises(ValidationError, match="endpoint mode dnsrr has no VIP"):
        ops.update_service(store, "web", {"endpoint_mode": "dnsrr"})
    updated = ops.update_service(store, "web", {"endpoint_mode": "dnsrr", "ports": ()})
    assert updated.vips() == {}
    assert "vip:" + updated.id not in set(ops.network_ipam(store, network).allocations.values())
    with pytest.raises(ValidationError, match="cannot update id of a service"):
        ops.update_service(store, "web", {"id": "x"})


def test_update_with_new_replicas_plans_tasks_at_the_new_version(store: Store) -> None:
    created = ops.create_service(store, spec("web"))
    ops.update_service(store, "web", {"replicas": 2, "command": ("true",)})
    tasks = ops.list_tasks(store, created)
    assert [(t.slot, t.spec_version) for t in tasks] == [(1, 1), (2, 2)]


def test_find_task_by_name_or_id(store: Store) -> None:
    created = ops.create_service(store, spec("web", replicas=2))
    task = ops.list_tasks(store, created)[1]
    assert ops.find_task(store, "web.2") == task
    assert ops.find_task(store, task.id) == task
    with pytest.raises(NotFoundError, match="no service or task named web.9"):
        ops.find_task(store, "web.9")


def test_plan_tasks_fills_missing_slots_and_trims_extra_ones() -> None:
    service = spec("web", replicas=2)
    extra = Task("web", service.id, 3, 1)
    gone = Task("web", service.id, 1, 1, desired_state="shutdown")
    other = Task("api", "someone-else", 1, 1)
    keep = Task("web", service.id, 2, 1, created_at=1.0)
    twin = Task("web", service.id, 2, 1, created_at=2.0)
    to_create, to_remove = plan_tasks(service, [extra, gone, other, keep, twin])
    assert [(t.slot, t.service_id, t.desired_state, t.state) for t in to_create] == [
        (1, service.id, "running", "pending")
    ]
    assert to_remove == [twin, extra]
    assert plan_tasks(dataclasses.replace(service, replicas=0), [keep]) == ([], [keep])
