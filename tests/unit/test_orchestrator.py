"""The leader's slot keeping: task records made for missing slots (addressed), dropped or sent
to stop when scaled away or their service is removed, on both stores; a 1,000-replica service
fits etcd's cap on operations per txn."""

from __future__ import annotations

import dataclasses
from typing import Any

from meshctl.cluster import orchestrator, tasks, updater
from meshctl.cluster.orchestrator import Create, Drop, Stop, plan_tasks
from meshctl.commands.network import create_network
from meshctl.commands.read import get_service, list_services, list_tasks, network_ipam
from meshctl.commands.service import create_service, remove_service, scale_services, update_service
from meshctl.model import NetworkAttachment, Service, Task
from meshctl.store import Store
from meshctl.view import read_view
from tests.unit.leader import place, settle


def spec(name: str = "web", *networks: str, **fields: Any) -> Service:
    return Service(name, ("sleep", "infinity"),
                   networks=tuple(NetworkAttachment(n) for n in networks), **fields)  # fmt: skip


def test_create_writes_the_service_in_one_txn_and_the_leader_makes_its_tasks(
    store: Store,
) -> None:
    create_network(store, "front", subnet="10.20.0.0/24", driver="bridge")
    revision = store.revision()
    created = create_service(store, spec("web", "front", replicas=3))
    assert store.revision() == revision + 1  # one transaction, and no task yet
    assert created.networks[0].vip == "10.20.0.2"
    assert list_tasks(store) == []
    view = read_view(store)
    assert orchestrator.plan(view) == [Create(created.id, slot) for slot in (1, 2, 3)]
    settle(store)
    made = list_tasks(store, created)
    assert [t.name for t in made] == ["web.1", "web.2", "web.3"]
    assert {(t.desired_state, t.state, t.node, t.spec_version) for t in made} == {
        ("running", "pending", "", 1)
    }
    assert [t.addresses for t in made] == [
        {"front": "10.20.0.3"},
        {"front": "10.20.0.4"},
        {"front": "10.20.0.5"},
    ]
    assert orchestrator.plan(read_view(store)) == []


def test_scale_down_drops_unplaced_tasks_and_stops_placed_ones(store: Store) -> None:
    network = create_network(store, "front", driver="bridge")
    created = create_service(store, spec("web", "front", replicas=3))
    settle(store)
    made = list_tasks(store, created)
    placed = place(store, made[2])  # web.3 runs on node1
    scale_services(store, {"web": 1})
    view = read_view(store)
    assert orchestrator.plan(view) == [Drop(made[1].id), Stop(placed.id, "shutdown", "scaled down")]
    settle(store)
    after = {t.name: t for t in list_tasks(store, created)}
    assert set(after) == {"web.1", "web.3"}  # web.2 never ran: gone at once
    assert after["web.3"].desired_state == "shutdown"
    assert after["web.3"].history[-1].message == "scaled down"
    owners = set(network_ipam(store, network).allocations.values())
    assert f"task:{made[1].id}" not in owners
    assert f"task:{placed.id}" in owners  # still in use until its controller forgets it
    tasks.forget_task(store, placed.id)
    assert f"task:{placed.id}" not in set(network_ipam(store, network).allocations.values())
    assert get_service(store, "web").version == 1  # scaling rolls nothing


def test_scale_up_again_while_an_old_task_drains_makes_a_new_task(store: Store) -> None:
    created = create_service(store, spec("web", replicas=2))
    settle(store)
    old = place(store, list_tasks(store, created)[1])
    scale_services(store, {"web": 1})
    settle(store)
    scale_services(store, {"web": 2})
    settle(store)
    slot2 = [t for t in list_tasks(store, created) if t.slot == 2]
    assert {(t.id == old.id, t.desired_state) for t in slot2} == {
        (True, "shutdown"),
        (False, "running"),
    }


