"""The load balancer's pure builders and its reconciler against the fake kernel (no root)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest

from kernel.errors import Unsupported
from kernel.fake.conntrack import FakeConntrack
from kernel.fake.iptables import FakeIptables
from kernel.fake.ipvs import FakeIpvs
from kernel.fake.links import FakeLinks
from kernel.fake.neighbours import FakeNeighbours
from kernel.fake.nftables import FakeNftables
from kernel.fake.sockets import FakeSockets
from kernel.fake.sysctl import FakeSysctl
from kernel.fake.world import FakeNetns, FakeWorld
from kernel.iptables_rules import Match, OwnedTable, TableChange, opts, validate
from kernel.ipvs import Destination, VirtualService
from kernel.nftables_rules import Chain, NftChange
from kernel.system import Kernel
from meshctl.controller.dataplane import choose_dataplane, choose_lb
from meshctl.lb.backends import backend_named
from meshctl.lb.iptables import SERVICES_CHAIN, iptables_tables, sep_chain, svc_chain
from meshctl.lb.ipvs import FWMARK_BASE, FWMARK_MASK, fwmark, ipvs_state, ipvs_tables
from meshctl.lb.nftables import endpoint_chain
from meshctl.lb.reconcile import LbReconciler
from meshctl.lb.spec import Backend, LbSpec, VirtualIp, lb_spec
from meshctl.naming import lb_netns_prefix
from meshctl.node.task_dns import NAT_REDIRECT, NFT_REWRITE

NODE_ID = "node0001"
PREFIX = lb_netns_prefix(NODE_ID)


def web(*backends: Backend, vip: str = "10.0.1.100", sid: str = "svc-web") -> VirtualIp:
    return VirtualIp(sid, "web", vip, backends)


def spec(*vips: VirtualIp, network_id: str = "net00001") -> LbSpec:
    return lb_spec(NODE_ID, network_id, "10.0.1.2/24", vips)


THREE = web(Backend("10.0.1.13"), Backend("10.0.1.11"), Backend("10.0.1.12"))


def tables_of(s: LbSpec, backend: str) -> dict[str, OwnedTable]:
    """The iptables tables a backend that writes them renders for s."""
    return iptables_tables(s) if backend == "iptables" else ipvs_tables(s)


# pure builders


def test_names_follow_the_naming_rules() -> None:
    s = spec()
    assert s.netns == "mesh-lb-node0001-net00001"
    assert s.bridge == "meshnet00001" and s.node_end == "meshlnet00001"
    assert len(s.node_end) <= 15
    assert all(len(c) <= 28 for c in (svc_chain(THREE), sep_chain(THREE, THREE.backends[0])))


def test_iptables_backend_spreads_evenly_over_active_backends_in_a_stable_order() -> None:
    vip = replace(THREE, backends=(*THREE.backends, Backend("10.0.1.14", weight=0)))
    nat = iptables_tables(spec(vip))["nat"]

    svc = svc_chain(vip)
    (block,) = nat.chains[SERVICES_CHAIN]  # one rule per /24 holding VIPs...
    assert (block.target, block.destination) == ("MESH-VIPS-0A000100", "10.0.1.0/24")
    (jump,) = nat.chains[block.target]  # ...and in its chain, one per VIP
    assert (jump.target, jump.destination) == (svc, "10.0.1.100/32")
    spread = nat.chains[svc]
    assert [r.matches for r in spread] == [
        (Match("statistic", opts(mode="nth", every="3", packet="0")),),
        (Match("statistic", opts(mode="nth", every="2", packet="0")),),
        (),
    ]
    # Sorted by address; the draining backend (weight 0) takes no new connections.
    backends = [b for b in vip.backends if b.weight]
    assert [r.target for r in spread] == [sep_chain(vip, b) for b in backends]
    dnat = [nat.chains[sep_chain(vip, b)][0] for b in backends]
    assert [dict(r.target_args)["to-destination"] for r in dnat] == [
        "10.0.1.11",
        "10.0.1.12",
        "10.0.1.13",
    ]
    assert sep_chain(vip, Backend("10.0.1.14")) not in nat.chains


@pytest.mark.parametrize("backend", ["iptables", "ipvs"])
def test_every_rule_is_commented_and_passes_the_iptables_ownership_checks(
    backend: str,
) -> None:
    for table, owned in tables_of(spec(THREE), backend).items():
        rules = [r for rules in owned.chains.values() for r in rules] + list(owned.jumps)
        assert all(r.comment.startswith("meshctl:") for r in rules)
        validate(table, TableChange(replace=owned.chains, ensure_jumps=owned.jumps))


def test_vip_traffic_is_marked_and_source_natted_to_the_lb_address() -> None:
    s = spec(THREE)
    tables = ipvs_tables(s)
    (block,) = tables["mangle"].chains["MESH-MARK"]
    (mark,) = tables["mangle"].chains[block.target]
    assert mark.destination == "10.0.1.100/32"
    assert dict(mark.target_args)["set-xmark"] == f"{fwmark(s, THREE):#x}/0xffffffff"
    (snat,) = tables["nat"].chains["MESH-POSTROUTING"]
    assert dict(snat.target_args) == {"to-source": "10.0.1.2"}
    assert snat.matches[0].name == "mark"
    assert SERVICES_CHAIN not in tables["nat"].chains  # IPVS balances, not nat


def test_the_iptables_backend_needs_no_mark_its_snat_follows_its_dnat() -> None:
    tables = iptables_tables(spec(THREE))
    (snat,) = tables["nat"].chains["MESH-POSTROUTING"]
    assert snat.matches[0].name == "conntrack"
    assert dict(snat.matches[0].args) == {"ctstate": "DNAT"}
    assert tables["mangle"].chains == {} and tables["mangle"].jumps == ()


def test_ipvs_state_is_one_fwmark_service_per_vip_keeping_draining_destinations() -> None:
    vip = web(Backend("10.0.1.11"), Backend("10.0.1.12", weight=0))
    s = spec(vip, web(vip="10.0.1.101", sid="svc-api"))

    state = ipvs_state(s)

    marks = [svc.fwmark for svc in state]
    assert len(set(marks)) == 2
    assert all(m is not None and m & FWMARK_MASK == FWMARK_BASE for m in marks)
    assert state[VirtualService(fwmark=fwmark(s, vip))] == (
        Destination("10.0.1.11", 0, 1, "masq"),
        Destination("10.0.1.12", 0, 0, "masq"),
    )


def test_ipvs_sysctls_only_for_the_ipvs_backend() -> None:
    iptables, ipvs = backend_named("iptables").sysctls(), backend_named("ipvs").sysctls()
    assert iptables["net.ipv4.ip_forward"] == "1"
    assert not any(k.startswith("net.ipv4.vs.") for k in iptables)
    assert ipvs["net.ipv4.vs.conntrack"] == "1"


@pytest.mark.parametrize(
    "build, error",
    [
        (lambda: spec(web(vip="10.9.9.9")), "outside the network's subnet"),
        (lambda: web(Backend("10.0.1.11"), Backend("10.0.1.11")), "listed twice"),
        (lambda: Backend("10.0.1.11", weight=5), "use 1, or 0 to drain"),
        (lambda: spec(web(), web(sid="svc-api")), "share a VIP"),
    ],
)
def test_invalid_specs_say_what_to_fix(build: Callable[[], object], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        build()


# the reconciler on the fake kernel


class Fake:
    """A fake node with the network's bridge, and a reconciler over it."""

    def __init__(self, backend: str) -> None:
        self.world = FakeWorld()
        self.links = FakeLinks(self.world)
        self.iptables = FakeIptables(self.world)
        self.ipvs = FakeIpvs(self.world)
        self.conntrack = FakeConntrack(self.world)
        self.nftables = FakeNftables(self.world)
        kernel = Kernel(
            FakeNetns(self.world),
            self.links,
            FakeSysctl(self.world, ipvs=True),
            self.iptables,
            self.ipvs,
            self.conntrack,
            FakeSockets(self.world),
            FakeNeighbours(self.world),
            self.nftables,
        )
        self.reconciler = LbReconciler(kernel, backend_named(backend))
        self.links.ensure_bridge(None, spec().bridge, alias=spec().mark)

    def sync(self, *specs: LbSpec) -> bool:
        """Sync, and say whether a second plan is empty (it must be)."""
        self.reconciler.sync(list(specs), PREFIX)
        return self.reconciler.plan(list(specs), PREFIX).empty


