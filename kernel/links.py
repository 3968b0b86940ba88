"""Links, IPv4 addresses and static routes, per namespace, over netlink.

Every verb opens one rtnetlink socket inside the namespace (a thread that entered it through
kernel.netns.run_in: cheaper than pyroute2's forked helper, and like it never creates a namespace
by accident), does its work and closes the socket. Ensures are idempotent, deletes of missing
objects are no-ops, and only dataclasses from this module leave it. The batch address verbs
send many requests per write through kernel.netlink.NetlinkBatch. Neighbour and FDB entries
live in kernel.neighbours, which runs its verbs through this module's rtnetlink helpers.
"""

from __future__ import annotations

import errno
import ipaddress
import re
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
RTPROT_KERNEL = 2  # routes the kernel made for an address ("connected"): not listed
RTN_UNICAST = 1
VXLAN_PORT = 4789
VXLAN_OVERHEAD = 50  # outer Ethernet, IPv4, UDP and VXLAN headers
_MAC = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")


@dataclass(frozen=True)
class VxlanInfo:
    """What a vxlan device carries and how: the settings ensure_vxlan compares.

    vni and port (UDP, destination and listening) say which traffic is the device's; local is
    the underlay source address (None: any); learning off and proxy on make an overlay of static
    entries only (no source-MAC learning; ARP for a remote address answered from the device's
    own neighbour table). The defaults are ensure_vxlan's.
    """

    vni: int
    port: int = VXLAN_PORT
    local: str | None = None
    learning: bool = False
    proxy: bool = True