def test_a_removed_services_tasks_go_or_are_handed_to_their_controller(store: Store) -> None:
    network = create_network(store, "front", driver="bridge")
    created = create_service(store, spec("web", "front", replicas=2))
    settle(store)
    running = place(store, list_tasks(store, created)[0])
    remove_service(store, "web")
    assert list_services(store) == []
    settle(store)
    left = list_tasks(store)
    assert [(t.id, t.desired_state) for t in left] == [(running.id, "removed")]
    assert set(network_ipam(store, network).allocations.values()) == {f"task:{running.id}"}
    # Lingering tasks do not block the network; a new service with the name starts afresh.
    again = create_service(store, spec("web", "front"))
    settle(store)
    assert [t.service_id for t in list_tasks(store) if t.desired_state == "running"] == [again.id]


def test_an_update_rolls_each_slot_onto_the_new_spec_and_networks(store: Store) -> None:
    create_network(store, "front", driver="bridge")
    create_network(store, "back", driver="bridge")
    created = create_service(store, spec("web", "front", replicas=2))
    settle(store)
    for task in list_tasks(store, created):
        place(store, task)
    updated = update_service(
        store, "web", {"networks": (NetworkAttachment("front"), NetworkAttachment("back"))}
    )
    assert updated.version == 2 and updated.vips()["front"] == created.vips()["front"]
    assert updater.roll(store, read_view(store)) == (True, "")
    new = [t for t in list_tasks(store, created) if t.spec_version == 2]
    assert [(t.slot, set(t.addresses)) for t in new] == [(1, {"front", "back"})]
    place(store, new[0])
    assert updater.roll(store, read_view(store)) == (True, "")  # the new one runs: the old goes
    slot1 = {t.spec_version: t.desired_state for t in list_tasks(store, created)
             if t.slot == 1}  # fmt: skip
    assert slot1 == {1: "shutdown", 2: "running"}
    # No duplicate is trimmed while a replacement is under way.
    assert not any(isinstance(d, (Drop, Stop)) for d in orchestrator.plan(read_view(store)))


def _slots(store: Store, service: Service) -> dict[tuple[int, int], str]:
    """(slot, spec version) → desired state of each of the service's tasks."""
    return {(t.slot, t.spec_version): t.desired_state for t in list_tasks(store, service)}


def _of_version(store: Store, service: Service, slot: int, version: int) -> Task:
    (task,) = [t for t in list_tasks(store, service)
               if (t.slot, t.spec_version) == (slot, version)]  # fmt: skip
    return task


def _two_placed_on_a_29_then_updated(store: Store) -> Service:
    """Service web, 2 tasks placed on a /29, then updated: its rolling update starts."""
    create_network(store, "small", subnet="10.20.1.0/29", driver="bridge")
    created = create_service(store, spec("web", "small", replicas=2))
    settle(store)
    for task in list_tasks(store, created):
        place(store, task)
    update_service(store, "web", {"env": {"RELEASE": "2"}})
    return created


def test_an_update_short_of_addresses_waits_for_the_old_task_to_go(store: Store) -> None:
    """A /29 holds the gateway, the LB's reserve, the VIP and two tasks: one address is free, for
    the first new task. The second waits (no error: the pass goes on) until the first old task
    is gone; then it is made beside the second old one, new first as before."""
    created = _two_placed_on_a_29_then_updated(store)
    assert updater.roll(store, read_view(store)) == (True, "")
    place(store, _of_version(store, created, 1, 2))
    assert updater.roll(store, read_view(store)) == (True, "")  # web.1's old task goes
    assert updater.roll(store, read_view(store)) == (False, "")  # it used to raise
    assert _slots(store, created) == {(1, 1): "shutdown", (1, 2): "running", (2, 1): "running"}
    tasks.forget_task(store, _of_version(store, created, 1, 1).id)  # its node stopped it
    assert updater.roll(store, read_view(store)) == (True, "")
    assert _slots(store, created) == {(1, 2): "running", (2, 1): "running", (2, 2): "running"}