@pytest.fixture(params=["iptables", "ipvs", "nftables"])
def fake(request: pytest.FixtureRequest) -> Fake:
    return Fake(request.param)


def test_sync_builds_the_lb_namespace_and_converges(fake: Fake) -> None:
    s = spec(THREE)

    assert fake.sync(s)

    ns = s.netns
    assert fake.links.get_link(None, s.node_end).master == s.bridge  # type: ignore[union-attr]
    cidrs = {a.cidr for a in fake.links.list_addresses(ns, "eth0")}
    assert cidrs == {"10.0.1.2/24", "10.0.1.100/32"}
    if fake.reconciler.backend.name == "ipvs":
        (dests,) = fake.ipvs.snapshot(ns).values()
        assert [d.address for d in dests] == ["10.0.1.11", "10.0.1.12", "10.0.1.13"]


def test_changing_one_service_rebuilds_only_its_chains() -> None:
    fake = Fake("iptables")
    api = web(Backend("10.0.1.21"), vip="10.0.1.101", sid="svc-api")
    fake.sync(spec(THREE, api))
    changed = replace(THREE, backends=THREE.backends[:2])

    (change,) = fake.reconciler.plan([spec(changed, api)], PREFIX).changes

    nat = change.objects.tables["nat"]  # type: ignore[union-attr]
    assert set(nat.replace) == {svc_chain(THREE)}
    assert nat.delete == (sep_chain(THREE, THREE.backends[2]),)
    assert "mangle" not in change.objects.tables  # type: ignore[union-attr]


