"""kernel.neighbours against the fake and the real kernel: permanent neighbour entries and
VXLAN FDB entries, one at a time and in batches, on the devices an overlay writes them on.

The last tests add entries meshctl does not make (learnt, the bridge's, the default
destination) with iproute2, on the real kernel only, and check that none is listed as ours.
"""

from __future__ import annotations

import subprocess

import pytest

from kernel.errors import KernelError, NotFound
from kernel.links import mac_for
from kernel.neighbours import FdbEntry, Neighbour
from tests.conformance.conftest import KernelUnderTest
from tests.conftest import NetnsFactory


def vxlan_up(kernel: KernelUnderTest, tag: str, name: str = "meshvx0", vni: int = 4242) -> str:
    """A namespace with an up overlay vxlan device: what neighbour entries are written on."""
    ns = kernel.new_ns(tag)
    kernel.links.ensure_vxlan(ns, name, vni, local="10.98.0.1")
    kernel.links.set_up(ns, name)
    return ns


def peers(count: int, ifname: str = "meshvx0", start: int = 2) -> list[Neighbour]:
    """count remote endpoints of 10.77.0.0/16 as neighbour entries, MACs as Docker derives."""
    ips = [f"10.77.{i >> 8}.{i & 0xFF}" for i in range(start, start + count)]
    return [Neighbour(ifname, ip, mac_for(ip)) for ip in ips]


def fdb_of(neighbours: list[Neighbour], dst: str) -> list[FdbEntry]:
    return [FdbEntry(n.ifname, n.mac, dst) for n in neighbours]


def test_neighbours(kernel: KernelUnderTest) -> None:
    ns = kernel.new_ns("neigh")
    kernel.links.ensure_veth(ns, "a", "b", ns)
    entry = Neighbour("a", "10.20.0.7", "02:00:0a:14:00:07")
    kernel.neighbours.ensure_neighbour(ns, entry)
    kernel.neighbours.ensure_neighbour(ns, entry)
    kernel.neighbours.ensure_neighbour(ns, Neighbour("b", "10.20.0.8", "02:00:0A:14:00:08"))
    assert kernel.neighbours.list_neighbours(ns, "a") == [entry]
    moved = Neighbour("a", "10.20.0.7", "02:00:0a:14:00:99")
    kernel.neighbours.ensure_neighbour(ns, moved)  # a new MAC replaces the old one
    assert kernel.neighbours.list_neighbours(ns, "a") == [moved]
    kernel.neighbours.delete_neighbour(ns, moved)
    assert kernel.neighbours.list_neighbours(ns, "a") == []
    # Listed as the kernel spells it: MAC in lower case.
    assert kernel.neighbours.list_neighbours(ns) == [
        Neighbour("b", "10.20.0.8", "02:00:0a:14:00:08")
    ]


def test_neighbours_on_a_vxlan_device_in_batches(kernel: KernelUnderTest) -> None:
    """More entries than one write holds (BATCH_SIZE), some there before, listed in order."""
    ns = vxlan_up(kernel, "neighvx")
    wanted = peers(700)
    kernel.neighbours.ensure_neighbours(ns, wanted[::100])
    kernel.neighbours.ensure_neighbours(ns, reversed(wanted))
    kernel.neighbours.ensure_neighbours(ns, wanted)
    assert kernel.neighbours.list_neighbours(ns, "meshvx0") == wanted
    gone = wanted[:400:2] + peers(50, start=5000)  # half of some, and ones never there
    kernel.neighbours.delete_neighbours(ns, gone)
    assert kernel.neighbours.list_neighbours(ns) == wanted[1:400:2] + wanted[400:]
    kernel.neighbours.delete_neighbours(ns, wanted)
    assert kernel.neighbours.list_neighbours(ns) == []
    kernel.neighbours.ensure_neighbours(ns, [])
    kernel.neighbours.delete_neighbours(ns, [])


def test_neighbour_verbs_check_every_entry_first(kernel: KernelUnderTest) -> None:
    ns = vxlan_up(kernel, "neighbad")
    good = peers(3)
    with pytest.raises(ValueError, match="10.77.0.300"):
        kernel.neighbours.ensure_neighbours(
            ns, [*good, Neighbour("meshvx0", "10.77.0.300", good[0].mac)]
        )
    with pytest.raises(ValueError, match="not a MAC address"):
        kernel.neighbours.ensure_neighbours(ns, [*good, Neighbour("meshvx0", "10.77.0.9", "02:42")])
    with pytest.raises(NotFound, match="link nope does not exist"):
        kernel.neighbours.ensure_neighbours(ns, [*good, *peers(1, ifname="nope")])
    assert kernel.neighbours.list_neighbours(ns) == []
    kernel.neighbours.ensure_neighbours(ns, good)
    kernel.neighbours.delete_neighbours(ns, peers(3, ifname="nope"))  # gone with their link
    assert kernel.neighbours.list_neighbours(ns) == good


