"""The operations layer against both stores: cross-object rules, tasks, VIPs, atomicity."""

from __future__ import annotations

import multiprocessing
from typing import Any

import pytest

from meshctl import ipam
from meshctl.commands.network import create_network, remove_network
from meshctl.commands.read import (
    find_task,
    get_network,
    get_service,
    list_networks,
    list_tasks,
    network_ipam,
)
from meshctl.commands.service import create_service, remove_service, scale_services, update_service
from meshctl.ipam import AddressExhausted
from meshctl.model import (
    NODE,
    NetworkAttachment,
    Node,
    NotFoundError,
    PublishedPort,
    Service,
    ValidationError,
)
from meshctl.store import Conflict, Store, open_store
from tests.unit.leader import settle


def spec(name: str = "web", *networks: str, **fields: Any) -> Service:
    return Service(
        name=name,
        command=("sleep", "infinity"),
        networks=tuple(NetworkAttachment(n) for n in networks),
        **fields,
    )


def snapshot(store: Store) -> dict[str, list[Any]]:
    kinds = ("network", "ipam", "address", "registry", "service", "task", "port")
    return {k: [(r.name, r.value) for r in store.list(k)] for k in kinds}


# -- networks --------------------------------------------------------------------------------


def _create_network(url: str, name: str, start: Any, results: Any) -> None:
    """One `meshctl network create NAME` (no --subnet) in its own process."""
    start.wait()
    try:
        with open_store(url) as own:
            results.put((name, create_network(own, name).subnet))
    except Exception as err:  # reported to the test, not lost in a child's stderr
        results.put((name, repr(err)))


def _create_at_once(store_url: str, count: int) -> dict[str, str]:
    """`count` network creates (n0, n1, ...) from as many processes at once: name → subnet
    or the error."""
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Barrier(count), ctx.Queue()
    procs = [
        ctx.Process(target=_create_network, args=(store_url, f"n{i}", start, results))
        for i in range(count)
    ]
    for proc in procs:
        proc.start()
    try:
        return dict(results.get(timeout=60) for _ in procs)
    finally:
        for proc in procs:
            proc.join(timeout=10)


def test_concurrent_network_creates_never_share_a_subnet(store_url: str) -> None:
    """12 `network create` at once once stored two pairs of networks on one subnet (#14)."""
    outcomes = _create_at_once(store_url, 12)
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