def test_drift_is_repaired(fake: Fake) -> None:
    s = spec(THREE)
    fake.sync(s)
    fake.links.delete_address(s.netns, "eth0", "10.0.1.100/32")
    fake.iptables.flush_owned(s.netns, "mangle")
    if fake.reconciler.backend.name == "ipvs":
        (svc,) = fake.ipvs.list_services(s.netns)
        fake.ipvs.delete_destination(s.netns, svc, Destination("10.0.1.11", 0))
    elif fake.reconciler.backend.name == "nftables":
        held = fake.nftables.list_table(s.netns)
        endpoint = endpoint_chain(THREE, THREE.backends[0])
        fake.nftables.apply(s.netns, NftChange(replace={endpoint: Chain(("dnat to 10.0.1.99",))}))
        assert fake.nftables.list_table(s.netns) != held
    else:
        fake.iptables.flush_owned(s.netns, "nat")
    assert not fake.reconciler.plan([s], PREFIX).empty

    assert fake.sync(s)


def test_a_deleted_lb_namespace_is_rebuilt(fake: Fake) -> None:
    s = spec(THREE)
    fake.sync(s)
    fake.reconciler.kernel.netns.delete(s.netns)

    assert fake.sync(s)

    assert fake.links.get_link(s.netns, "eth0") is not None


def test_auto_picks_ipvs_where_the_kernel_has_it() -> None:
    fake = Fake("iptables")
    kernel = fake.reconciler.kernel
    assert choose_lb(kernel, "auto").name == "ipvs"
    fake.ipvs.unavailable = "no IPVS here"
    assert choose_lb(kernel, "auto").name == "nftables"
    fake.nftables.unavailable = "no nft here"
    assert choose_lb(kernel, "auto").name == "iptables"
    assert choose_lb(kernel, "iptables").name == "iptables"
    with pytest.raises(Unsupported, match="no IPVS here; choose .*iptables or auto"):
        choose_lb(kernel, "ipvs")