@dataclass(frozen=True)
class Link:
    """A network interface as seen inside one namespace.

    kind is the rtnetlink kind ("bridge", "veth", "vxlan", "dummy"...) or None for a device
    without one (lo, a physical NIC). up is the administrative state (IFF_UP). master is the name
    of the bridge it is enslaved to. vxlan is set for vxlan links only. alias is the interface
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
    vxlan: VxlanInfo | None = None
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
class NamespaceLinks:
    """What read_namespace finds in one visit: the links, the IPv4 addresses and the static
    routes of the main table (as list_links, list_addresses and list_routes give them; no
    routes when not asked for)."""

    links: list[Link]
    addresses: list[Address]
    routes: list[Route]


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
        peer_mac: str | None = None,
        mtu: int | None = None,
    ) -> None: ...
    def ensure_dummy(self, ns: Namespace, name: str, *, alias: str | None = None) -> None: ...
    def ensure_vxlan(
        self,
        ns: Namespace,
        name: str,
        vni: int,
        *,
        local: str | None = None,
        dev: str | None = None,
        port: int = VXLAN_PORT,
        learning: bool = False,
        proxy: bool = True,
        mtu: int | None = None,
        alias: str | None = None,
    ) -> None: ...
    def delete_link(self, ns: Namespace, name: str) -> None: ...
    def get_link(self, ns: Namespace, name: str) -> Link | None: ...
    def list_links(self, ns: Namespace) -> list[Link]: ...
    def set_up(self, ns: Namespace, name: str) -> None: ...
    def set_down(self, ns: Namespace, name: str) -> None: ...
    def set_master(self, ns: Namespace, name: str, bridge: str | None) -> None: ...
    def set_mtu(self, ns: Namespace, name: str, mtu: int) -> None: ...
    def set_mac(self, ns: Namespace, name: str, mac: str) -> None: ...
    def ensure_address(self, ns: Namespace, ifname: str, cidr: str) -> None: ...
    def delete_address(self, ns: Namespace, ifname: str, cidr: str) -> None: ...
    def ensure_addresses(self, ns: Namespace, ifname: str, cidrs: Iterable[str]) -> None: ...
    def delete_addresses(self, ns: Namespace, ifname: str, cidrs: Iterable[str]) -> None: ...
    def list_addresses(self, ns: Namespace, ifname: str | None = None) -> list[Address]: ...
    def ensure_route(self, ns: Namespace, route: Route) -> None: ...
    def delete_route(self, ns: Namespace, route: Route) -> None: ...
    def list_routes(self, ns: Namespace, table: int = MAIN_TABLE) -> list[Route]: ...
    def read_namespace(self, ns: Namespace, routes: bool = True) -> NamespaceLinks: ...


def mac_for(ipv4: str) -> str:
    """The MAC of the endpoint with address ipv4, as Docker derives it: 02:42 and the address's
    four bytes (locally administered, unicast), so any node can write a remote endpoint's
    entries from its address alone."""
    packed = ipaddress.IPv4Address(ipv4).packed
    return ":".join(f"{byte:02x}" for byte in (0x02, 0x42, *packed))


def mac_text(mac: str) -> str:
    """mac as the kernel spells it (lower case); ValueError if it is not six hex pairs."""
    if not _MAC.fullmatch(mac):
        raise ValueError(f"{mac!r} is not a MAC address (six hex pairs, as 02:42:0a:4d:00:02)")
    return mac.lower()


def unicast_mac(mac: str) -> bool:
    """Whether mac (as mac_text gives it) can be one device's: not multicast, not all zeros
    (the kernel refuses others as a link's address; as an FDB entry's, they flood)."""
    octets = bytes.fromhex(mac.replace(":", ""))
    return not octets[0] & 1 and any(octets)


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


def vxlan_clash(ns: Namespace, name: str, have: VxlanInfo, want: VxlanInfo) -> AlreadyExists:
    """The error for ensuring a vxlan whose name is taken by one with other settings (the kernel
    cannot change them on a live device)."""

    def said(value: object) -> str:
        if isinstance(value, bool):
            return "on" if value else "off"
        return "any" if value is None else str(value)

    labels = {"vni": "VNI", "port": "port", "local": "local address"}
    differ = [
        f"{labels.get(f, f)} {said(getattr(have, f))}, not {said(getattr(want, f))}"
        for f in ("vni", "port", "local", "learning", "proxy")
        if getattr(have, f) != getattr(want, f)
    ]
    return AlreadyExists(
        f"vxlan {name} in {where(ns)} has {'; '.join(differ)}; delete it to change them"
    )


def vxlan_mtu_too_big(ns: Namespace, name: str, mtu: int, dev: str, dev_mtu: int) -> KernelError:
    """The error for a vxlan MTU its underlay device cannot carry (the kernel would lower it
    without a word at creation, and refuse it later)."""
    return KernelError(
        f"vxlan {name} in {where(ns)}: MTU {mtu} does not fit in {dev}'s MTU {dev_mtu} less "
        f"the {VXLAN_OVERHEAD}-byte VXLAN header; ask for at most {dev_mtu - VXLAN_OVERHEAD}",
        errno.EINVAL,
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


def in_namespace(ns: Namespace, fn: Callable[[IPRoute], T]) -> T:
    """fn(ipr) with an rtnetlink socket opened inside ns and closed afterwards."""

    def body() -> T:
        with calling(f"open rtnetlink in {where(ns)}"):
            ipr = IPRoute()
        with ipr:
            return fn(ipr)

    return netns.run_in(ns, body)


def find_link(ipr: IPRoute, name: str) -> Any | None:
    """The link message for name in ipr's namespace, or None."""
    try:
        return ipr.link("get", ifname=name)[0]
    except NetlinkError as err:
        if err.code == errno.ENODEV:
            return None
        raise translate(err, f"look up link {name}") from err


def link_index(ipr: IPRoute, ns: Namespace, name: str) -> int:
    """The index of link name in ns (ipr's namespace); NotFound if it is missing."""
    found = find_link(ipr, name)
    if found is None:
        raise missing_link(ns, name)
    index: int = found["index"]
    return index


