"""The change tracker (`sync_changed`): one service's change without reading the kernel back,
checked against the fake kernel, where a full observe afterwards must find nothing to do."""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import pytest

from kernel.errors import KernelError
from meshctl.lb.iptables import SERVICES_CHAIN as SERVICES
from meshctl.lb.iptables import sep_chain, svc_chain
from meshctl.lb.nftables import endpoint_chain, service_chain
from meshctl.lb.plan import vip_change
from meshctl.lb.spec import Backend, LbSpec, VirtualIp
from tests.unit.test_lb import PREFIX, Fake, spec
from tests.unit.test_lb import fake as fake  # noqa: F401  (the fixture, over both backends)

RANDOM_STEPS = 150


def service(index: int, backends: int = 3, blocks: int = 1) -> VirtualIp:
    """Service index; with blocks > 1 the VIPs spread over that many /24s (of a /16)."""
    return VirtualIp(
        f"svc-{index}",
        f"s{index}",
        f"10.0.{1 + index % blocks}.{100 + index}",
        tuple(Backend(f"10.0.1.{10 + index * 5 + b}") for b in range(backends)),
    )


def spread_spec(vips: Iterable[VirtualIp], blocks: int) -> LbSpec:
    if blocks == 1:
        return spec(*vips)
    return replace(spec(), lb_address_cidr="10.0.1.2/16", vips=tuple(vips))


def mutate(vips: dict[int, VirtualIp], rng: random.Random, blocks: int = 1) -> None:
    """One change a controller makes: a service comes or goes, or one backend changes."""
    index = rng.randrange(12)
    vip = vips.get(index)
    if vip is None:
        vips[index] = service(index, rng.randrange(0, 4), blocks)
        return
    step = rng.choice(["remove", "drain", "drop", "add", "rename"])
    backends = list(vip.backends)
    if step == "remove":
        del vips[index]
    elif step == "drain" and backends:
        b = rng.randrange(len(backends))
        backends[b] = replace(backends[b], weight=1 - backends[b].weight)
    elif step == "drop" and backends:
        backends.pop(rng.randrange(len(backends)))
    elif step == "add" and len(backends) < 5:
        taken = {b.address for b in backends}
        free = [f"10.0.1.{10 + index * 5 + b}" for b in range(5)]
        backends.append(Backend(rng.choice([a for a in free if a not in taken])))
    elif step == "rename":  # the VIP handed to another service
        vip = replace(vip, service_id=f"svc-{index}-{rng.randrange(1000)}")
    vips[index] = replace(vip, backends=tuple(backends))


@pytest.mark.parametrize("blocks", [1, 3], ids=["one-24", "three-24s"])
@pytest.mark.parametrize("seed", range(4))
def test_changes_applied_one_by_one_converge_like_a_full_sync(
    fake: Fake, seed: int, blocks: int
) -> None:
    """Across /24 blocks too: blocks that empty are deleted, new ones made and jumped to."""
    rng = random.Random(seed)
    vips = {i: service(i, blocks=blocks) for i in range(6)}
    fake.reconciler.sync_changed([spread_spec(vips.values(), blocks)], PREFIX)
    for _ in range(RANDOM_STEPS):
        mutate(vips, rng, blocks)
        desired = [spread_spec(vips.values(), blocks)]

        fake.reconciler.sync_changed(desired, PREFIX)

        leftover = fake.reconciler.plan(desired, PREFIX)
        assert leftover.empty, leftover


def test_a_backend_change_touches_only_that_services_objects(fake: Fake) -> None:
    vips = [service(i) for i in range(12)]
    fake.reconciler.sync([spec(*vips)], PREFIX)
    web = vips[5]
    vips[5] = replace(web, backends=web.backends[:2])

    (change,) = fake.reconciler.plan_changes([spec(*vips)], PREFIX).changes

    objects: Any = change.objects
    if fake.reconciler.backend.name == "iptables":
        (nat,) = objects.tables.values()
        assert set(nat.replace) == {svc_chain(web)}
        assert nat.delete == (sep_chain(web, web.backends[2]),)
    elif fake.reconciler.backend.name == "nftables":
        nft = objects.change
        assert set(nft.replace) == {service_chain(web)}  # its numgen map, one entry shorter
        assert nft.delete == (endpoint_chain(web, web.backends[2]),)
        assert not (nft.add_elements or nft.delete_elements or nft.add_sets)
    else:
        assert objects.tables.empty
        ((_, gone),) = objects.ipvs.delete_destinations
        assert gone.address == web.backends[2].address
        assert not objects.ipvs.ensure_destinations and not objects.ipvs.ensure_services
    assert [(f.vip, f.backend) for f in change.stale_udp] == [(web.vip, web.backends[2].address)]
    assert not change.add_addresses and not change.delete_addresses


def test_a_new_or_removed_service_rewrites_the_shared_chains(fake: Fake) -> None:
    before = spec(service(1), service(2))
    fake.reconciler.sync([before], PREFIX)

    change = vip_change(before, spec(service(1)), fake.reconciler.backend)

    assert change is not None
    objects: Any = change.objects
    assert change.delete_addresses == (f"{service(2).vip}/32",)
    if fake.reconciler.backend.name == "nftables":
        nft = objects.change  # one map element: the other VIPs' are left alone
        assert nft.delete_elements == {"services": (service(2).vip,)}
        assert set(nft.delete) == {service_chain(service(2))} | {
            endpoint_chain(service(2), b) for b in service(2).backends
        }
        assert not nft.replace and not nft.add_elements
        return
    tables = objects.tables if fake.reconciler.backend.name == "iptables" else objects.tables.tables
    table = "mangle" if fake.reconciler.backend.name == "ipvs" else "nat"
    held = fake.iptables.list_owned(before.netns, table).chains
    (block,) = (c for c in held if c.startswith(("MESH-VIPS-", "MESH-MARKS-")))  # one /24
    assert block in tables[table].replace  # its block loses service 2's rule
    top = "MESH-MARK" if table == "mangle" else SERVICES
    assert top not in tables[table].replace  # the block stays, and its jump with it
    assert change.delete_addresses == (f"{service(2).vip}/32",)


def test_without_a_record_it_observes_and_drift_waits_for_the_full_sync(fake: Fake) -> None:
    s = spec(service(1))
    assert fake.reconciler.sync_changed([s], PREFIX).changes  # nothing known: observed, built
    fake.links.delete_address(s.netns, "eth0", f"{service(1).vip}/32")

    assert fake.reconciler.plan_changes([s], PREFIX).empty  # it trusts its record...
    assert not fake.reconciler.sync([s], PREFIX).empty  # ...until the full sync repairs it
    assert fake.reconciler.plan([s], PREFIX).empty


def test_a_failed_apply_makes_the_next_pass_observe(
    fake: Fake, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = spec(service(1))
    fake.reconciler.sync([s], PREFIX)
    changed = spec(replace(service(1), backends=service(1).backends[:1]))
    kernel = fake.reconciler.kernel

    def refuse(*args: object) -> None:
        raise KernelError("refused")

    with monkeypatch.context() as patch:
        patch.setattr(kernel.iptables, "apply", refuse)
        patch.setattr(kernel.ipvs, "apply", refuse)
        patch.setattr(kernel.nftables, "apply", refuse)
        fake.reconciler.sync_changed([changed], PREFIX)
        assert "refused" in fake.reconciler.failures[changed.netns]

    fake.reconciler.sync_changed([changed], PREFIX)
    assert fake.reconciler.plan([changed], PREFIX).empty
    assert fake.reconciler.failures == {}