def test_the_dataplane_is_chosen_once_the_task_dns_redirect_by_nftables_where_it_runs() -> None:
    """The LB backend and the task DNS redirect, chosen together: nftables' stateless rewrite
    where nftables runs in the node namespace (whatever the LB backend), else the nat redirect."""
    fake = Fake("iptables")
    kernel = fake.reconciler.kernel
    both = choose_dataplane(kernel)
    assert (both.lb.name, both.task_dns) == ("ipvs", NFT_REWRITE)
    assert choose_dataplane(kernel, "iptables").task_dns == NFT_REWRITE
    fake.nftables.unavailable = "no nft here"
    assert choose_dataplane(kernel, "iptables").task_dns == NAT_REDIRECT
    assert choose_dataplane(kernel).lb.name == "ipvs"


def test_removed_backends_lose_their_udp_flows_draining_ones_keep_them(fake: Fake) -> None:
    s = spec(THREE)
    fake.sync(s)
    for backend in ("10.0.1.11", "10.0.1.12", "10.0.1.13"):
        fake.conntrack.add_flow(s.netns, "10.0.1.100", backend)
    fake.conntrack.add_flow(s.netns, "10.0.1.2", "10.0.1.2")  # not balanced: not ours
    draining = replace(THREE, backends=(Backend("10.0.1.11"), Backend("10.0.1.12", 0)))

    assert fake.sync(spec(draining))

    assert {(f.vip, f.backend) for f in fake.conntrack.list_udp_flows(s.netns)} == {
        ("10.0.1.100", "10.0.1.11"),
        ("10.0.1.100", "10.0.1.12"),
        ("10.0.1.2", "10.0.1.2"),
    }


def test_sync_deletes_only_this_nodes_lb_namespaces_no_longer_desired(fake: Fake) -> None:
    netns = fake.reconciler.kernel.netns
    second = spec(network_id="net00002")
    fake.links.ensure_bridge(None, second.bridge, alias=second.mark)
    fake.sync(spec(THREE), second)
    netns.create("mesh-lb-othernod-net00001")
    netns.create("mesh-t-web.1")

    assert fake.sync(spec(THREE))

    assert netns.list_namespaces("mesh-") == [
        "mesh-lb-node0001-net00001",
        "mesh-lb-othernod-net00001",
        "mesh-t-web.1",
    ]
    assert fake.links.get_link(None, "meshlnet00002") is None


def test_an_lb_namespace_without_a_marked_leg_is_kept_and_reported(fake: Fake) -> None:
    netns = fake.reconciler.kernel.netns
    # This node's LB names, not made by this meshctl: no leg at all, and a leg named as meshctl's
    # whose node end is another's (no mark).
    bare, foreign = f"{PREFIX}net00002", f"{PREFIX}net00003"
    netns.create(bare)
    netns.create(foreign)
    fake.links.ensure_veth(None, "meshlnet00003", "eth0", foreign)

    plan = fake.reconciler.sync([spec(THREE)], PREFIX)

    assert plan.delete_netns == ()
    assert plan.unmarked_netns == (bare, foreign)
    assert netns.exists(bare) and netns.exists(foreign)
    assert fake.links.get_link(None, "meshlnet00003") is not None
    assert not fake.reconciler.plan([spec(THREE)], PREFIX).empty  # reported on every pass


@pytest.mark.parametrize("taken", ["meshlnet00001", "meshnet00001"])
def test_a_leg_or_bridge_name_held_by_another_link_is_a_clash_left_alone(taken: str) -> None:
    fake = Fake("iptables")
    fake.links.delete_link(None, "meshnet00001")
    fake.reconciler.kernel.netns.create("other")
    if taken == "meshnet00001":
        fake.links.ensure_bridge(None, taken, alias="other-tool")
    else:
        fake.links.ensure_bridge(None, "meshnet00001", alias=spec().mark)
        fake.links.ensure_veth(None, taken, "eth0", "other")
    before = fake.links.list_links(None)

    plan = fake.reconciler.sync([spec(THREE)], PREFIX)

    ((change,),) = (plan.changes,)
    assert change.clashes == ((taken, "other-tool" if taken == "meshnet00001" else None),)
    assert not change.create_netns and not change.ensure_leg
    assert not fake.reconciler.kernel.netns.exists(spec().netns)
    assert fake.links.list_links(None) == before
    assert fake.reconciler.plan([spec(THREE)], PREFIX).changes == plan.changes


