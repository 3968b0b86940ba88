"""Permanent neighbour (ARP) entries and VXLAN FDB entries, per namespace, over netlink.

An overlay node writes two static entries per remote endpoint on its VXLAN device, as
libnetwork's peerdb and flannel do: a neighbour entry (the endpoint's IPv4 address → its MAC),
from which the device's proxy answers ARP, and an FDB entry (that MAC → the remote node's
underlay address), which says where the device sends the frame. Both are RTM_NEWNEIGH requests
(AF_INET; AF_BRIDGE with NTF_SELF, the device's own table rather than its bridge's); a network
holds hundreds, so the batch verbs send them through kernel.netlink.NetlinkBatch, encoded from
templates. Only permanent entries are listed: what the kernel learns or makes itself is not ours.

Taking a device down or changing its MAC flushes its neighbour entries, permanent ones too
(FDB entries stay): write them while the device is up.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Hashable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, cast

from pyroute2 import IPRoute
from pyroute2.netlink.rtnl import RTM_DELNEIGH, RTM_NEWNEIGH
from pyroute2.netlink.rtnl.ndmsg import ndmsg

from kernel.errors import KernelError, calling, deleting, ensuring
from kernel.links import (
    find_link,
    in_namespace,
    link_names,
    mac_text,
    missing_link,
    unicast_mac,
    where,
)
from kernel.netlink import (
    DELETE_FLAGS,
    REPLACE_FLAGS,
    NetlinkBatch,
    Templates,
    address_field,
    judged,
    mac_field,
)
from kernel.netns import Namespace

NUD_NOARP = 0x40
NUD_PERMANENT = 0x80
NTF_SELF = 0x02  # an FDB entry of the device itself, not of the bridge it is a port of
FDB_STATE = NUD_PERMANENT | NUD_NOARP  # `bridge fdb add ... permanent`
AF_INET, AF_BRIDGE = socket.AF_INET, socket.AF_BRIDGE
NEIGHBOUR = ("NDA_DST", "NDA_LLADDR")  # the attributes of a neighbour request, in order
FDB = ("NDA_LLADDR", "NDA_DST")  # of an FDB request


@dataclass(frozen=True)
class Neighbour:
    """A permanent ARP entry: address is reached at mac through ifname."""

    ifname: str
    address: str
    mac: str


@dataclass(frozen=True)
class FdbEntry:
    """A static VXLAN forwarding entry: frames for mac leaving ifname (a vxlan device) go to
    the VTEP at dst (the underlay address of the node that has mac)."""

    ifname: str
    mac: str
    dst: str


class NeighboursAPI(Protocol):
    """What meshctl asks of the neighbour tables; kernel.fake.neighbours implements it too.

    The batch verbs check every entry before sending any (ValueError) and need every link of
    an ensure to exist (NotFound); deletes skip entries whose link is gone.
    """

    def ensure_neighbour(self, ns: Namespace, neighbour: Neighbour) -> None: ...
    def delete_neighbour(self, ns: Namespace, neighbour: Neighbour) -> None: ...
    def ensure_neighbours(self, ns: Namespace, neighbours: Iterable[Neighbour]) -> None: ...
    def delete_neighbours(self, ns: Namespace, neighbours: Iterable[Neighbour]) -> None: ...
    def list_neighbours(self, ns: Namespace, ifname: str | None = None) -> list[Neighbour]: ...
    def ensure_fdb(self, ns: Namespace, entry: FdbEntry) -> None: ...
    def delete_fdb(self, ns: Namespace, entry: FdbEntry) -> None: ...
    def ensure_fdb_entries(self, ns: Namespace, entries: Iterable[FdbEntry]) -> None: ...
    def delete_fdb_entries(self, ns: Namespace, entries: Iterable[FdbEntry]) -> None: ...
    def list_fdb(self, ns: Namespace, ifname: str) -> list[FdbEntry]: ...


def checked_neighbour(neighbour: Neighbour) -> Neighbour:
    """neighbour as the kernel lists it; ValueError for a bad address or MAC."""
    address = str(ipaddress.IPv4Address(neighbour.address))
    return Neighbour(neighbour.ifname, address, mac_text(neighbour.mac))


def checked_fdb(entry: FdbEntry) -> FdbEntry:
    """entry as the kernel lists it; ValueError for a bad dst, or a MAC that is not one
    endpoint's (multicast, or all zeros: the default destination, which floods)."""
    mac = mac_text(entry.mac)
    if not unicast_mac(mac):
        raise ValueError(f"FDB entry for {mac}: not a unicast MAC (an endpoint's, as 02:42:...)")
    return FdbEntry(entry.ifname, mac, str(ipaddress.IPv4Address(entry.dst)))