def test_racing_creates_never_pass_the_network_limit(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """$MESHCTL_MAX_NETWORKS is checked in create_network's transaction: 12 creates at once
    with room for 5 leave exactly 5 networks, whoever writes them."""
    monkeypatch.setenv("MESHCTL_MAX_NETWORKS", "5")  # the spawned writers inherit it
    outcomes = _create_at_once(store_url, 12)
    refused = {name for name, result in outcomes.items() if "the limit is 5" in result}
    assert len(refused) == 7, outcomes
    with open_store(store_url) as check:
        assert sorted(r.name for r in check.list("network")) == sorted(set(outcomes) - refused)


class _Interleaved:
    """A store whose first txn lets another writer create network `other` just before it: the
    race a check outside the transaction loses."""

    def __init__(self, store: Store, other: Store) -> None:
        self._store, self._other, self._raced = store, other, False

    def txn(self, ops: Any) -> int:
        if not self._raced:
            self._raced = True
            create_network(self._other, "other")
        return self._store.txn(ops)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def test_a_create_that_lost_the_last_place_to_another_writer_is_refused(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with open_store(store_url) as store, open_store(store_url) as other:
        create_network(store, "first")
        monkeypatch.setenv("MESHCTL_MAX_NETWORKS", "2")
        with pytest.raises(ValidationError, match="2 networks exist, the limit is 2"):
            create_network(_Interleaved(store, other), "second")  # type: ignore[arg-type]
        assert [n.name for n in list_networks(store)] == ["first", "other"]
        # The ingress network, made for a published port, is not counted against it.
        create_service(store, spec("web", "first", ports=(PublishedPort(8000, 80),)))
        assert len(list_networks(store)) == 3


def test_the_driver_follows_the_store_and_an_overlay_gives_its_vni_back(store: Store) -> None:
    first = create_network(store, "a")
    assert first.driver == ("overlay" if store.distributed else "bridge")
    one = create_network(store, "one", driver="overlay")
    two = create_network(store, "two", driver="overlay")
    assert two.vni == one.vni + 1
    remove_network(store, "one")
    assert create_network(store, "three", driver="overlay").vni == one.vni
    assert create_network(store, "plain", driver="bridge").vni == 0


def test_an_allocation_never_lands_on_a_network_removed_meanwhile(store: Store) -> None:
    network = create_network(store, "front", subnet="10.20.0.0/24")
    stale = ipam.load(store, network)  # a command read the network, then lost the race
    remove_network(store, "front")
    state, _ = ipam.allocate(stale.state, "task:late")
    with pytest.raises(Conflict, match="network front"):
        store.txn(ipam.commit_ops(stale, state))
    assert store.list(ipam.ADDRESS) == []
    assert store.list(ipam.KIND) == []
    assert store.get(ipam.REGISTRY, ipam.SUBNETS).value == {"networks": {}}  # type: ignore[union-attr]


def test_network_rm_takes_the_claims_of_draining_tasks_with_it(store: Store) -> None:
    network = create_network(store, "front", subnet="10.20.0.0/24")
    ipam.allocate_lb_address(store, network, "node1")
    remove_network(store, "front")
    assert store.list(ipam.ADDRESS) == []
    again = create_network(store, "front", subnet="10.20.0.0/24")
    assert network_ipam(store, again).allocations == {}


def test_networks_get_the_next_free_24_of_the_pool(store: Store) -> None:
    assert create_network(store, "a").subnet == "10.10.0.0/24"
    assert create_network(store, "b", subnet="10.10.1.0/24").subnet == "10.10.1.0/24"
    assert create_network(store, "c").subnet == "10.10.2.0/24"
    custom = create_network(store, "d", pool="172.31.0.0/16", prefix=28)
    assert custom.subnet == "172.31.0.0/28"
    assert [n.name for n in list_networks(store)] == ["a", "b", "c", "d"]


def test_network_names_are_unique(store: Store) -> None:
    create_network(store, "front")
    with pytest.raises(ValidationError, match="network front already exists; choose another name"):
        create_network(store, "front")


def test_overlapping_subnets_are_rejected_naming_the_other_network(store: Store) -> None:
    create_network(store, "front", subnet="10.20.0.0/24")
    before = snapshot(store)
    with pytest.raises(ValidationError, match=r"10.20.0.0/16: it overlaps network front \(10.20"):
        create_network(store, "wide", subnet="10.20.0.0/16")
    assert snapshot(store) == before


def test_network_rm_refuses_while_a_service_uses_it(store: Store) -> None:
    network = create_network(store, "front")
    create_service(store, spec("web", "front"))
    with pytest.raises(ValidationError, match="network front is in use by service web; remove"):
        remove_network(store, "front")
    remove_service(store, "web")
    remove_network(store, "front")
    assert list_networks(store) == []
    assert store.get("ipam", network.id) is None
    with pytest.raises(NotFoundError, match="network front not found"):
        remove_network(store, "front")


# -- services --------------------------------------------------------------------------------


def test_dnsrr_services_get_no_vip(store: Store) -> None:
    create_network(store, "front")
    created = create_service(store, spec("db", "front", endpoint_mode="dnsrr"))
    assert created.vips() == {}
    assert created.networks[0].vip is None


def test_service_names_are_unique(store: Store) -> None:
    create_service(store, spec("web"))
    with pytest.raises(ValidationError, match="service web already exists; choose another --name"):
        create_service(store, spec("web"))


def test_unknown_network_is_rejected_and_nothing_is_written(store: Store) -> None:
    before = snapshot(store)
    with pytest.raises(NotFoundError, match="network back not found; create it with: meshctl"):
        create_service(store, spec("web", "back"))
    assert snapshot(store) == before


def test_a_published_port_is_used_by_one_service_only(store: Store) -> None:
    create_service(store, spec("web", ports=(PublishedPort(8000, 80),)))
    create_network(store, "front", subnet="10.31.0.0/24")
    with pytest.raises(ValidationError, match="port 8000/tcp is already published by service web"):
        create_service(store, spec("api", "front", ports=(PublishedPort(8000, 81, mode="host"),)))
    create_service(store, spec("dns", ports=(PublishedPort(8000, 53, "udp"),)))
    remove_service(store, "web")
    create_service(store, spec("api", ports=(PublishedPort(8000, 81),)))


def test_a_full_29_with_more_replicas_than_addresses_fails_cleanly(store: Store) -> None:
    create_network(store, "tiny", subnet="10.30.0.0/29")  # 6 hosts: gateway + 5
    before, revision = snapshot(store), store.revision()
    with pytest.raises(
        AddressExhausted, match=r"network tiny \(10.30.0.0/29\) has no free address"
    ):
        create_service(store, spec("web", "tiny", replicas=5))  # VIP + 5 tasks = 6
    assert snapshot(store) == before
    assert store.revision() == revision
    # The last address is the node's load balancer's: a 4th task would leave it none and
    # stop the network's load balancing (and, before, every pass of the controller).
    create_service(store, spec("web", "tiny", replicas=3))
    settle(store)
    with pytest.raises(AddressExhausted, match="for task web.4.*1 kept for the nodes' load"):
        scale_services(store, {"web": 4})
    settle(store)
    assert len(list_tasks(store)) == 3
    network = get_network(store, "tiny")
    assert ipam.allocate_lb_address(store, network, "node1")


def test_the_pool_keeps_one_address_per_node_for_load_balancers(store: Store) -> None:
    for node in ("node1", "node2", "node3"):
        store.put(NODE, node, Node(node).to_dict())
    network = create_network(store, "tiny", subnet="10.30.0.0/29")  # gateway + 5
    ipam.allocate_lb_address(store, network, "node1")
    create_service(store, spec("web", "tiny", replicas=1))  # VIP + 1 task
    settle(store)
    with pytest.raises(AddressExhausted, match="2 kept for the nodes' load balancers"):
        scale_services(store, {"web": 2})
    ipam.allocate_lb_address(store, network, "node2")
    ipam.allocate_lb_address(store, network, "node3")
    assert len(network_ipam(store, network).allocations) == 5


def test_scale_of_several_services_is_all_or_nothing(store: Store) -> None:
    create_service(store, spec("web"))
    with pytest.raises(NotFoundError, match="service nope not found"):
        scale_services(store, {"web": 3, "nope": 1})
    assert get_service(store, "web").replicas == 1
    with pytest.raises(ValidationError, match="invalid replicas -2"):
        scale_services(store, {"web": -2})


def test_update_to_dnsrr_releases_the_vip_and_validates(store: Store) -> None:
    network = create_network(store, "front")
    create_service(store, spec("web", "front", ports=(PublishedPort(8000, 80),)))
    with pytest.raises(ValidationError, match="endpoint mode dnsrr has no VIP"):
        update_service(store, "web", {"endpoint_mode": "dnsrr"})
    updated = update_service(store, "web", {"endpoint_mode": "dnsrr", "ports": ()})
    assert updated.vips() == {}
    assert "vip:" + updated.id not in set(network_ipam(store, network).allocations.values())
    with pytest.raises(ValidationError, match="cannot update id of a service"):
        update_service(store, "web", {"id": "x"})


def test_find_task_by_name_or_id(store: Store) -> None:
    created = create_service(store, spec("web", replicas=2))
    settle(store)
    task = list_tasks(store, created)[1]
    assert find_task(store, "web.2") == task
    assert find_task(store, task.id) == task
    with pytest.raises(NotFoundError, match="no service or task named web.9"):
        find_task(store, "web.9")