class Links:
    """The real link layer (pyroute2 rtnetlink); see LinksAPI."""

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

        in_namespace(ns, body)

    def ensure_veth(
        self,
        ns: Namespace,
        name: str,
        peer_name: str,
        peer_ns: Namespace,
        *,
        alias: str | None = None,
        peer_mac: str | None = None,
        mtu: int | None = None,
    ) -> None:
        """A veth pair: name in ns (with alias), peer_name created straight in peer_ns (which may
        be ns) with MAC peer_mac (a task's end), both ends with MTU mtu; an existing pair is
        brought to that MAC and MTU.

        An existing name of kind veth whose peer_name is missing from peer_ns is not the pair
        asked for: AlreadyExists.
        """
        if peer_ns is not None and not netns.exists(peer_ns):
            raise NotFound(f"network namespace {peer_ns} does not exist")
        mac = None if peer_mac is None else mac_text(peer_mac)

        def body(ipr: IPRoute) -> bool:
            found = self._ensure_kind(ipr, ns, name, "veth", alias)
            if found is not None:
                if mtu is not None and mtu != found.mtu:
                    self._set(ipr, ns, name, mtu=mtu)
                return True
            peer: dict[str, Any] = {"ifname": peer_name}
            if peer_ns != ns:
                # pyroute2 opens this path and hands the fd to the kernel.
                peer["net_ns_fd"] = netns.path(peer_ns) if peer_ns else "/proc/self/ns/net"
            if mac is not None:
                peer["address"] = mac
            sizes = {} if mtu is None else {"mtu": mtu}
            what = (
                f"create veth {name} in {where(ns)} with peer {peer_name} in {where(peer_ns)} "
                f"(is {peer_name} taken there?)"
            )
            self._create(ipr, ns, name, alias, what, kind="veth", peer=peer | sizes, **sizes)
            return False

        if in_namespace(ns, body):
            peer_link = self.get_link(peer_ns, peer_name)
            if peer_link is None or peer_link.kind != "veth":
                raise peer_clash(ns, name, peer_name, peer_ns)
            if mac is not None and mac != peer_link.mac:
                self.set_mac(peer_ns, peer_name, mac)
            if mtu is not None and mtu != peer_link.mtu:
                self.set_mtu(peer_ns, peer_name, mtu)

    def ensure_dummy(self, ns: Namespace, name: str, *, alias: str | None = None) -> None:
        def body(ipr: IPRoute) -> None:
            if self._ensure_kind(ipr, ns, name, "dummy", alias) is None:
                what = f"create dummy {name} in {where(ns)} (needs the dummy module)"
                self._create(ipr, ns, name, alias, what, kind="dummy")

        in_namespace(ns, body)

    def ensure_vxlan(
        self,
        ns: Namespace,
        name: str,
        vni: int,
        *,
        local: str | None = None,
        dev: str | None = None,
        port: int = VXLAN_PORT,
        learning: bool = False,
        proxy: bool = True,
        mtu: int | None = None,
        alias: str | None = None,
    ) -> None:
        """A vxlan device for VNI vni on UDP port, sending from local (None: any) through dev
        (None: as routed), learning and proxy as asked, with MTU mtu (None: the kernel's: dev's
        less the VXLAN header, else 1500). No remote or group: where frames go is up to static
        FDB entries (kernel.neighbours), and frames for unknown MACs are dropped.

        An existing link of that name with other VxlanInfo or alias is not the device asked for:
        AlreadyExists; its MTU is brought to mtu. dev is not compared (it only binds the socket).
        """
        want = VxlanInfo(vni, port, local, learning, proxy)

        def body(ipr: IPRoute) -> None:
            found = self._ensure_kind(ipr, ns, name, "vxlan", alias)
            if found is not None:
                if found.vxlan != want:
                    raise vxlan_clash(ns, name, cast(VxlanInfo, found.vxlan), want)
                if mtu is not None and mtu != found.mtu:
                    self._set(ipr, ns, name, mtu=mtu)
                return
            spec: dict[str, Any] = {
                "vxlan_id": vni,
                "vxlan_port": port,
                "vxlan_learning": int(learning),
                "vxlan_proxy": int(proxy),
            }
            if local is not None:
                spec["vxlan_local"] = local
            if dev is not None:
                under = find_link(ipr, dev)
                if under is None:
                    raise missing_link(ns, dev)
                dev_mtu = under.get_attr("IFLA_MTU")
                if mtu is not None and mtu > dev_mtu - VXLAN_OVERHEAD:
                    raise vxlan_mtu_too_big(ns, name, mtu, dev, dev_mtu)
                spec["vxlan_link"] = under["index"]
            if mtu is not None:
                spec["mtu"] = mtu
            what = f"create vxlan {name} (VNI {vni}) in {where(ns)}"
            self._create(ipr, ns, name, alias, what, kind="vxlan", **spec)

        in_namespace(ns, body)

    def delete_link(self, ns: Namespace, name: str) -> None:
        """Remove a link (a veth takes its peer with it); a missing one is a no-op."""

        def body(ipr: IPRoute) -> None:
            found = find_link(ipr, name)
            if found is not None:
                with deleting(f"delete link {name} in {where(ns)}"):
                    ipr.link("del", index=found["index"])

        in_namespace(ns, body)

    def get_link(self, ns: Namespace, name: str) -> Link | None:
        def body(ipr: IPRoute) -> Link | None:
            found = find_link(ipr, name)
            if found is None:
                return None
            # Only a link with a master needs the index → name map.
            return _link(found, link_names(ipr) if found.get_attr("IFLA_MASTER") else {})

        return in_namespace(ns, body)

    def list_links(self, ns: Namespace) -> list[Link]:
        return in_namespace(ns, lambda ipr: _read_links(ipr, ns)[0])

    def set_up(self, ns: Namespace, name: str) -> None:
        in_namespace(ns, lambda ipr: self._set(ipr, ns, name, state="up"))

    def set_down(self, ns: Namespace, name: str) -> None:
        in_namespace(ns, lambda ipr: self._set(ipr, ns, name, state="down"))

    def set_master(self, ns: Namespace, name: str, bridge: str | None) -> None:
        """Enslave name to bridge, or release it from any bridge with bridge=None."""

        def body(ipr: IPRoute) -> None:
            master = 0 if bridge is None else link_index(ipr, ns, bridge)
            self._set(ipr, ns, name, master=master)

        in_namespace(ns, body)

    def set_mtu(self, ns: Namespace, name: str, mtu: int) -> None:
        in_namespace(ns, lambda ipr: self._set(ipr, ns, name, mtu=mtu))

    def set_mac(self, ns: Namespace, name: str, mac: str) -> None:
        """Give link name the MAC address mac (a unicast one: the kernel refuses others)."""
        address = mac_text(mac)
        in_namespace(ns, lambda ipr: self._set(ipr, ns, name, address=address))

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
            index = link_index(ipr, ns, ifname)
            with NetlinkBatch(socket.NETLINK_ROUTE) as batch:
                requests = _address_requests(RTM_NEWADDR, ADD_FLAGS, index, ifaces)
                for iface, code in zip(ifaces, batch.run(requests), strict=True):
                    judged(ensuring(f"add address {iface} to {ifname} in {where(ns)}"), code)

        in_namespace(ns, body)

    def delete_addresses(self, ns: Namespace, ifname: str, cidrs: Iterable[str]) -> None:
        """No cidr left on ifname, BATCH_SIZE requests per write; missing addresses (or link)
        are no-ops."""
        ifaces = [ipaddress.ip_interface(cidr) for cidr in cidrs]

        def body(ipr: IPRoute) -> None:
            found = find_link(ipr, ifname)
            if found is None:
                return  # the link went, and its addresses with it
            index = found["index"]
            with NetlinkBatch(socket.NETLINK_ROUTE) as batch:
                requests = _address_requests(RTM_DELADDR, DELETE_FLAGS, index, ifaces)
                for iface, code in zip(ifaces, batch.run(requests), strict=True):
                    judged(deleting(f"delete address {iface} from {ifname} in {where(ns)}"), code)

        in_namespace(ns, body)

    def list_addresses(self, ns: Namespace, ifname: str | None = None) -> list[Address]:
        """The IPv4 addresses in ns (of one interface if ifname is given)."""

        return in_namespace(ns, lambda ipr: _read_addresses(ipr, ns, link_names(ipr), ifname))

    # routes

    def ensure_route(self, ns: Namespace, route: Route) -> None:
        """Make route the one for its dst in its table (replacing another gateway or device)."""

        def body(ipr: IPRoute) -> None:
            with calling(route_what(ns, route)):
                ipr.route("replace", **self._route_spec(ipr, ns, route))

        in_namespace(ns, body)

    def delete_route(self, ns: Namespace, route: Route) -> None:
        """Remove the route if one matches (gateway/ifname None match any); else a no-op."""

        def body(ipr: IPRoute) -> None:
            if route.ifname is not None and find_link(ipr, route.ifname) is None:
                return  # the device went, and its routes with it
            with deleting(f"delete route {route.dst} in {where(ns)}"):
                ipr.route("del", **self._route_spec(ipr, ns, route))

        in_namespace(ns, body)

    def list_routes(self, ns: Namespace, table: int = MAIN_TABLE) -> list[Route]:
        """Static IPv4 unicast routes of one table; connected routes (proto kernel) left out,
        as they follow the addresses."""

        return in_namespace(ns, lambda ipr: _read_routes(ipr, ns, link_names(ipr), table))

    def read_namespace(self, ns: Namespace, routes: bool = True) -> NamespaceLinks:
        """Links, addresses and (unless routes is False: a host's table may be large) routes
        in one visit of ns: one thread, one socket, one dump of the links (a controller reads
        its node and its task namespaces so)."""

        def body(ipr: IPRoute) -> NamespaceLinks:
            links, names = _read_links(ipr, ns)
            table = _read_routes(ipr, ns, names, MAIN_TABLE) if routes else []
            return NamespaceLinks(links, _read_addresses(ipr, ns, names), table)

        return in_namespace(ns, body)

    # helpers, all running inside the namespace's thread

    def _ensure_kind(
        self, ipr: IPRoute, ns: Namespace, name: str, kind: str, alias: str | None
    ) -> Link | None:
        """The existing link of that name if it has that kind and alias, None if absent; else
        raise."""
        found = find_link(ipr, name)
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
        index = link_index(ipr, ns, name)
        text = ", ".join(f"{k}={v}" for k, v in attrs.items())
        with calling(f"set {text} on {name} in {where(ns)}"):
            ipr.link("set", index=index, **attrs)

    def _route_spec(self, ipr: IPRoute, ns: Namespace, route: Route) -> dict[str, Any]:
        prefix, prefixlen = route_dst(route.dst)
        spec: dict[str, Any] = {"dst": prefix, "dst_len": prefixlen, "table": route.table}
        if route.gateway is not None:
            spec["gateway"] = route.gateway
        if route.ifname is not None:
            spec["oif"] = link_index(ipr, ns, route.ifname)
        return spec


