"""kernel.links against the fake and the real kernel: links, addresses, routes.

Each test runs on both (the `kernel` fixture); the last ones send real packets between
namespaces over a veth pair and over a bridge, on the real kernel only.
"""

from __future__ import annotations

import errno
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import replace

import pytest

from kernel import netns
from kernel.errors import AlreadyExists, KernelError, NotFound, Unsupported
from kernel.fake.links import FakeLinks
from kernel.fake.world import FakeNetns, FakeWorld
from kernel.links import Address, Link, Route, VxlanInfo, mac_for
from tests.conformance.conftest import KernelUnderTest
from tests.conftest import NetnsFactory, scaled


def names(links: list[Link]) -> list[str]:
    return [link.name for link in links]


def eventually(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll check until it holds or timeout seconds pass; whether it held."""
    deadline = time.monotonic() + scaled(timeout)
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def link(kernel: KernelUnderTest, ns: str, name: str) -> Link:
    found = kernel.links.get_link(ns, name)
    assert found is not None, f"{name} missing in {ns}"
    return found


def up_pair(kernel: KernelUnderTest, ns: str, cidr: str) -> None:
    """A veth pair a/b in ns, a up with cidr: a device that routes can use."""
    kernel.links.ensure_veth(ns, "a", "b", ns)
    kernel.links.set_up(ns, "a")
    kernel.links.ensure_address(ns, "a", cidr)


def test_new_namespace_holds_only_lo_down(kernel: KernelUnderTest) -> None:
    ns = kernel.new_ns("lo")
    (lo,) = kernel.links.list_links(ns)
    assert (lo.name, lo.kind, lo.up, lo.mtu, lo.master) == ("lo", None, False, 65536, None)
    assert kernel.links.list_addresses(ns) == []
    kernel.links.set_up(ns, "lo")
    assert link(kernel, ns, "lo").up
    assert kernel.links.list_addresses(ns) == [Address("lo", "127.0.0.1/8")]
    assert kernel.links.list_routes(ns) == []


def test_bridge_ensure_twice_is_a_no_op(kernel: KernelUnderTest) -> None:
    ns = kernel.new_ns("br")
    kernel.links.ensure_bridge(ns, "meshbr0", mtu=1400)
    first = link(kernel, ns, "meshbr0")
    kernel.links.ensure_bridge(ns, "meshbr0")
    assert link(kernel, ns, "meshbr0") == first
    assert (first.kind, first.mtu, first.up) == ("bridge", 1400, False)
    assert names(kernel.links.list_links(ns)) == ["lo", "meshbr0"]


def test_kind_clash_raises_already_exists(kernel: KernelUnderTest) -> None:
    ns = kernel.new_ns("clash")
    kernel.links.ensure_bridge(ns, "x0")
    with pytest.raises(AlreadyExists, match="x0 .* is a bridge, not a veth"):
        kernel.links.ensure_veth(ns, "x0", "x1", ns)
    with pytest.raises(AlreadyExists, match="lo .* is a device, not a bridge"):
        kernel.links.ensure_bridge(ns, "lo")
    assert link(kernel, ns, "x0").kind == "bridge"


def test_alias_is_set_with_the_link_and_listed(kernel: KernelUnderTest) -> None:
    node, task = kernel.new_ns("node"), kernel.new_ns("task")
    kernel.links.ensure_bridge(node, "meshbr0", alias="meshctl:net1")
    kernel.links.ensure_veth(node, "meshv1", "eth0", task, alias="meshctl:task1")
    kernel.links.ensure_vxlan(node, "meshvx0", 42, alias="meshctl:net1")
    kernel.links.ensure_bridge(node, "plain")
    # Ensuring again with the same alias is a no-op.
    kernel.links.ensure_bridge(node, "meshbr0", alias="meshctl:net1")
    kernel.links.ensure_veth(node, "meshv1", "eth0", task, alias="meshctl:task1")
    listed = {found.name: found.alias for found in kernel.links.list_links(node)}
    assert listed == {
        "lo": None,
        "meshbr0": "meshctl:net1",
        "meshv1": "meshctl:task1",
        "meshvx0": "meshctl:net1",
        "plain": None,
    }
    assert link(kernel, node, "meshv1").alias == "meshctl:task1"
    assert link(kernel, task, "eth0").alias is None  # the alias is the named end's only
    if not kernel.is_fake:  # as iproute2 shows it
        shown = subprocess.run(["ip", "-n", node, "-o", "link", "show", "meshbr0"],
                               capture_output=True, text=True, check=True).stdout  # fmt: skip
        assert "alias meshctl:net1" in shown


def test_a_link_of_that_name_with_another_alias_is_not_adopted(kernel: KernelUnderTest) -> None:
    node, task = kernel.new_ns("node"), kernel.new_ns("task")
    # Another tool's links with the names asked for: one without an alias, one with its own.
    kernel.links.ensure_bridge(node, "meshbr0")
    kernel.links.ensure_veth(node, "meshv1", "eth0", task, alias="other-tool")
    kernel.links.ensure_vxlan(node, "meshvx0", 42)
    before = kernel.links.list_links(node)
    with pytest.raises(AlreadyExists, match="meshbr0 .* has no alias, not alias 'meshctl:net1'"):
        kernel.links.ensure_bridge(node, "meshbr0", alias="meshctl:net1")
    with pytest.raises(AlreadyExists, match="alias 'other-tool', not alias 'meshctl:task1'"):
        kernel.links.ensure_veth(node, "meshv1", "eth0", task, alias="meshctl:task1")
    with pytest.raises(AlreadyExists, match="meshvx0 .* has no alias"):
        kernel.links.ensure_vxlan(node, "meshvx0", 42, alias="meshctl:net1")
    # A marked link is not another's unmarked one either.
    kernel.links.ensure_bridge(node, "meshbr1", alias="meshctl:net1")
    with pytest.raises(AlreadyExists, match="has alias 'meshctl:net1', not no alias"):
        kernel.links.ensure_bridge(node, "meshbr1")
    assert kernel.links.list_links(node)[: len(before)] == before


def test_an_alias_the_kernel_refuses_leaves_no_link(kernel: KernelUnderTest) -> None:
    node, task = kernel.new_ns("node"), kernel.new_ns("task")
    kernel.links.ensure_bridge(node, "meshbr0", alias="m" * 254)  # the longest one it takes
    with pytest.raises(KernelError, match="set alias"):
        kernel.links.ensure_bridge(node, "meshbr1", alias="m" * 255)
    with pytest.raises(KernelError, match="set alias"):
        kernel.links.ensure_veth(node, "meshv1", "eth0", task, alias="m" * 300)
    assert names(kernel.links.list_links(node)) == ["lo", "meshbr0"]
    assert eventually(lambda: names(kernel.links.list_links(task)) == ["lo"])


def test_veth_peer_lands_in_the_other_namespace(kernel: KernelUnderTest) -> None:
    node, task = kernel.new_ns("node"), kernel.new_ns("task")
    kernel.links.ensure_veth(node, "meshv1", "eth0", task)
    kernel.links.ensure_veth(node, "meshv1", "eth0", task)
    assert link(kernel, node, "meshv1").kind == "veth"
    assert link(kernel, task, "eth0").kind == "veth"
    assert kernel.links.get_link(node, "eth0") is None
    assert kernel.links.get_link(task, "meshv1") is None


def test_veth_without_its_peer_is_not_the_pair_asked_for(kernel: KernelUnderTest) -> None:
    node, task, other = kernel.new_ns("node"), kernel.new_ns("task"), kernel.new_ns("other")
    kernel.links.ensure_veth(node, "meshv1", "eth0", task)
    with pytest.raises(AlreadyExists, match="peer eth0 is not in"):
        kernel.links.ensure_veth(node, "meshv1", "eth0", other)
    kernel.links.ensure_bridge(other, "taken")
    with pytest.raises(AlreadyExists):
        kernel.links.ensure_veth(node, "meshv2", "taken", other)
    assert kernel.links.get_link(node, "meshv2") is None


def test_deleting_one_end_deletes_the_other(kernel: KernelUnderTest) -> None:
    node, task = kernel.new_ns("node"), kernel.new_ns("task")
    kernel.links.ensure_veth(node, "meshv1", "eth0", task)
    kernel.links.delete_link(task, "eth0")
    assert kernel.links.get_link(node, "meshv1") is None
    kernel.links.delete_link(task, "eth0")  # already gone: no-op
    kernel.links.delete_link(node, "meshv1")


def test_deleting_the_peer_namespace_deletes_the_local_end(kernel: KernelUnderTest) -> None:
    node, task = kernel.new_ns("node"), kernel.new_ns("task")
    kernel.links.ensure_veth(node, "meshv1", "eth0", task)
    kernel.links.ensure_bridge(node, "meshbr0")
    kernel.links.set_master(node, "meshv1", "meshbr0")
    kernel.netns.delete(task)
    assert not kernel.netns.exists(task)
    # The kernel frees a namespace in a work queue: the local end goes soon, not at once.
    assert eventually(lambda: names(kernel.links.list_links(node)) == ["lo", "meshbr0"])


def test_veth_to_the_node_namespace_fake_only() -> None:
    """peer_ns=None is the node; only the fake may be pointed there in tests."""
    world = FakeWorld()
    FakeNetns(world).create("task")
    links = FakeLinks(world)
    links.ensure_veth("task", "eth0", "meshv1", None)
    node_end = links.get_link(None, "meshv1")
    assert node_end is not None and node_end.kind == "veth"
    FakeNetns(world).delete("task")
    assert links.get_link(None, "meshv1") is None


def test_dummy(kernel: KernelUnderTest) -> None:
    ns = kernel.new_ns("dummy")
    try:
        kernel.links.ensure_dummy(ns, "meshd0")
    except Unsupported as err:
        assert not kernel.is_fake
        pytest.skip(f"this kernel has no dummy links: {err}")
    kernel.links.ensure_dummy(ns, "meshd0")
    assert link(kernel, ns, "meshd0").kind == "dummy"


def test_fake_models_a_kernel_without_dummy() -> None:
    world = FakeWorld()
    with pytest.raises(Unsupported):
        FakeLinks(world, unsupported_kinds={"dummy"}).ensure_dummy(None, "d0")


def test_vxlan(kernel: KernelUnderTest) -> None:
    ns = kernel.new_ns("vx")
    kernel.links.ensure_veth(ns, "under", "under-p", ns)
    kernel.links.ensure_vxlan(ns, "meshvx0", 4097, local="10.98.0.1", alias="meshctl:net1")
    kernel.links.ensure_vxlan(ns, "meshvx0", 4097, local="10.98.0.1", alias="meshctl:net1")
    kernel.links.ensure_vxlan(ns, "meshvx1", 4098, dev="under", port=8472, learning=True)
    vx0, vx1 = link(kernel, ns, "meshvx0"), link(kernel, ns, "meshvx1")
    assert (vx0.kind, vx0.mtu, vx0.up) == ("vxlan", 1500, False)
    assert vx0.vxlan == VxlanInfo(4097, 4789, "10.98.0.1", learning=False, proxy=True)
    assert vx1.vxlan == VxlanInfo(4098, 8472, None, learning=True, proxy=True)
    assert vx1.mtu == 1450  # the underlay's MTU less the 50-byte header
    assert link(kernel, ns, "under").vxlan is None
    with pytest.raises(NotFound, match="link nodev does not exist"):
        kernel.links.ensure_vxlan(ns, "meshvx2", 5, dev="nodev")
    assert names(kernel.links.list_links(ns)) == ["lo", "under-p", "under", "meshvx0", "meshvx1"]


def test_vxlan_with_other_settings_is_not_adopted(kernel: KernelUnderTest) -> None:
    ns = kernel.new_ns("vxclash")
    kernel.links.ensure_vxlan(ns, "meshvx0", 4097, local="10.98.0.1", alias="meshctl:net1")
    before = link(kernel, ns, "meshvx0")
    others: list[tuple[dict[str, object], str]] = [
        ({"vni": 9}, "has VNI 4097, not 9;"),
        ({"port": 8472}, "has port 4789, not 8472;"),
        ({"local": "10.98.0.2"}, "has local address 10.98.0.1, not 10.98.0.2;"),
        ({"local": None}, "has local address 10.98.0.1, not any;"),
        ({"learning": True}, "has learning off, not on;"),
        ({"proxy": False}, "has proxy on, not off;"),
        ({"vni": 9, "proxy": False}, "has VNI 4097, not 9; proxy on, not off;"),
    ]
    for change, message in others:
        asked: dict[str, object] = {"vni": 4097, "local": "10.98.0.1", **change}
        with pytest.raises(AlreadyExists, match=f"vxlan meshvx0 .* {message} delete it"):
            kernel.links.ensure_vxlan(ns, "meshvx0", alias="meshctl:net1", **asked)
    with pytest.raises(AlreadyExists, match="meshvx0 .* has alias 'meshctl:net1', not no alias"):
        kernel.links.ensure_vxlan(ns, "meshvx0", 4097, local="10.98.0.1")
    assert link(kernel, ns, "meshvx0") == before


def test_one_vxlan_per_vni_and_port_in_a_namespace(kernel: KernelUnderTest) -> None:
    ns = kernel.new_ns("vxvni")
    kernel.links.ensure_vxlan(ns, "meshvx0", 4242, local="10.98.0.1")
    with pytest.raises(AlreadyExists):  # whatever the local address
        kernel.links.ensure_vxlan(ns, "meshvx1", 4242, local="10.98.0.9")
    kernel.links.ensure_vxlan(ns, "meshvx1", 4242, port=8472)  # another port is another socket
    kernel.links.ensure_vxlan(ns, "meshvx2", 4243, local="10.98.0.1")
    assert names(kernel.links.list_links(ns)) == ["lo", "meshvx0", "meshvx1", "meshvx2"]


def test_vxlan_mtu(kernel: KernelUnderTest) -> None:
    ns = kernel.new_ns("vxmtu")
    kernel.links.ensure_veth(ns, "under", "under-p", ns)
    kernel.links.ensure_vxlan(ns, "meshvx0", 4097, mtu=1450)
    kernel.links.ensure_vxlan(ns, "meshvx1", 4098, dev="under", mtu=1400)
    assert (link(kernel, ns, "meshvx0").mtu, link(kernel, ns, "meshvx1").mtu) == (1450, 1400)
    kernel.links.ensure_vxlan(ns, "meshvx0", 4097, mtu=1400)  # brought to the MTU asked
    kernel.links.ensure_vxlan(ns, "meshvx0", 4097)  # None: left as it is
    assert link(kernel, ns, "meshvx0").mtu == 1400
    # More than the underlay carries: the kernel would lower it without a word; refused.
    with pytest.raises(KernelError, match="MTU 1451 does not fit in under's MTU 1500") as big:
        kernel.links.ensure_vxlan(ns, "meshvx2", 4099, dev="under", mtu=1451)
    assert big.value.code == errno.EINVAL
    assert kernel.links.get_link(ns, "meshvx2") is None


def test_bridge_mtu_holds_against_a_larger_port(kernel: KernelUnderTest) -> None:
    """A bridge takes its smallest port's MTU unless its own was set: an overlay bridge keeps
    the MTU asked for when a 1500-byte port joins it."""
    ns = kernel.new_ns("brmtu")
    kernel.links.ensure_bridge(ns, "meshbr0", mtu=1450)
    kernel.links.ensure_veth(ns, "p1", "p2", ns)
    kernel.links.set_master(ns, "p1", "meshbr0")
    kernel.links.set_up(ns, "meshbr0")
    kernel.links.set_up(ns, "p1")
    assert (link(kernel, ns, "meshbr0").mtu, link(kernel, ns, "p1").mtu) == (1450, 1500)
    kernel.links.ensure_bridge(ns, "meshbr0", mtu=1400)
    assert link(kernel, ns, "meshbr0").mtu == 1400


def test_set_mac(kernel: KernelUnderTest) -> None:
    ns = kernel.new_ns("mac")
    kernel.links.ensure_veth(ns, "a", "b", ns)
    kernel.links.set_mac(ns, "a", "02:42:0A:4D:00:02")
    assert link(kernel, ns, "a").mac == "02:42:0a:4d:00:02"
    with pytest.raises(ValueError, match="'02:42:0a:4d:00' is not a MAC address"):
        kernel.links.set_mac(ns, "a", "02:42:0a:4d:00")
    for multicast in ("01:00:5e:00:00:01", "00:00:00:00:00:00"):
        with pytest.raises(KernelError) as refused:
            kernel.links.set_mac(ns, "a", multicast)
        assert refused.value.code == errno.EADDRNOTAVAIL
    assert link(kernel, ns, "a").mac == "02:42:0a:4d:00:02"


def test_mac_for_is_docker_s() -> None:
    assert mac_for("10.77.0.2") == "02:42:0a:4d:00:02"
    assert mac_for("192.168.255.1") == "02:42:c0:a8:ff:01"
    with pytest.raises(ValueError):
        mac_for("10.77.0.256")


def test_veth_with_a_peer_mac_and_an_mtu(kernel: KernelUnderTest) -> None:
    node, task = kernel.new_ns("node"), kernel.new_ns("task")
    mac = mac_for("10.77.0.2")
    kernel.links.ensure_veth(node, "meshv1", "eth0", task, peer_mac=mac, mtu=1450)
    kernel.links.ensure_veth(node, "meshv1", "eth0", task, peer_mac=mac, mtu=1450)
    node_end, task_end = link(kernel, node, "meshv1"), link(kernel, task, "eth0")
    assert (task_end.mac, task_end.mtu, node_end.mtu) == (mac, 1450, 1450)
    assert node_end.mac != mac
    # An existing pair is brought to the MAC and MTU asked; None leaves them.
    kernel.links.ensure_veth(node, "meshv1", "eth0", task, peer_mac=mac_for("10.77.0.3"), mtu=1400)
    kernel.links.ensure_veth(node, "meshv1", "eth0", task)
    task_end = link(kernel, task, "eth0")
    assert (task_end.mac, task_end.mtu) == (mac_for("10.77.0.3"), 1400)
    assert link(kernel, node, "meshv1").mtu == 1400
    with pytest.raises(KernelError) as refused:
        kernel.links.ensure_veth(node, "meshv2", "eth1", task, peer_mac="01:00:5e:00:00:01")
    assert refused.value.code == errno.EADDRNOTAVAIL
    assert kernel.links.get_link(node, "meshv2") is None
    assert kernel.links.get_link(task, "eth1") is None


def test_up_down_mtu_and_master(kernel: KernelUnderTest) -> None:
    ns = kernel.new_ns("state")
    kernel.links.ensure_bridge(ns, "meshbr0")
    kernel.links.ensure_veth(ns, "p1", "p2", ns)
    kernel.links.set_up(ns, "p1")
    kernel.links.set_mtu(ns, "p1", 1400)
    kernel.links.set_master(ns, "p1", "meshbr0")
    p1 = link(kernel, ns, "p1")
    assert (p1.up, p1.mtu, p1.master) == (True, 1400, "meshbr0")
    assert not link(kernel, ns, "p2").up
    kernel.links.set_down(ns, "p1")
    kernel.links.set_master(ns, "p1", None)
    p1 = link(kernel, ns, "p1")
    assert (p1.up, p1.master) == (False, None)
    kernel.links.set_master(ns, "p1", "meshbr0")
    kernel.links.delete_link(ns, "meshbr0")
    assert link(kernel, ns, "p1").master is None  # a deleted bridge releases its ports


def test_master_must_be_an_existing_bridge(kernel: KernelUnderTest) -> None:
    ns = kernel.new_ns("master")
    kernel.links.ensure_veth(ns, "p1", "p2", ns)
    with pytest.raises(NotFound, match="link nobr does not exist"):
        kernel.links.set_master(ns, "p1", "nobr")
    with pytest.raises(Unsupported):
        kernel.links.set_master(ns, "p1", "p2")


def test_verbs_on_a_missing_link_raise_not_found(kernel: KernelUnderTest) -> None:
    ns = kernel.new_ns("missing")
    for verb in (kernel.links.set_up, kernel.links.set_down):
        with pytest.raises(NotFound, match="link nope does not exist .*ensure it first"):
            verb(ns, "nope")
    with pytest.raises(NotFound):
        kernel.links.ensure_address(ns, "nope", "10.1.0.1/24")
    with pytest.raises(NotFound):
        kernel.links.set_mac(ns, "nope", "02:00:00:00:00:07")
    with pytest.raises(NotFound):
        kernel.links.ensure_route(ns, Route("10.2.0.0/24", ifname="nope"))
    assert kernel.links.get_link(ns, "nope") is None


def test_deleting_missing_things_is_a_no_op(kernel: KernelUnderTest) -> None:
    ns = kernel.new_ns("gone")
    kernel.links.ensure_veth(ns, "a", "b", ns)
    kernel.links.delete_link(ns, "nope")
    kernel.links.delete_address(ns, "a", "10.1.0.1/24")
    kernel.links.delete_address(ns, "nope", "10.1.0.1/24")
    kernel.links.delete_route(ns, Route("10.3.0.0/24", ifname="a"))
    kernel.links.delete_route(ns, Route("10.3.0.0/24", ifname="nope"))
    assert names(kernel.links.list_links(ns)) == ["lo", "b", "a"]  # the peer is made first


def test_a_missing_namespace_raises_not_found(kernel: KernelUnderTest) -> None:
    missing = kernel.new_ns("vanishing")
    kernel.netns.delete(missing)
    with pytest.raises(NotFound, match=f"namespace {missing} does not exist"):
        kernel.links.list_links(missing)
    with pytest.raises(NotFound):
        kernel.links.ensure_bridge(missing, "meshbr0")
    with pytest.raises(NotFound):
        kernel.links.ensure_veth(kernel.new_ns("here"), "v1", "v2", missing)
    assert not kernel.netns.exists(missing)  # and no verb created it


def test_addresses(kernel: KernelUnderTest) -> None:
    ns = kernel.new_ns("addr")
    kernel.links.ensure_veth(ns, "a", "b", ns)
    kernel.links.ensure_address(ns, "a", "10.10.0.1/24")
    kernel.links.ensure_address(ns, "a", "10.10.0.1/24")
    kernel.links.ensure_address(ns, "a", "10.11.0.1/16")
    kernel.links.ensure_address(ns, "b", "10.10.0.2/24")
    assert kernel.links.list_addresses(ns, "a") == [
        Address("a", "10.10.0.1/24"),
        Address("a", "10.11.0.1/16"),
    ]
    assert Address("b", "10.10.0.2/24") in kernel.links.list_addresses(ns)
    kernel.links.delete_address(ns, "a", "10.11.0.1/16")
    assert kernel.links.list_addresses(ns, "a") == [Address("a", "10.10.0.1/24")]
    kernel.links.delete_link(ns, "a")  # takes b and both addresses with it
    assert kernel.links.list_addresses(ns) == []


def cidrs_on(kernel: KernelUnderTest, ns: str, ifname: str) -> set[str]:
    return {a.cidr for a in kernel.links.list_addresses(ns, ifname)}


def test_batch_address_verbs_add_and_remove_many(kernel: KernelUnderTest) -> None:
    ns = kernel.new_ns("addrs")
    kernel.links.ensure_veth(ns, "a", "b", ns)
    kernel.links.ensure_address(ns, "a", "10.60.0.2/32")
    kernel.links.ensure_address(ns, "b", "10.60.0.9/32")
    vips = [f"10.60.0.{i}/32" for i in range(1, 6)]  # 10.60.0.2 is there already
    kernel.links.ensure_addresses(ns, "a", vips)
    assert cidrs_on(kernel, ns, "a") == set(vips)
    kernel.links.ensure_addresses(ns, "a", vips)  # all present: a no-op
    kernel.links.ensure_addresses(ns, "a", [])
    assert len(kernel.links.list_addresses(ns, "a")) == 5
    # 10.60.0.7 was never there, 10.60.0.9 lives on b: neither is an error, b keeps its own.
    kernel.links.delete_addresses(ns, "a", ["10.60.0.1/32", "10.60.0.7/32", "10.60.0.9/32"])
    kernel.links.delete_addresses(ns, "a", ["10.60.0.3/32", "10.60.0.4/32"])
    assert cidrs_on(kernel, ns, "a") == {"10.60.0.2/32", "10.60.0.5/32"}
    assert cidrs_on(kernel, ns, "b") == {"10.60.0.9/32"}
    kernel.links.delete_addresses(ns, "a", iter(vips))  # any iterable, gone or not
    assert cidrs_on(kernel, ns, "a") == set()


def vip_range(count: int, start: int = 0) -> list[str]:
    """count /32s in 10.66.0.0/16, from the start-th on."""
    return [f"10.66.{i // 256}.{i % 256}/32" for i in range(start, start + count)]


def test_batch_address_verbs_span_many_writes(kernel: KernelUnderTest) -> None:
    """More addresses than one write holds (BATCH_SIZE), some there before, some never."""
    ns = kernel.new_ns("addrsmany")
    kernel.links.ensure_veth(ns, "a", "b", ns)
    vips = vip_range(2500)
    for cidr in vips[::300]:  # present ones scattered over several writes
        kernel.links.ensure_address(ns, "a", cidr)
    kernel.links.ensure_address(ns, "b", vips[1000])  # the same address on another link
    kernel.links.ensure_addresses(ns, "a", vips)
    assert cidrs_on(kernel, ns, "a") == set(vips)
    kernel.links.ensure_addresses(ns, "a", vips)
    assert len(kernel.links.list_addresses(ns, "a")) == 2500
    # Every other address of the first 2000, and 600 that were never there.
    gone = vips[:2000:2] + vip_range(600, start=3000)
    kernel.links.delete_addresses(ns, "a", gone)
    assert cidrs_on(kernel, ns, "a") == set(vips[1:2000:2] + vips[2000:])
    assert cidrs_on(kernel, ns, "b") == {vips[1000]}
    kernel.links.delete_addresses(ns, "a", vips)
    assert cidrs_on(kernel, ns, "a") == set()


@pytest.mark.root
def test_batch_address_failure_names_its_address(netns_factory: NetnsFactory) -> None:
    """The kernel refuses one address deep in a large batch: the error names that address,
    the ones before it are made, and the batch without it then completes."""
    from kernel.links import Links

    links, ns = Links(), netns_factory("addrsfail")
    links.ensure_veth(ns, "a", "b", ns)
    vips = vip_range(700)
    bad = "ff02::5/128"  # IPv6 multicast: the kernel refuses it
    with pytest.raises(KernelError, match=f"add address {bad} to a in namespace {ns}: "):
        links.ensure_addresses(ns, "a", [*vips[:400], bad, *vips[400:]])
    assert set(vips[:400]) <= {a.cidr for a in links.list_addresses(ns, "a")}
    links.ensure_addresses(ns, "a", vips)
    assert {a.cidr for a in links.list_addresses(ns, "a")} == set(vips)


@pytest.mark.root
def test_batch_addresses_survive_dropped_acks(
    netns_factory: NetnsFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A receive buffer too small for a write's acks loses some (ENOBUFS): those writes are
    redone one request at a time, and the result is the same."""
    import kernel.netlink
    from kernel.links import Links

    monkeypatch.setattr(kernel.netlink, "RECEIVE_BUFFER", 4096)
    links, ns = Links(), netns_factory("addrsnobufs")
    links.ensure_veth(ns, "a", "b", ns)
    vips = vip_range(600)
    links.ensure_addresses(ns, "a", vips[::2])
    links.ensure_addresses(ns, "a", vips)
    assert {a.cidr for a in links.list_addresses(ns, "a")} == set(vips)
    links.delete_addresses(ns, "a", vips[:300])
    assert {a.cidr for a in links.list_addresses(ns, "a")} == set(vips[300:])


def test_batch_address_verbs_on_a_missing_link(kernel: KernelUnderTest) -> None:
    ns = kernel.new_ns("addrsgone")
    with pytest.raises(NotFound, match="link nope does not exist .*ensure it first"):
        kernel.links.ensure_addresses(ns, "nope", ["10.61.0.1/32", "10.61.0.2/32"])
    kernel.links.delete_addresses(ns, "nope", ["10.61.0.1/32"])  # gone with its link
    assert kernel.links.list_addresses(ns) == []


def test_batch_address_verbs_reject_a_bad_cidr_before_adding_any(kernel: KernelUnderTest) -> None:
    ns = kernel.new_ns("addrsbad")
    kernel.links.ensure_veth(ns, "a", "b", ns)
    with pytest.raises(ValueError, match="10.62.0.300"):
        kernel.links.ensure_addresses(ns, "a", ["10.62.0.1/32", "10.62.0.300/32"])
    assert kernel.links.list_addresses(ns, "a") == []


def test_losing_the_last_address_in_a_batch_drops_routes(kernel: KernelUnderTest) -> None:
    ns = kernel.new_ns("addrsroute")
    up_pair(kernel, ns, "10.63.0.1/24")
    kernel.links.ensure_addresses(ns, "a", ["10.64.0.1/24"])
    kernel.links.ensure_route(ns, Route("default", gateway="10.63.0.254"))
    kernel.links.delete_addresses(ns, "a", ["10.64.0.1/24"])  # the gateway's subnet stays
    assert kernel.links.list_routes(ns) == [Route("default", "10.63.0.254", "a")]
    kernel.links.delete_addresses(ns, "a", ["10.63.0.1/24"])
    assert kernel.links.list_routes(ns) == []


@pytest.mark.root
def test_batch_addresses_answer_on_the_wire(netns_factory: NetnsFactory) -> None:
    from kernel.links import Links

    links = Links()
    lb, client = netns_factory("lbleg"), netns_factory("client")
    links.ensure_veth(client, "eth0", "leg0", lb)
    links.ensure_address(client, "eth0", "10.65.0.1/24")
    links.ensure_addresses(lb, "leg0", ["10.65.0.2/24", "10.65.1.7/32", "10.65.1.8/32"])
    for ns, dev in ((client, "eth0"), (lb, "leg0")):
        links.set_up(ns, dev)
    links.ensure_route(client, Route("10.65.1.0/24", gateway="10.65.0.2"))
    assert udp_round_trip(client, lb, "10.65.1.7") == b"pong:ping"
    links.delete_addresses(lb, "leg0", ["10.65.1.7/32"])
    with pytest.raises(OSError):  # the VIP is gone: lb cannot even bind it now
        udp_round_trip(client, lb, "10.65.1.7", timeout=1)
    assert udp_round_trip(client, lb, "10.65.1.8") == b"pong:ping"


def test_routes_via_gateway_and_via_device(kernel: KernelUnderTest) -> None:
    ns = kernel.new_ns("route")
    up_pair(kernel, ns, "10.20.0.1/24")
    kernel.links.ensure_route(ns, Route("default", gateway="10.20.0.254"))
    kernel.links.ensure_route(ns, Route("default", gateway="10.20.0.254"))
    kernel.links.ensure_route(ns, Route("10.30.0.0/16", ifname="a"))
    # Connected routes follow addresses and are not listed; the gateway's device is.
    assert kernel.links.list_routes(ns) == [
        Route("default", "10.20.0.254", "a"),
        Route("10.30.0.0/16", None, "a"),
    ]
    kernel.links.ensure_route(ns, Route("default", gateway="10.20.0.253"))  # replaces
    kernel.links.delete_route(ns, Route("10.30.0.0/16", gateway="10.20.0.9"))  # not this one
    assert kernel.links.list_routes(ns) == [
        Route("default", "10.20.0.253", "a"),
        Route("10.30.0.0/16", None, "a"),
    ]
    kernel.links.delete_route(ns, Route("default"))
    kernel.links.delete_route(ns, Route("10.30.0.0/16", ifname="a"))
    assert kernel.links.list_routes(ns) == []


def test_a_route_needs_an_up_device_and_a_reachable_gateway(kernel: KernelUnderTest) -> None:
    ns = kernel.new_ns("noroute")
    kernel.links.ensure_veth(ns, "a", "b", ns)
    kernel.links.ensure_address(ns, "a", "10.20.0.1/24")
    with pytest.raises(KernelError, match="is the device up") as down:
        kernel.links.ensure_route(ns, Route("10.30.0.0/16", ifname="a"))
    assert down.value.code == 100  # ENETDOWN
    kernel.links.set_up(ns, "a")
    with pytest.raises(KernelError) as unreachable:
        kernel.links.ensure_route(ns, Route("default", gateway="10.99.0.1"))
    assert unreachable.value.code == 101  # ENETUNREACH
    assert kernel.links.list_routes(ns) == []


def test_routes_go_when_their_device_goes_down_or_loses_its_address(
    kernel: KernelUnderTest,
) -> None:
    ns = kernel.new_ns("flush")
    up_pair(kernel, ns, "10.20.0.1/24")
    kernel.links.ensure_route(ns, Route("default", gateway="10.20.0.254"))
    kernel.links.set_down(ns, "a")
    assert kernel.links.list_routes(ns) == []
    kernel.links.set_up(ns, "a")
    kernel.links.ensure_route(ns, Route("10.30.0.0/16", ifname="a"))
    kernel.links.delete_address(ns, "a", "10.20.0.1/24")
    assert kernel.links.list_routes(ns) == []


# Real packets, real kernel only.


def udp_round_trip(src_ns: str, dst_ns: str, dst_ip: str, timeout: float = 5.0) -> bytes:
    """Send a datagram from src_ns to dst_ip in dst_ns and return the echoed reply."""
    # A socket keeps the namespace it was made in, so make each inside its namespace.
    server = netns.run_in(dst_ns, socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
    client = netns.run_in(src_ns, socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
    with server, client:
        server.bind((dst_ip, 9999))
        server.settimeout(scaled(timeout))
        client.settimeout(scaled(timeout))
        client.sendto(b"ping", (dst_ip, 9999))
        data, peer = server.recvfrom(64)
        server.sendto(b"pong:" + data, peer)
        reply, _ = client.recvfrom(64)
        return reply


@pytest.mark.root
def test_packets_cross_a_veth_pair(netns_factory: NetnsFactory) -> None:
    from kernel.links import Links

    links = Links()
    left, right = netns_factory("left"), netns_factory("right")
    links.ensure_veth(left, "meshv1", "eth0", right)
    for ns, dev, cidr in ((left, "meshv1", "10.40.0.1/24"), (right, "eth0", "10.40.0.2/24")):
        links.ensure_address(ns, dev, cidr)
        links.set_up(ns, dev)
    assert udp_round_trip(left, right, "10.40.0.2") == b"pong:ping"
    links.set_down(right, "eth0")
    with pytest.raises(OSError):  # timeout (or unreachable): the link is really down
        udp_round_trip(left, right, "10.40.0.2", timeout=1)


@pytest.mark.root
def test_packets_cross_a_bridge_between_two_veths(netns_factory: NetnsFactory) -> None:
    from kernel.links import Links

    links = Links()
    node = netns_factory("node")
    t1, t2 = netns_factory("t1"), netns_factory("t2")
    links.ensure_bridge(node, "meshbr0")
    links.set_up(node, "meshbr0")
    for i, task in enumerate((t1, t2), start=1):
        links.ensure_veth(node, f"meshv{i}", "eth0", task)
        links.set_master(node, f"meshv{i}", "meshbr0")
        links.set_up(node, f"meshv{i}")
        links.ensure_address(task, "eth0", f"10.50.0.{i}/24")
        links.set_up(task, "eth0")
    assert udp_round_trip(t1, t2, "10.50.0.2") == b"pong:ping"
    assert udp_round_trip(t2, t1, "10.50.0.1") == b"pong:ping"
    links.set_master(node, "meshv2", None)  # off the bridge: t2 is cut off
    with pytest.raises(OSError):
        udp_round_trip(t1, t2, "10.50.0.2", timeout=1)


def test_read_namespace_is_the_three_lists_in_one_visit(kernel: KernelUnderTest) -> None:
    ns = kernel.new_ns("readns")
    up_pair(kernel, ns, "10.21.0.1/24")
    kernel.links.ensure_addresses(ns, "b", ["10.22.0.1/24"])
    kernel.links.ensure_route(ns, Route("default", gateway="10.21.0.254"))
    kernel.links.ensure_route(ns, Route("10.31.0.0/16", ifname="a"))
    found = kernel.links.read_namespace(ns)
    assert found.links == kernel.links.list_links(ns)
    assert found.addresses == kernel.links.list_addresses(ns)
    assert found.routes == kernel.links.list_routes(ns)
    assert sorted(a.cidr for a in found.addresses) == ["10.21.0.1/24", "10.22.0.1/24"]
    assert [r.dst for r in found.routes] == ["default", "10.31.0.0/16"]
    assert kernel.links.read_namespace(ns, routes=False) == replace(found, routes=[])