def test_neighbours_go_when_their_device_goes_down_or_changes_mac(kernel: KernelUnderTest) -> None:
    """The kernel flushes a device's neighbours, permanent ones too, when it goes down or is
    given a MAC (even its own); not on an MTU change or when it joins a bridge."""
    ns = vxlan_up(kernel, "neighflush")
    kernel.links.ensure_bridge(ns, "meshbr0")
    entries = peers(3)
    kernel.neighbours.ensure_neighbours(ns, entries)
    kernel.links.set_mtu(ns, "meshvx0", 1400)
    kernel.links.set_master(ns, "meshvx0", "meshbr0")
    assert kernel.neighbours.list_neighbours(ns) == entries
    kernel.links.set_down(ns, "meshvx0")
    assert kernel.neighbours.list_neighbours(ns) == []
    kernel.neighbours.ensure_neighbours(ns, entries)  # written while down: they stay
    kernel.links.set_up(ns, "meshvx0")
    assert kernel.neighbours.list_neighbours(ns) == entries
    own = kernel.links.get_link(ns, "meshvx0")
    assert own is not None
    kernel.links.set_mac(ns, "meshvx0", own.mac)
    assert kernel.neighbours.list_neighbours(ns) == []


def test_fdb_entries(kernel: KernelUnderTest) -> None:
    ns = vxlan_up(kernel, "fdb")
    entry = FdbEntry("meshvx0", mac_for("10.77.0.2"), "10.98.0.2")
    kernel.neighbours.ensure_fdb(ns, entry)
    kernel.neighbours.ensure_fdb(ns, entry)
    assert kernel.neighbours.list_fdb(ns, "meshvx0") == [entry]
    moved = FdbEntry("meshvx0", entry.mac, "10.98.0.3")  # the endpoint moved to another node
    kernel.neighbours.ensure_fdb(ns, moved)
    assert kernel.neighbours.list_fdb(ns, "meshvx0") == [moved]
    kernel.neighbours.delete_fdb(ns, entry)  # the entry to the old node: gone already
    assert kernel.neighbours.list_fdb(ns, "meshvx0") == [moved]
    kernel.neighbours.delete_fdb(ns, moved)
    kernel.neighbours.delete_fdb(ns, moved)
    assert kernel.neighbours.list_fdb(ns, "meshvx0") == []
    upper = FdbEntry("meshvx0", "02:42:0A:4D:00:09", "10.98.0.2")
    kernel.neighbours.ensure_fdb(ns, upper)
    assert kernel.neighbours.list_fdb(ns, "meshvx0") == [
        FdbEntry("meshvx0", "02:42:0a:4d:00:09", "10.98.0.2")
    ]


def test_fdb_entries_in_batches(kernel: KernelUnderTest) -> None:
    ns = vxlan_up(kernel, "fdbmany")
    kernel.links.ensure_vxlan(ns, "meshvx1", 4243, local="10.98.0.1")
    endpoints = peers(1000)
    wanted = fdb_of(endpoints[:500], "10.98.0.2") + fdb_of(endpoints[500:], "10.98.0.3")
    other = fdb_of(peers(5, ifname="meshvx1"), "10.98.0.2")
    kernel.neighbours.ensure_fdb_entries(ns, wanted[::97] + other)
    kernel.neighbours.ensure_fdb_entries(ns, wanted)
    kernel.neighbours.ensure_fdb_entries(ns, wanted)
    assert kernel.neighbours.list_fdb(ns, "meshvx0") == sorted(wanted, key=lambda e: e.mac)
    gone = wanted[:600:2] + fdb_of(peers(50, start=5000), "10.98.0.2")
    kernel.neighbours.delete_fdb_entries(ns, gone)
    left = wanted[1:600:2] + wanted[600:]
    assert kernel.neighbours.list_fdb(ns, "meshvx0") == sorted(left, key=lambda e: e.mac)
    kernel.neighbours.delete_fdb_entries(ns, wanted)
    assert kernel.neighbours.list_fdb(ns, "meshvx0") == []
    assert kernel.neighbours.list_fdb(ns, "meshvx1") == other


def test_fdb_verbs_check_every_entry_first(kernel: KernelUnderTest) -> None:
    ns = vxlan_up(kernel, "fdbbad")
    kernel.links.ensure_veth(ns, "a", "b", ns)
    good = fdb_of(peers(3), "10.98.0.2")
    bad = [
        (FdbEntry("meshvx0", "00:00:00:00:00:00", "10.98.0.2"), ValueError, "not a unicast MAC"),
        (FdbEntry("meshvx0", "33:33:00:00:00:01", "10.98.0.2"), ValueError, "not a unicast MAC"),
        (FdbEntry("meshvx0", "02:42:0a", "10.98.0.2"), ValueError, "not a MAC address"),
        (FdbEntry("meshvx0", good[0].mac, "10.98.0"), ValueError, "10.98.0"),
        (FdbEntry("nope", good[0].mac, "10.98.0.2"), NotFound, "link nope does not exist"),
        (FdbEntry("a", good[0].mac, "10.98.0.2"), KernelError, "need a vxlan device; a in .* veth"),
    ]
    for entry, error, message in bad:
        with pytest.raises(error, match=message):
            kernel.neighbours.ensure_fdb_entries(ns, [*good, entry])
    assert kernel.neighbours.list_fdb(ns, "meshvx0") == []
    assert kernel.neighbours.list_fdb(ns, "nope") == []
    kernel.neighbours.ensure_fdb_entries(ns, good)
    # Deletes of entries on a missing link or a veth find nothing of ours: no-ops.
    kernel.neighbours.delete_fdb_entries(ns, [FdbEntry("nope", good[0].mac, "10.98.0.2")])
    kernel.neighbours.delete_fdb(ns, FdbEntry("a", good[0].mac, "10.98.0.2"))
    assert kernel.neighbours.list_fdb(ns, "meshvx0") == good


