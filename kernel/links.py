"""Links, IPv4 addresses, static routes and permanent neighbours, per namespace, over netlink.

Every verb opens one rtnetlink socket inside the namespace (a thread that entered it through
kernel.netns.run_in: cheaper than pyroute2's forked helper, and like it never creates a namespace
by accident), does its work and closes the socket. Ensures are idempotent, deletes of missing
objects are no-ops, and only dataclasses from this module leave it. The batch address verbs
send many requests per write through kernel.netlink.NetlinkBatch.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Callable, Hashable, Iterable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, cast

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import RTM_DELADDR, RTM_NEWADDR
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg

from kernel import netns
from kernel.errors import (
    AlreadyExists,
    KernelError,
    NotFound,
    calling,
    deleting,
    ensuring,
    translate,
)
from kernel.netlink import (
    ADD_FLAGS,
    DELETE_FLAGS,
    NetlinkBatch,
    Templates,
    address_field,
    judged,
)
from kernel.netns import Namespace

T = TypeVar("T")

MAIN_TABLE = 254
IFF_UP = 0x1
NUD_PERMANENT = 0x80
RTPROT_KERNEL = 2  # routes the kernel made for an address ("connected"): not listed
RTN_UNICAST = 1
VXLAN_PORT = 4789


@dataclass(frozen=True)
class Link:
    """A network interface as seen inside one namespace.

    kind is the rtnetlink kind ("bridge", "veth", "vxlan", "dummy"...) or None for a device
    without one (lo, a physical NIC). up is the administrative state (IFF_UP). master is the name
    of the bridge it is enslaved to. vni is set for vxlan links only. alias is the interface
    alias (IFLA_IFALIAS, `ip link set NAME alias TEXT`), None when it has none: the mark by which
    a tool tells the links it made from others' of the same name.
    """

    name: str
    kind: str | None
    index: int
    up: bool
    mtu: int
    master: str | None
    mac: str
    vni: int | None = None
    alias: str | None = None


@dataclass(frozen=True)
class Address:
    """An IPv4 address on an interface, as "10.10.0.1/24"."""

    ifname: str
    cidr: str


@dataclass(frozen=True)
class Route:
    """A static IPv4 route: dst is "default" or a CIDR, through a gateway and/or a device.

    Listed routes always carry ifname (the kernel resolves it from the gateway).
    """

    dst: str
    gateway: str | None = None
    ifname: str | None = None
    table: int = MAIN_TABLE


@dataclass(frozen=True)
class Neighbour:
    """A permanent ARP entry: address is reached at mac through ifname."""

    ifname: str
    address: str
    mac: str


class LinksAPI(Protocol):
    """What meshctl asks of the link layer; kernel.fake.links.FakeLinks implements it too."""

    def ensure_bridge(
        self, ns: Namespace, name: str, mtu: int | None = None, *, alias: str | None = None
    ) -> None: ...
    def ensure_veth(
        self,
        ns: Namespace,
        name: str,
        peer_name: str,
        peer_ns: Namespace,
        *,
        alias: str | None = None,
    ) -> None: ...
    def ensure_dummy(self, ns: Namespace, name: str, *, alias: str | None = None) -> None: ...
    def ensure_vxlan(
        self,
        ns: Namespace,
        name: str,
        vni: int,
        local: str | None = None,
        remote: str | None = None,
        dev: str | None = None,
        port: int = VXLAN_PORT,
        *,
        alias: str | None = None,
    ) -> None: ...
    def delete_link(self, ns: Namespace, name: str) -> None: ...
    def get_link(self, ns: Namespace, name: str) -> Link | None: ...
    def list_links(self, ns: Namespace) -> list[Link]: ...
    def set_up(self, ns: Namespace, name: str) -> None: ...
    def set_down(self, ns: Namespace, name: str) -> None: ...
    def set_master(self, ns: Namespace, name: str, bridge: str | None) -> None: ...
    def set_mtu(self, ns: Namespace, name: str, mtu: int) -> None: ...
    def ensure_address(self, ns: Namespace, ifname: str, cidr: str) -> None: ...
    def delete_address(self, ns: Namespace, ifname: str, cidr: str) -> None: ...
    def ensure_addresses(self, ns: Namespace, ifname: str, cidrs: Iterable[str]) -> None: ...
    def delete_addresses(self, ns: Namespace, ifname: str, cidrs: Iterable[str]) -> None: ...
    def list_addresses(self, ns: Namespace, ifname: str | None = None) -> list[Address]: ...
    def ensure_route(self, ns: Namespace, route: Route) -> None: ...
    def delete_route(self, ns: Namespace, route: Route) -> None: ...
    def list_routes(self, ns: Namespace, table: int = MAIN_TABLE) -> list[Route]: ...
    def ensure_neighbour(self, ns: Namespace, neighbour: Neighbour) -> None: ...
    def delete_neighbour(self, ns: Namespace, neighbour: Neighbour) -> None: ...
    def list_neighbours(self, ns: Namespace, ifname: str | None = None) -> list[Neighbour]: ...


def where(ns: Namespace) -> str:
    """A namespace as words in a message."""
    return "the node namespace" if ns is None else f"namespace {ns}"


def missing_link(ns: Namespace, name: str) -> NotFound:
    """The error for a verb on a link that is not there (shared with the fake)."""
    return NotFound(f"link {name} does not exist in {where(ns)}; ensure it first")


def kind_clash(ns: Namespace, name: str, have: str | None, want: str) -> AlreadyExists:
    """The error for ensuring a link whose name is taken by another kind (shared with the fake)."""
    return AlreadyExists(
        f"link {name} in {where(ns)} is a {have or 'device'}, not a {want}; "
        f"delete it or choose another name"
    )


def alias_clash(ns: Namespace, name: str, have: str | None, want: str | None) -> AlreadyExists:
    """The error for ensuring a link whose name is taken by one with another alias: another
    tool's link (or another object's) of the same name, which an ensure must not adopt."""

    def said(alias: str | None) -> str:
        return "no alias" if alias is None else f"alias {alias!r}"

    return AlreadyExists(
        f"link {name} in {where(ns)} has {said(have)}, not {said(want)}: it is not the link "
        f"asked for (another's of the same name); delete or rename it, or choose another name"
    )


def peer_clash(ns: Namespace, name: str, peer_name: str, peer_ns: Namespace) -> AlreadyExists:
    """The error for a veth whose name exists but whose peer is not where asked."""
    return AlreadyExists(
        f"veth {name} in {where(ns)} exists but its peer {peer_name} is not in "
        f"{where(peer_ns)}; delete {name} and ensure the pair again"
    )


def vni_clash(ns: Namespace, name: str, have: int | None, want: int) -> AlreadyExists:
    """The error for ensuring a vxlan whose name is taken with another VNI."""
    return AlreadyExists(
        f"vxlan {name} in {where(ns)} has VNI {have}, not {want}; delete it to change the VNI"
    )


def route_what(ns: Namespace, route: Route) -> str:
    """What failed when adding a route, with the two usual causes."""
    via = f" via {route.gateway}" if route.gateway else ""
    dev = f" dev {route.ifname}" if route.ifname else ""
    return (
        f"add route {route.dst}{via}{dev} in {where(ns)} "
        f"(is the device up and the gateway on one of its subnets?)"
    )


def route_dst(dst: str) -> tuple[str, int]:
    """("default" | CIDR) → (network address, prefix length)."""
    if dst == "default":
        return "0.0.0.0", 0
    net = ipaddress.ip_network(dst, strict=True)
    return str(net.network_address), net.prefixlen


def route_name(prefix: str, prefixlen: int) -> str:
    """The inverse of route_dst."""
    return "default" if prefixlen == 0 else f"{prefix}/{prefixlen}"


def _address_request(shape: Hashable, values: tuple[Any, ...]) -> bytes:
    """The RTM_NEWADDR/RTM_DELADDR request pyroute2's addr() would make for the address in
    values; shape is (message type, flags, link index, prefix length)."""
    kind, flags, index, prefixlen = cast(tuple[int, int, int, int], shape)
    (ip,) = values
    version = ipaddress.ip_address(ip).version
    msg = ifaddrmsg()
    msg["family"] = socket.AF_INET if version == 4 else socket.AF_INET6
    msg["prefixlen"] = prefixlen
    msg["index"] = index
    msg["attrs"] = (
        [("IFA_LOCAL", ip), ("IFA_ADDRESS", ip)] if version == 4 else [("IFA_ADDRESS", ip)]
    )
    msg["header"]["type"] = kind
    msg["header"]["flags"] = flags
    msg.encode()
    return bytes(msg.data)


def _address_requests(kind: int, flags: int, index: int, ifaces: Iterable[Any]) -> Iterator[bytes]:
    """One request per interface address, encoded from a template per prefix length."""
    templates = Templates(_address_request)
    for iface in ifaces:
        shape = (kind, flags, index, iface.network.prefixlen)
        yield templates.request(shape, (address_field(str(iface.ip)),))


class Links:
    """The real link layer (pyroute2 rtnetlink); see LinksAPI."""

    def _run(self, ns: Namespace, fn: Callable[[IPRoute], T]) -> T:
        """fn(ipr) with an rtnetlink socket opened inside ns and closed afterwards."""

        def body() -> T:
            with calling(f"open rtnetlink in {where(ns)}"):
                ipr = IPRoute()
            with ipr:
                return fn(ipr)

        return netns.run_in(ns, body)

    # links

    def ensure_bridge(
        self, ns: Namespace, name: str, mtu: int | None = None, *, alias: str | None = None
    ) -> None:
        def body(ipr: IPRoute) -> None:
            if self._ensure_kind(ipr, ns, name, "bridge", alias) is None:
                what = f"create bridge {name} in {where(ns)}"
                self._create(ipr, ns, name, alias, what, kind="bridge")
            if mtu is not None:
                self._set(ipr, ns, name, mtu=mtu)

        self._run(ns, body)

    def ensure_veth(
        self,
        ns: Namespace,
        name: str,
        peer_name: str,
        peer_ns: Namespace,
        *,
        alias: str | None = None,
    ) -> None:
        """A veth pair: name in ns (with alias), peer_name created straight in peer_ns (which may
        be ns).

        An existing name of kind veth whose peer_name is missing from peer_ns is not the pair
        asked for: AlreadyExists.
        """
        if peer_ns is not None and not netns.exists(peer_ns):
            raise NotFound(f"network namespace {peer_ns} does not exist")

        def body(ipr: IPRoute) -> bool:
            if self._ensure_kind(ipr, ns, name, "veth", alias) is not None:
                return True
            peer: dict[str, Any] = {"ifname": peer_name}
            if peer_ns != ns:
                # pyroute2 opens this path and hands the fd to the kernel.
                peer["net_ns_fd"] = netns.path(peer_ns) if peer_ns else "/proc/self/ns/net"
            what = (
                f"create veth {name} in {where(ns)} with peer {peer_name} in {where(peer_ns)} "
                f"(is {peer_name} taken there?)"
            )
            self._create(ipr, ns, name, alias, what, kind="veth", peer=peer)
            return False

        if self._run(ns, body):
            peer_link = self.get_link(peer_ns, peer_name)
            if peer_link is None or peer_link.kind != "veth":
                raise peer_clash(ns, name, peer_name, peer_ns)

    def ensure_dummy(self, ns: Namespace, name: str, *, alias: str | None = None) -> None:
        def body(ipr: IPRoute) -> None:
            if self._ensure_kind(ipr, ns, name, "dummy", alias) is None:
                what = f"create dummy {name} in {where(ns)} (needs the dummy module)"
                self._create(ipr, ns, name, alias, what, kind="dummy")

        self._run(ns, body)

    def ensure_vxlan(
        self,
        ns: Namespace,
        name: str,
        vni: int,
        local: str | None = None,
        remote: str | None = None,
        dev: str | None = None,
        port: int = VXLAN_PORT,
        *,
        alias: str | None = None,
    ) -> None:
        """A vxlan device; remote is a unicast peer or a multicast group (then dev is needed)."""

        def body(ipr: IPRoute) -> None:
            found = self._ensure_kind(ipr, ns, name, "vxlan", alias)
            if found is not None:
                if found.vni != vni:
                    raise vni_clash(ns, name, found.vni, vni)
                return
            spec: dict[str, Any] = {"vxlan_id": vni, "vxlan_port": port}
            if local is not None:
                spec["vxlan_local"] = local
            if remote is not None:
                spec["vxlan_group"] = remote
            if dev is not None:
                spec["vxlan_link"] = self._index(ipr, ns, dev)
            what = f"create vxlan {name} (VNI {vni}) in {where(ns)}"
            self._create(ipr, ns, name, alias, what, kind="vxlan", **spec)

        self._run(ns, body)

    def delete_link(self, ns: Namespace, name: str) -> None:
        """Remove a link (a veth takes its peer with it); a missing one is a no-op."""

        def body(ipr: IPRoute) -> None:
            found = self._find(ipr, name)
            if found is not None:
                with deleting(f"delete link {name} in {where(ns)}"):
                    ipr.link("del", index=found["index"])

        self._run(ns, body)

    def get_link(self, ns: Namespace, name: str) -> Link | None:
        def body(ipr: IPRoute) -> Link | None:
            found = self._find(ipr, name)
            if found is None:
                return None
            # Only a link with a master needs the index → name map.
            return _link(found, _names(ipr) if found.get_attr("IFLA_MASTER") else {})

        return self._run(ns, body)

    def list_links(self, ns: Namespace) -> list[Link]:
        def body(ipr: IPRoute) -> list[Link]:
            with calling(f"list links in {where(ns)}"):
                msgs = list(ipr.get_links())
            names = {m["index"]: m.get_attr("IFLA_IFNAME") for m in msgs}
            return sorted((_link(m, names) for m in msgs), key=lambda link: link.index)

        return self._run(ns, body)

    def set_up(self, ns: Namespace, name: str) -> None:
        self._run(ns, lambda ipr: self._set(ipr, ns, name, state="up"))

    def set_down(self, ns: Namespace, name: str) -> None:
        self._run(ns, lambda ipr: self._set(ipr, ns, name, state="down"))

    def set_master(self, ns: Namespace, name: str, bridge: str | None) -> None:
        """Enslave name to bridge, or release it from any bridge with bridge=None."""

        def body(ipr: IPRoute) -> None:
            master = 0 if bridge is None else self._index(ipr, ns, bridge)
            self._set(ipr, ns, name, master=master)

        self._run(ns, body)

    def set_mtu(self, ns: Namespace, name: str, mtu: int) -> None:
        self._run(ns, lambda ipr: self._set(ipr, ns, name, mtu=mtu))

    # addresses

    def ensure_address(self, ns: Namespace, ifname: str, cidr: str) -> None:
        self.ensure_addresses(ns, ifname, [cidr])

    def delete_address(self, ns: Namespace, ifname: str, cidr: str) -> None:
        self.delete_addresses(ns, ifname, [cidr])

    def ensure_addresses(self, ns: Namespace, ifname: str, cidrs: Iterable[str]) -> None:
        """Every cidr on ifname, BATCH_SIZE requests per write (a VIP leg holds thousands);
        present ones are no-ops. Not atomic: a failure raises naming its address, after the
        addresses before it (and the rest of its write) are made; a retry is safe."""
        ifaces = [ipaddress.ip_interface(cidr) for cidr in cidrs]  # bad input fails before any

        def body(ipr: IPRoute) -> None:
            index = self._index(ipr, ns, ifname)
            with NetlinkBatch(socket.NETLINK_ROUTE) as batch:
                requests = _address_requests(RTM_NEWADDR, ADD_FLAGS, index, ifaces)
                for iface, code in zip(ifaces, batch.run(requests), strict=True):
                    judged(ensuring(f"add address {iface} to {ifname} in {where(ns)}"), code)

        self._run(ns, body)

    def delete_addresses(self, ns: Namespace, ifname: str, cidrs: Iterable[str]) -> None:
        """No cidr left on ifname, BATCH_SIZE requests per write; missing addresses (or link)
        are no-ops."""
        ifaces = [ipaddress.ip_interface(cidr) for cidr in cidrs]

        def body(ipr: IPRoute) -> None:
            found = self._find(ipr, ifname)
            if found is None:
                return  # the link went, and its addresses with it
            index = found["index"]
            with NetlinkBatch(socket.NETLINK_ROUTE) as batch:
                requests = _address_requests(RTM_DELADDR, DELETE_FLAGS, index, ifaces)
                for iface, code in zip(ifaces, batch.run(requests), strict=True):
                    judged(deleting(f"delete address {iface} from {ifname} in {where(ns)}"), code)

        self._run(ns, body)

    def list_addresses(self, ns: Namespace, ifname: str | None = None) -> list[Address]:
        """The IPv4 addresses in ns (of one interface if ifname is given)."""

        def body(ipr: IPRoute) -> list[Address]:
            names = _names(ipr)
            with calling(f"list addresses in {where(ns)}"):
                msgs = list(ipr.get_addr(family=2))
            out = []
            for m in msgs:
                name = names.get(m["index"], "")
                ip = m.get_attr("IFA_LOCAL") or m.get_attr("IFA_ADDRESS")
                if ifname is None or name == ifname:
                    out.append(Address(name, f"{ip}/{m['prefixlen']}"))
            return out

        return self._run(ns, body)

    # routes

    def ensure_route(self, ns: Namespace, route: Route) -> None:
        """Make route the one for its dst in its table (replacing another gateway or device)."""

        def body(ipr: IPRoute) -> None:
            with calling(route_what(ns, route)):
                ipr.route("replace", **self._route_spec(ipr, ns, route))

        self._run(ns, body)

    def delete_route(self, ns: Namespace, route: Route) -> None:
        """Remove the route if one matches (gateway/ifname None match any); else a no-op."""

        def body(ipr: IPRoute) -> None:
            if route.ifname is not None and self._find(ipr, route.ifname) is None:
                return  # the device went, and its routes with it
            with deleting(f"delete route {route.dst} in {where(ns)}"):
                ipr.route("del", **self._route_spec(ipr, ns, route))

        self._run(ns, body)

    def list_routes(self, ns: Namespace, table: int = MAIN_TABLE) -> list[Route]:
        """Static IPv4 unicast routes of one table; connected routes (proto kernel) left out,
        as they follow the addresses."""

        def body(ipr: IPRoute) -> list[Route]:
            names = _names(ipr)
            with calling(f"list routes in {where(ns)}"):
                msgs = list(ipr.get_routes(family=2, table=table))
            out = []
            for m in msgs:
                if m["proto"] == RTPROT_KERNEL or m["type"] != RTN_UNICAST:
                    continue
                if (m.get_attr("RTA_TABLE") or m["table"]) != table:
                    continue
                dst = route_name(m.get_attr("RTA_DST") or "0.0.0.0", m["dst_len"])
                oif = m.get_attr("RTA_OIF")
                out.append(Route(dst, m.get_attr("RTA_GATEWAY"), names.get(oif), table))
            return out

        return self._run(ns, body)

    # neighbours

    def ensure_neighbour(self, ns: Namespace, neighbour: Neighbour) -> None:
        def body(ipr: IPRoute) -> None:
            index = self._index(ipr, ns, neighbour.ifname)
            with calling(f"add neighbour {neighbour.address} on {neighbour.ifname}"):
                ipr.neigh(
                    "replace",
                    dst=neighbour.address,
                    lladdr=neighbour.mac,
                    ifindex=index,
                    state=NUD_PERMANENT,
                )

        self._run(ns, body)

    def delete_neighbour(self, ns: Namespace, neighbour: Neighbour) -> None:
        def body(ipr: IPRoute) -> None:
            found = self._find(ipr, neighbour.ifname)
            if found is None:
                return
            with deleting(f"delete neighbour {neighbour.address} on {neighbour.ifname}"):
                ipr.neigh("del", dst=neighbour.address, ifindex=found["index"])

        self._run(ns, body)

    def list_neighbours(self, ns: Namespace, ifname: str | None = None) -> list[Neighbour]:
        """The permanent IPv4 neighbours (learnt ones come and go: not listed)."""

        def body(ipr: IPRoute) -> list[Neighbour]:
            names = _names(ipr)
            with calling(f"list neighbours in {where(ns)}"):
                msgs = list(ipr.get_neighbours(family=2))
            out = []
            for m in msgs:
                name = names.get(m["ifindex"], "")
                if not m["state"] & NUD_PERMANENT or (ifname is not None and name != ifname):
                    continue
                out.append(Neighbour(name, m.get_attr("NDA_DST"), m.get_attr("NDA_LLADDR")))
            return out

        return self._run(ns, body)

    # helpers, all running inside the namespace's thread

    def _find(self, ipr: IPRoute, name: str) -> Any | None:
        """The link message for name, or None."""
        try:
            return ipr.link("get", ifname=name)[0]
        except NetlinkError as err:
            if err.code == errno.ENODEV:
                return None
            raise translate(err, f"look up link {name}") from err

    def _index(self, ipr: IPRoute, ns: Namespace, name: str) -> int:
        found = self._find(ipr, name)
        if found is None:
            raise missing_link(ns, name)
        index: int = found["index"]
        return index

    def _ensure_kind(
        self, ipr: IPRoute, ns: Namespace, name: str, kind: str, alias: str | None
    ) -> Link | None:
        """The existing link of that name if it has that kind and alias, None if absent; else
        raise."""
        found = self._find(ipr, name)
        if found is None:
            return None
        link = _link(found, {})
        if link.kind != kind:
            raise kind_clash(ns, name, link.kind, kind)
        if link.alias != alias:
            raise alias_clash(ns, name, link.alias, alias)
        return link

    def _create(
        self, ipr: IPRoute, ns: Namespace, name: str, alias: str | None, what: str, **spec: Any
    ) -> None:
        """Add link name with its alias. The kernel ignores IFLA_IFALIAS in a request that
        creates a link, so the alias follows at once on the same socket; if it cannot be set,
        the link just made goes again, so no unmarked link is left behind."""
        with calling(what):
            ipr.link("add", ifname=name, **spec)
        if alias is None:
            return
        try:
            with calling(f"set alias {alias!r} on {name} in {where(ns)}"):
                ipr.link("set", ifname=name, ifalias=alias)
        except KernelError:
            with suppress(KernelError), deleting(f"delete link {name} in {where(ns)}"):
                ipr.link("del", ifname=name)
            raise

    def _set(self, ipr: IPRoute, ns: Namespace, name: str, **attrs: Any) -> None:
        index = self._index(ipr, ns, name)
        text = ", ".join(f"{k}={v}" for k, v in attrs.items())
        with calling(f"set {text} on {name} in {where(ns)}"):
            ipr.link("set", index=index, **attrs)

    def _route_spec(self, ipr: IPRoute, ns: Namespace, route: Route) -> dict[str, Any]:
        prefix, prefixlen = route_dst(route.dst)
        spec: dict[str, Any] = {"dst": prefix, "dst_len": prefixlen, "table": route.table}
        if route.gateway is not None:
            spec["gateway"] = route.gateway
        if route.ifname is not None:
            spec["oif"] = self._index(ipr, ns, route.ifname)
        return spec


def _names(ipr: IPRoute) -> dict[int, str]:
    """Interface index → name, for resolving master, oif and ifindex fields."""
    with calling("list links"):
        return {m["index"]: m.get_attr("IFLA_IFNAME") for m in ipr.get_links()}


def _link(msg: Any, names: dict[int, str]) -> Link:
    """A Link from an rtnetlink link message; names resolves the master's index."""
    kind = msg.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND")
    vni = msg.get_nested("IFLA_LINKINFO", "IFLA_INFO_DATA", "IFLA_VXLAN_ID")
    master = msg.get_attr("IFLA_MASTER")
    return Link(
        name=msg.get_attr("IFLA_IFNAME"),
        kind=kind,
        index=msg["index"],
        up=bool(msg["flags"] & IFF_UP),
        mtu=msg.get_attr("IFLA_MTU"),
        master=names.get(master) if master else None,
        mac=msg.get_attr("IFLA_ADDRESS"),
        vni=vni if kind == "vxlan" else None,
        alias=msg.get_attr("IFLA_IFALIAS") or None,
    )