def test_an_update_with_no_address_to_spare_stops_each_old_task_first(store: Store) -> None:
    """With no address free at all (another service's VIP took the spare one), the old task
    goes first, as swarm's stop-first order: the orchestrator fills its slot once its address
    is free, and the next old task goes only when that new one is ready."""
    created = _two_placed_on_a_29_then_updated(store)
    create_service(store, spec("api", "small", replicas=0))  # its VIP: the last address
    assert updater.roll(store, read_view(store)) == (True, "")
    assert _slots(store, created) == {(1, 1): "shutdown", (2, 1): "running"}
    old = _of_version(store, created, 1, 1)
    assert old.history[-1].message.startswith("replaced by an update, stopped first")
    assert updater.roll(store, read_view(store)) == (False, "")  # web.1's old task leaving
    tasks.forget_task(store, old.id)
    settle(store)  # the orchestrator fills slot 1 on the new spec
    assert updater.roll(store, read_view(store)) == (False, "")  # web.1's new task not ready
    place(store, _of_version(store, created, 1, 2))
    assert updater.roll(store, read_view(store)) == (True, "")
    assert _slots(store, created) == {(1, 2): "running", (2, 1): "shutdown"}


def test_an_update_onto_a_full_network_is_stuck_and_says_so(store: Store) -> None:
    """The new spec adds a network that filled up after the update was accepted: stopping an
    old task would free nothing there, so none is stopped, and the update says why it is stuck."""
    create_network(store, "front", driver="bridge")
    create_network(store, "small", subnet="10.20.1.0/29", driver="bridge")
    created = create_service(store, spec("web", "front"))
    settle(store)
    place(store, list_tasks(store, created)[0])
    update_service(store, "web", {"networks": (NetworkAttachment("front"),
                                                   NetworkAttachment("small"))})  # fmt: skip
    for name in ("api", "db", "cache"):  # their VIPs take what is left
        create_service(store, spec(name, "small", replicas=0))
    changed, stuck = updater.roll(store, read_view(store))
    assert not changed and stuck.startswith("the rolling update of service web is stuck: ")
    assert "network small" in stuck
    assert _slots(store, created) == {(1, 1): "running"}


def test_plan_tasks_fills_missing_slots_and_trims_extra_ones() -> None:
    service = spec("web", replicas=2)
    extra = Task("web", service.id, 3, 1)
    gone = Task("web", service.id, 1, 1, desired_state="shutdown")
    other = Task("api", "someone-else", 1, 1)
    keep = Task("web", service.id, 2, 1, created_at=1.0)
    twin = Task("web", service.id, 2, 1, created_at=2.0)
    assert plan_tasks(service, [extra, gone, other, keep, twin]) == ([1], [extra, twin])
    # A twin on a node being drained is its replacement under way: both stay.
    leaving = dataclasses.replace(keep, node="node1")
    assert plan_tasks(service, [leaving, twin], leaving={"node1"}) == ([1], [])
    newer = dataclasses.replace(twin, spec_version=2)  # a rolling update's: both stay
    assert plan_tasks(service, [keep, newer]) == ([1], [])
    assert plan_tasks(dataclasses.replace(service, replicas=0), [keep]) == ([], [keep])


def test_a_thousand_replicas_fit_etcds_cap_on_a_txns_operations(store: Store) -> None:
    """etcd refuses a txn of over 128 operations: a service's tasks are made in batches."""
    create_network(store, "big", subnet="10.40.0.0/20", driver="bridge")
    created = create_service(store, spec("web", "big", replicas=1000))
    settle(store)
    made = list_tasks(store, created)
    assert sorted(t.slot for t in made) == list(range(1, 1001))
    assert len({t.addresses["big"] for t in made}) == 1000
    scale_services(store, {"web": 10})
    settle(store)
    assert len(list_tasks(store, created)) == 10
    remove_service(store, "web")
    settle(store)
    assert list_tasks(store) == []