def _read_links(ipr: IPRoute, ns: Namespace) -> tuple[list[Link], dict[int, str]]:
    """The links of ipr's namespace by index, and the index → name map they give."""
    with calling(f"list links in {where(ns)}"):
        msgs = list(ipr.get_links())
    names = {m["index"]: m.get_attr("IFLA_IFNAME") for m in msgs}
    return sorted((_link(m, names) for m in msgs), key=lambda link: link.index), names


def _read_addresses(
    ipr: IPRoute, ns: Namespace, names: dict[int, str], ifname: str | None = None
) -> list[Address]:
    """The IPv4 addresses of ipr's namespace (of one interface if ifname is given)."""
    with calling(f"list addresses in {where(ns)}"):
        msgs = list(ipr.get_addr(family=2))
    out = []
    for m in msgs:
        name = names.get(m["index"], "")
        ip = m.get_attr("IFA_LOCAL") or m.get_attr("IFA_ADDRESS")
        if ifname is None or name == ifname:
            out.append(Address(name, f"{ip}/{m['prefixlen']}"))
    return out


def _read_routes(ipr: IPRoute, ns: Namespace, names: dict[int, str], table: int) -> list[Route]:
    """Static IPv4 unicast routes of one table of ipr's namespace."""
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


def link_names(ipr: IPRoute) -> dict[int, str]:
    """Interface index → name, for resolving master, oif and ifindex fields."""
    with calling("list links"):
        return {m["index"]: m.get_attr("IFLA_IFNAME") for m in ipr.get_links()}