def neighbour_order(neighbour: Neighbour) -> tuple[str, int]:
    """How list_neighbours sorts (the kernel dumps in hash order)."""
    return neighbour.ifname, int(ipaddress.IPv4Address(neighbour.address))


def fdb_order(entry: FdbEntry) -> tuple[str, str, int]:
    """How list_fdb sorts (the kernel dumps in hash order)."""
    return entry.ifname, entry.mac, int(ipaddress.IPv4Address(entry.dst))


def not_vxlan(ns: Namespace, ifname: str, kind: str | None) -> KernelError:
    """The error for an FDB entry on a link that is not a vxlan (the kernel would take it on
    a veth, drop the dst and make it a unicast filter address: not what was asked)."""
    return KernelError(
        f"FDB entries with a destination need a vxlan device; {ifname} in {where(ns)} is a "
        f"{kind or 'device'}"
    )


def _request(shape: Hashable, values: tuple[Any, ...]) -> bytes:
    """The RTM_*NEIGH request pyroute2's neigh() would make; shape is (message type, flags,
    family, link index, state, NTF flags, attribute names), values the attributes' values."""
    kind, flags, family, index, state, ntf, names = cast(
        tuple[int, int, int, int, int, int, tuple[str, ...]], shape
    )
    msg = ndmsg()
    msg["family"] = family
    msg["ifindex"] = index
    msg["state"] = state
    msg["flags"] = ntf
    msg["attrs"] = list(zip(names, values, strict=True))
    msg["header"]["type"] = kind
    msg["header"]["flags"] = flags
    msg.encode()
    return bytes(msg.data)


def _indexes(
    ipr: IPRoute, ns: Namespace, names: Iterable[str], *, ensure: bool, vxlan: bool
) -> dict[str, int]:
    """Link name → index for names (with vxlan, only vxlan links count). An ensure needs every
    one (NotFound, or not_vxlan); a delete leaves the others out: no entry of ours is there."""
    out = {}
    for name in sorted(set(names)):
        found = find_link(ipr, name)
        kind = None if found is None else found.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND")
        if found is not None and (kind == "vxlan" or not vxlan):
            out[name] = found["index"]
        elif ensure:
            raise missing_link(ns, name) if found is None else not_vxlan(ns, name, kind)
    return out


Entry = TypeVar("Entry", Neighbour, FdbEntry)
Request = Callable[[Templates, int, Entry], bytes]  # (templates, link index, entry) → request
Guard = Callable[[Entry], AbstractContextManager[None]]  # ensuring/deleting(what) for an entry


