"""Reading the overlay devices of a node: their entries are read only when not known."""

from __future__ import annotations

from dataclasses import replace

from kernel.links import mac_for
from kernel.neighbours import FdbEntry, Neighbour
from kernel.system import fake_kernel
from meshctl.overlay.vxlan import Peer, observe_overlays

MARK = "meshctl:overlay"


def test_entries_are_read_unless_known_since_the_last_full_observe() -> None:
    kernel = fake_kernel()
    kernel.links.ensure_vxlan(None, "meshvx1", 4097, local="10.99.0.11", alias=MARK)
    peer = Peer("10.70.0.5", mac_for("10.70.0.5"), "10.99.0.12")
    kernel.neighbours.ensure_neighbour(None, Neighbour("meshvx1", peer.address, peer.mac))
    kernel.neighbours.ensure_fdb(None, FdbEntry("meshvx1", peer.mac, peer.vtep))
    (device,) = [link for link in kernel.links.list_links(None) if link.vxlan is not None]

    (read,) = observe_overlays(kernel, [device]).values()
    assert (read.vni, read.local, read.mark, read.peers) == (
        4097, "10.99.0.11", MARK, frozenset({peer})
    )  # fmt: skip
    believed = replace(read, peers=frozenset())
    (trusted,) = observe_overlays(kernel, [device], {"meshvx1": believed}).values()
    assert trusted.peers == frozenset()  # taken as known, unread
    assert (trusted.vni, trusted.up) == (read.vni, read.up)  # the device itself is always read