def _link(msg: Any, names: dict[int, str]) -> Link:
    """A Link from an rtnetlink link message; names resolves the master's index."""
    kind = msg.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND")
    data = msg.get_nested("IFLA_LINKINFO", "IFLA_INFO_DATA")
    master = msg.get_attr("IFLA_MASTER")
    return Link(
        name=msg.get_attr("IFLA_IFNAME"),
        kind=kind,
        index=msg["index"],
        up=bool(msg["flags"] & IFF_UP),
        mtu=msg.get_attr("IFLA_MTU"),
        master=names.get(master) if master else None,
        mac=msg.get_attr("IFLA_ADDRESS"),
        vxlan=_vxlan(data) if kind == "vxlan" else None,
        alias=msg.get_attr("IFLA_IFALIAS") or None,
    )


def _vxlan(data: Any) -> VxlanInfo:
    """VxlanInfo from a vxlan link's IFLA_INFO_DATA (its IFLA_VXLAN_* attributes)."""
    return VxlanInfo(
        vni=data.get_attr("IFLA_VXLAN_ID"),
        port=data.get_attr("IFLA_VXLAN_PORT"),
        local=data.get_attr("IFLA_VXLAN_LOCAL"),
        learning=bool(data.get_attr("IFLA_VXLAN_LEARNING")),
        proxy=bool(data.get_attr("IFLA_VXLAN_PROXY")),
    )