class Neighbours:
    """The real neighbour tables (RTM_NEWNEIGH over NetlinkBatch); see NeighboursAPI."""

    def ensure_neighbour(self, ns: Namespace, neighbour: Neighbour) -> None:
        self.ensure_neighbours(ns, [neighbour])

    def delete_neighbour(self, ns: Namespace, neighbour: Neighbour) -> None:
        self.delete_neighbours(ns, [neighbour])

    def ensure_neighbours(self, ns: Namespace, neighbours: Iterable[Neighbour]) -> None:
        """Each address permanent at its MAC on its link (replacing another MAC or a learnt
        entry)."""

        def request(templates: Templates, index: int, n: Neighbour) -> bytes:
            shape = (RTM_NEWNEIGH, REPLACE_FLAGS, AF_INET, index, NUD_PERMANENT, 0, NEIGHBOUR)
            return templates.request(shape, (address_field(n.address), mac_field(n.mac)))

        def guard(n: Neighbour) -> AbstractContextManager[None]:
            return ensuring(
                f"add neighbour {n.address} lladdr {n.mac} on {n.ifname} in {where(ns)}"
            )

        wanted = [checked_neighbour(n) for n in neighbours]
        self._apply(ns, wanted, request, guard, ensure=True, vxlan=False)

    def delete_neighbours(self, ns: Namespace, neighbours: Iterable[Neighbour]) -> None:
        """No entry left for each address on its link, whatever its MAC."""

        def request(templates: Templates, index: int, n: Neighbour) -> bytes:
            shape = (RTM_DELNEIGH, DELETE_FLAGS, AF_INET, index, 0, 0, NEIGHBOUR[:1])
            return templates.request(shape, (address_field(n.address),))

        def guard(n: Neighbour) -> AbstractContextManager[None]:
            return deleting(f"delete neighbour {n.address} on {n.ifname} in {where(ns)}")

        unwanted = [checked_neighbour(n) for n in neighbours]
        self._apply(ns, unwanted, request, guard, ensure=False, vxlan=False)

    def list_neighbours(self, ns: Namespace, ifname: str | None = None) -> list[Neighbour]:
        """The permanent IPv4 neighbours (learnt ones come and go: not listed), in order."""

        def body(ipr: IPRoute) -> list[Neighbour]:
            names = link_names(ipr)
            with calling(f"list neighbours in {where(ns)}"):
                msgs = list(ipr.get_neighbours(family=AF_INET))
            out = []
            for m in msgs:
                name, mac = names.get(m["ifindex"], ""), m.get_attr("NDA_LLADDR")
                if m["state"] & NUD_PERMANENT and mac and ifname in (None, name):
                    out.append(Neighbour(name, m.get_attr("NDA_DST"), mac))
            return sorted(out, key=neighbour_order)

        return in_namespace(ns, body)

    def ensure_fdb(self, ns: Namespace, entry: FdbEntry) -> None:
        self.ensure_fdb_entries(ns, [entry])

    def delete_fdb(self, ns: Namespace, entry: FdbEntry) -> None:
        self.delete_fdb_entries(ns, [entry])

    def ensure_fdb_entries(self, ns: Namespace, entries: Iterable[FdbEntry]) -> None:
        """Each MAC sent to its dst by its vxlan link (replacing another dst)."""

        def request(templates: Templates, index: int, e: FdbEntry) -> bytes:
            shape = (RTM_NEWNEIGH, REPLACE_FLAGS, AF_BRIDGE, index, FDB_STATE, NTF_SELF, FDB)
            return templates.request(shape, (mac_field(e.mac), address_field(e.dst)))

        def guard(e: FdbEntry) -> AbstractContextManager[None]:
            return ensuring(f"add FDB entry {e.mac} dst {e.dst} on {e.ifname} in {where(ns)}")

        wanted = [checked_fdb(e) for e in entries]
        self._apply(ns, wanted, request, guard, ensure=True, vxlan=True)

    def delete_fdb_entries(self, ns: Namespace, entries: Iterable[FdbEntry]) -> None:
        """No entry left for each MAC and dst on its vxlan link (one to another dst stays)."""

        def request(templates: Templates, index: int, e: FdbEntry) -> bytes:
            shape = (RTM_DELNEIGH, DELETE_FLAGS, AF_BRIDGE, index, FDB_STATE, NTF_SELF, FDB)
            return templates.request(shape, (mac_field(e.mac), address_field(e.dst)))

        def guard(e: FdbEntry) -> AbstractContextManager[None]:
            return deleting(f"delete FDB entry {e.mac} dst {e.dst} on {e.ifname} in {where(ns)}")

        unwanted = [checked_fdb(e) for e in entries]
        self._apply(ns, unwanted, request, guard, ensure=False, vxlan=True)

    def list_fdb(self, ns: Namespace, ifname: str) -> list[FdbEntry]:
        """The static unicast entries of vxlan link ifname's own table, in order: not the
        bridge's entries for it, the learnt ones, the default (all-zeros) destination or the
        multicast addresses the device listens on."""

        def body(ipr: IPRoute) -> list[FdbEntry]:
            found = find_link(ipr, ifname)
            if found is None:
                return []
            with calling(f"list FDB entries of {ifname} in {where(ns)}"):
                msgs = list(ipr.fdb("dump", ifindex=found["index"]))
            out = []
            for m in msgs:
                mac, dst = m.get_attr("NDA_LLADDR"), m.get_attr("NDA_DST")
                ours = m["flags"] & NTF_SELF and m["state"] & NUD_PERMANENT and dst is not None
                if ours and m["ifindex"] == found["index"] and unicast_mac(mac):
                    out.append(FdbEntry(ifname, mac, dst))
            return sorted(out, key=fdb_order)

        return in_namespace(ns, body)

    def _apply(
        self,
        ns: Namespace,
        entries: list[Entry],
        request: Request[Entry],
        guard: Guard[Entry],
        *,
        ensure: bool,
        vxlan: bool,
    ) -> None:
        """One request per entry (on a link _indexes finds), BATCH_SIZE per write, each answer
        judged by guard. Not atomic: a failure raises naming its entry, after the entries
        before it are done; a retry is safe."""
        if not entries:
            return

        def body(ipr: IPRoute) -> None:
            indexes = _indexes(ipr, ns, (e.ifname for e in entries), ensure=ensure, vxlan=vxlan)
            todo = [e for e in entries if e.ifname in indexes]
            templates = Templates(_request)
            with NetlinkBatch(socket.NETLINK_ROUTE) as batch:
                requests = (request(templates, indexes[e.ifname], e) for e in todo)
                for entry, code in zip(todo, batch.run(requests), strict=True):
                    judged(guard(entry), code)

        in_namespace(ns, body)