def test_foreign_ipvs_services_are_left_alone() -> None:
    fake = Fake("ipvs")
    s = spec(THREE)
    fake.sync(s)
    foreign = [VirtualService("10.0.1.200", 80), VirtualService(fwmark=7)]
    for svc in foreign:
        fake.ipvs.ensure_service(s.netns, svc)

    assert fake.sync(spec())

    assert fake.ipvs.list_services(s.netns) == foreign


@pytest.mark.parametrize("prefix", ["mesh-lb-", "mesh-", "", "mesh-lb-node0001"])
def test_a_prefix_reaching_beyond_this_node_is_refused(prefix: str) -> None:
    with pytest.raises(ValueError, match="lb_netns_prefix"):
        Fake("iptables").reconciler.sync([], prefix)


def test_a_failure_beside_the_iptables_batch_is_reported_and_the_next_pass_repairs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The leg, sysctls and addresses go in a thread beside the iptables batch: its error must
    reach the reconciler (not vanish with the thread), be reported for that network alone,
    and the next sync must finish the job."""
    fake = Fake("iptables")
    s = spec(THREE)
    real_add = fake.links.ensure_addresses

    def refuse(*args: object) -> None:
        raise Unsupported("no addresses today")

    monkeypatch.setattr(fake.links, "ensure_addresses", refuse)
    fake.reconciler.sync([s], PREFIX)
    assert "no addresses today" in fake.reconciler.failures[s.netns]
    assert fake.iptables.list_owned(s.netns, "nat").chains  # written beside it, kept

    monkeypatch.setattr(fake.links, "ensure_addresses", real_add)
    assert fake.sync(s)
    assert fake.reconciler.failures == {}
    assert "10.0.1.100/32" in {a.cidr for a in fake.links.list_addresses(s.netns, "eth0")}


def test_vips_are_dispatched_per_24_block_in_address_order() -> None:
    """A first packet walks the blocks, then one block's VIPs: not every VIP of the network."""
    vips = [web(Backend("10.0.9.9"), vip=v, sid=f"svc-{v}") for v in
            ("10.0.1.100", "10.0.3.7", "10.0.1.101", "10.0.3.1", "10.0.2.250")]  # fmt: skip
    s = replace(spec(), lb_address_cidr="10.0.0.2/16", vips=tuple(vips))
    for backend, top, prefix in (("iptables", SERVICES_CHAIN, "MESH-VIPS-"),
                                 ("ipvs", "MESH-MARK", "MESH-MARKS-")):  # fmt: skip
        chains = tables_of(s, backend)["nat" if backend == "iptables" else "mangle"].chains
        blocks = [(r.destination, r.target) for r in chains[top]]
        assert blocks == [
            ("10.0.1.0/24", f"{prefix}0A000100"),
            ("10.0.2.0/24", f"{prefix}0A000200"),
            ("10.0.3.0/24", f"{prefix}0A000300"),
        ]
        in_blocks = [[r.destination for r in chains[chain]] for _, chain in blocks]
        assert in_blocks == [
            ["10.0.1.100/32", "10.0.1.101/32"],
            ["10.0.2.250/32"],
            ["10.0.3.1/32", "10.0.3.7/32"],
        ]


def test_a_node_moved_to_another_backend_loses_the_old_ones_objects() -> None:
    """The backend recorded for the node before (the controller's `retired`) is cleared from
    each LB namespace at its first observe: two backends never balance the same VIPs."""
    fake = Fake("ipvs")
    s = spec(THREE)
    fake.sync(s)
    kernel = fake.reconciler.kernel
    fake.reconciler = LbReconciler(kernel, backend_named("iptables"), retired=backend_named("ipvs"))

    assert fake.sync(s)

    assert fake.ipvs.list_services(s.netns) == []
    assert "MESH-MARK" not in fake.iptables.list_owned(s.netns, "mangle").chains
    assert svc_chain(THREE) in fake.iptables.list_owned(s.netns, "nat").chains