def test_fdb_entries_outlive_down_and_go_with_their_device(kernel: KernelUnderTest) -> None:
    ns = vxlan_up(kernel, "fdblife")
    entries = fdb_of(peers(3), "10.98.0.2")
    kernel.neighbours.ensure_fdb_entries(ns, entries)
    kernel.neighbours.ensure_neighbours(ns, peers(3))
    kernel.links.set_down(ns, "meshvx0")
    assert kernel.neighbours.list_fdb(ns, "meshvx0") == entries
    kernel.links.delete_link(ns, "meshvx0")
    kernel.links.ensure_vxlan(ns, "meshvx0", 4242, local="10.98.0.1")
    assert kernel.neighbours.list_fdb(ns, "meshvx0") == []
    assert kernel.neighbours.list_neighbours(ns) == []


# Entries meshctl does not make, real kernel only.


def run_in(ns: str, *cmd: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, *cmd], check=True, capture_output=True)


@pytest.mark.root
def test_only_our_fdb_entries_are_listed(netns_factory: NetnsFactory) -> None:
    """The bridge's entries for the port, a learnt (dynamic) entry, the default destination
    (all zeros, which floods) and the multicast addresses the device joined are not ours."""
    from kernel.links import Links
    from kernel.neighbours import Neighbours

    links, neighbours, ns = Links(), Neighbours(), netns_factory("fdbforeign")
    links.ensure_bridge(ns, "meshbr0")
    links.ensure_vxlan(ns, "meshvx0", 4242, local="10.98.0.1")
    links.set_master(ns, "meshvx0", "meshbr0")
    for dev in ("meshbr0", "meshvx0"):
        links.set_up(ns, dev)
    ours = FdbEntry("meshvx0", mac_for("10.77.0.2"), "10.98.0.2")
    neighbours.ensure_fdb(ns, ours)
    fdb = ("bridge", "fdb")
    run_in(
        ns,
        *fdb,
        "add",
        "02:42:0a:4d:00:03",
        "dev",
        "meshvx0",
        "self",
        "dynamic",
        "dst",
        "10.98.0.3",
    )
    run_in(
        ns,
        *fdb,
        "append",
        "00:00:00:00:00:00",
        "dev",
        "meshvx0",
        "self",
        "permanent",
        "dst",
        "10.98.0.4",
    )
    run_in(ns, *fdb, "add", "02:42:0a:4d:00:05", "dev", "meshvx0", "master", "static")
    shown = subprocess.run(["ip", "netns", "exec", ns, "bridge", "fdb", "show", "dev", "meshvx0"],
                           capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert len(shown.splitlines()) >= 5  # ours, the three above and the bridge's own entry
    assert neighbours.list_fdb(ns, "meshvx0") == [ours]
    neighbours.delete_fdb(ns, ours)
    assert neighbours.list_fdb(ns, "meshvx0") == []
    assert "00:00:00:00:00:00 dst 10.98.0.4" in subprocess.run(
        ["ip", "netns", "exec", ns, "bridge", "fdb", "show", "dev", "meshvx0"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip


@pytest.mark.root
def test_only_permanent_neighbours_are_listed(netns_factory: NetnsFactory) -> None:
    from kernel.links import Links
    from kernel.neighbours import Neighbours

    links, neighbours, ns = Links(), Neighbours(), netns_factory("neighforeign")
    links.ensure_vxlan(ns, "meshvx0", 4242, local="10.98.0.1")
    links.set_up(ns, "meshvx0")
    ours = Neighbour("meshvx0", "10.77.0.2", mac_for("10.77.0.2"))
    neighbours.ensure_neighbour(ns, ours)
    for ip, state in (("10.77.0.3", "reachable"), ("10.77.0.4", "stale"), ("10.77.0.5", "noarp")):
        run_in(ns, "ip", "neigh", "add", ip, "lladdr", mac_for(ip), "dev", "meshvx0", "nud", state)
    assert neighbours.list_neighbours(ns) == [ours]
    # An ensure makes a learnt entry ours.
    learnt = Neighbour("meshvx0", "10.77.0.3", mac_for("10.77.0.3"))
    neighbours.ensure_neighbour(ns, learnt)
    assert neighbours.list_neighbours(ns) == [ours, learnt]
