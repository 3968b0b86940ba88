"""IPAM: address arithmetic, exhaustion, subnets from the pool, and allocation through the store."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshctl import ipam
from meshctl.commands.network import create_network
from meshctl.commands.read import network_ipam
from meshctl.ipam import AddressExhausted, IpamState
from meshctl.model import Network, NotFoundError, ValidationError
from meshctl.store import Store, open_store


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with open_store(f"sqlite://{tmp_path}/state.db") as opened:
        yield opened


def state(subnet: str = "10.0.0.0/29") -> IpamState:
    return IpamState.new(Network("n", subnet))


def test_gateway_is_the_first_host_and_never_handed_out() -> None:
    s = state()
    assert s.gateway == "10.0.0.1"
    addresses = []
    for i in range(5):
        s, address = ipam.allocate(s, f"task:{i}")
        addresses.append(address)
    # A /29 has hosts .1-.6: the gateway takes .1; network (.0) and broadcast (.7) never appear.
    assert addresses == ["10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6"]


def test_a_full_subnet_fails_naming_the_network_and_the_fix() -> None:
    s = state()
    for i in range(5):
        s, _ = ipam.allocate(s, f"task:{i}")
    with pytest.raises(AddressExhausted, match=r"network n \(10.0.0.0/29\) has no free address "):
        ipam.allocate(s, "task:5", "task web.6")
    with pytest.raises(
        AddressExhausted, match="for task web.6: 5 of 5 are in use; .*larger --subnet"
    ):
        ipam.allocate(s, "task:5", "task web.6")


def test_an_owner_keeps_its_address_and_never_gets_a_second() -> None:
    s, first = ipam.allocate(state(), "lb:node1")
    again, second = ipam.allocate(s, "lb:node1")
    assert first == second
    assert again is s


def test_released_addresses_are_reused_only_after_the_others() -> None:
    s, a = ipam.allocate(state(), "task:a")
    s, b = ipam.allocate(s, "task:b")
    s = ipam.release(s, ["task:a", "task:unknown"])
    assert s.owner_address("task:a") is None
    s, c = ipam.allocate(s, "task:c")
    assert c not in (a, b)  # the next address, not the one just freed
    for i in range(2):
        s, _ = ipam.allocate(s, f"task:{i}")
    s, wrapped = ipam.allocate(s, "task:last")
    assert wrapped == a  # after the end it wraps around to the freed one
    assert len(set(s.allocations)) == len(s.allocations) == 5


def test_state_round_trips_through_its_dict() -> None:
    s, _ = ipam.allocate(state(), "vip:abc")
    assert IpamState.from_dict(s.to_dict()) == s


def test_subnets_are_carved_from_the_pool_avoiding_taken_ones() -> None:
    taken = [Network("a", "10.10.0.0/24"), Network("b", "10.10.2.0/23")]
    assert ipam.pick_subnet("10.10.0.0/16", 24, taken) == "10.10.1.0/24"
    taken.append(Network("c", "10.10.1.0/24"))
    assert ipam.pick_subnet("10.10.0.0/16", 24, taken) == "10.10.4.0/24"
    with pytest.raises(AddressExhausted, match="the address pool 10.10.0.0/23 has no free /24"):
        ipam.pick_subnet("10.10.0.0/23", 24, taken)


def test_overlap_finds_the_other_network() -> None:
    networks = [Network("a", "10.10.0.0/24")]
    assert ipam.overlapping("10.10.0.0/16", networks) == networks[0]
    assert ipam.overlapping("10.10.1.0/24", networks) is None


def test_pool_comes_from_arguments_then_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ipam.configured_pool() == ("10.10.0.0/16", 24)
    monkeypatch.setenv(ipam.POOL_ENV, "172.30.0.0/16")
    monkeypatch.setenv(ipam.PREFIX_ENV, "26")
    assert ipam.configured_pool() == ("172.30.0.0/16", 26)
    assert ipam.configured_pool("192.168.0.0/20", 28) == ("192.168.0.0/20", 28)
    with pytest.raises(ValidationError, match="invalid pool prefix /8 for pool 192.168.0.0/20"):
        ipam.configured_pool("192.168.0.0/20", 8)
    monkeypatch.setenv(ipam.POOL_ENV, "nonsense")
    with pytest.raises(ValidationError, match="invalid address pool 'nonsense'"):
        ipam.configured_pool()


def test_load_balancer_addresses_are_stored_once_per_node(store: Store) -> None:
    network = create_network(store, "front", subnet="10.20.0.0/24")
    a = ipam.allocate_lb_address(store, network, "node1")
    assert ipam.allocate_lb_address(store, network, "node1") == a
    b = ipam.allocate_lb_address(store, network, "node2")
    assert a != b
    assert network_ipam(store, network).allocations == {a: "lb:node1", b: "lb:node2"}
    claims = {r.name: r.value["owner"] for r in store.list(ipam.ADDRESS)}
    assert claims == {f"{network.id}/{a}": "lb:node1", f"{network.id}/{b}": "lb:node2"}
    ipam.release_lb_address(store, network, "node1")
    assert network_ipam(store, network).allocations == {b: "lb:node2"}


def test_concurrent_allocations_never_hand_out_an_address_twice(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path}/state.db"
    with open_store(url) as setup:
        network = create_network(setup, "front", subnet="10.20.0.0/24")
    results: dict[str, str] = {}

    def join(node: str) -> None:
        with open_store(url) as own:  # one store connection each, as separate processes have
            results[node] = ipam.allocate_lb_address(own, network, node)

    threads = [threading.Thread(target=join, args=(f"node{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8
    assert len(set(results.values())) == 8


def test_lb_address_on_a_missing_network_says_how_to_list(store: Store) -> None:
    with pytest.raises(NotFoundError, match="network nope not found; list networks with"):
        ipam.allocate_lb_address(store, Network("nope", "10.99.0.0/24"), "node1")
