"""kernel.links in memory: links, addresses, static routes and neighbours per fake namespace.

It follows the kernel where meshctl can observe a difference (checked by tests/conformance):
a new namespace holds only lo, down; a veth end dies with its peer and its peer's namespace;
taking a device down, deleting it or removing its last address drops the static routes through
it; a route needs its device up and its gateway on a subnet of an up device; taking a device
down or changing its MAC drops its neighbour entries (not its FDB entries). The neighbour and FDB
entries live here, with their links; kernel.fake.neighbours reads and writes them.
"""

from __future__ import annotations

import errno
import ipaddress
import itertools
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import cast

from kernel.errors import KernelError, translate
from kernel.fake.world import FakeNamespace, FakeWorld
from kernel.links import (
    MAIN_TABLE,
    VXLAN_OVERHEAD,
    VXLAN_PORT,
    Address,
    Link,
    NamespaceLinks,
    Route,
    VxlanInfo,
    alias_clash,
    kind_clash,
    mac_text,
    missing_link,
    peer_clash,
    route_dst,
    route_name,
    route_what,
    unicast_mac,
    vxlan_clash,
    vxlan_mtu_too_big,
    where,
)
from kernel.neighbours import FdbEntry, Neighbour
from kernel.netns import Namespace

PART = "links"  # this subsystem's key in FakeNamespace.parts (kernel.fake.sysctl reads it)
DEFAULT_MTU = 1500
ALIAS_MAX = 254  # bytes of IFLA_IFALIAS the kernel takes as pyroute2 sends it (NUL-terminated)


@dataclass
class FakeLink:
    """A link's mutable state; peer is (namespace, name) of a veth's other end."""

    name: str
    kind: str | None
    index: int
    mtu: int = DEFAULT_MTU
    up: bool = False
    master: str | None = None
    mac: str = "00:00:00:00:00:00"
    vxlan: VxlanInfo | None = None
    peer: tuple[Namespace, str] | None = None
    alias: str | None = None

    def view(self) -> Link:
        return Link(
            self.name,
            self.kind,
            self.index,
            self.up,
            self.mtu,
            self.master,
            self.mac,
            self.vxlan,
            self.alias,
        )


@dataclass
class NsLinks:
    """Everything the link layer keeps in one namespace."""

    links: dict[str, FakeLink] = field(default_factory=dict)
    addresses: list[Address] = field(default_factory=list)  # in the order added, as listed
    routes: dict[tuple[int, str], Route] = field(default_factory=dict)
    neighbours: dict[tuple[str, str], Neighbour] = field(default_factory=dict)  # (ifname, ip)
    fdb: dict[tuple[str, str], FdbEntry] = field(default_factory=dict)  # (ifname, mac)
    indexes: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def __post_init__(self) -> None:
        self.links["lo"] = FakeLink("lo", None, next(self.indexes), mtu=65536)


def failure(code: int, what: str) -> KernelError:
    """The typed error the real layer raises for this errno (same class and code)."""
    return translate(OSError(code, os.strerror(code)), what)


def links_in(world: FakeWorld, ns: Namespace) -> NsLinks:
    """The link layer's state in namespace ns (NotFound if there is no such namespace)."""
    state: NsLinks = world.require(ns).part(PART, NsLinks)
    return state


def link_in(state: NsLinks, ns: Namespace, name: str) -> FakeLink:
    """Link name of a namespace's state, or the real layer's NotFound."""
    try:
        return state.links[name]
    except KeyError:
        raise missing_link(ns, name) from None


class FakeLinks:
    """kernel.links.LinksAPI in memory; unsupported_kinds models a kernel without, say, dummy."""

    def __init__(self, world: FakeWorld, unsupported_kinds: Iterable[str] = ()) -> None:
        self.world = world
        self.unsupported_kinds = frozenset(unsupported_kinds)
        self._macs = itertools.count(1)
        world.on_namespace_deleted.append(self._namespace_deleted)

    # links

    def ensure_bridge(
        self, ns: Namespace, name: str, mtu: int | None = None, *, alias: str | None = None
    ) -> None:
        state = self._state(ns)
        if self._ensure_kind(state, ns, name, "bridge", alias) is None:
            self._add(ns, state, FakeLink(name, "bridge", 0, alias=alias))
        if mtu is not None:
            self.set_mtu(ns, name, mtu)

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
        state = self._state(ns)
        peer_state = self._state(peer_ns)
        mac = None if peer_mac is None else mac_text(peer_mac)
        found = self._ensure_kind(state, ns, name, "veth", alias)
        if found is not None:
            peer = peer_state.links.get(peer_name)
            if peer is None or peer.kind != "veth":
                raise peer_clash(ns, name, peer_name, peer_ns)
            if mac is not None:
                self.set_mac(peer_ns, peer_name, mac)
            if mtu is not None:
                found.mtu = peer.mtu = mtu
            return
        what = (
            f"create veth {name} in {where(ns)} with peer {peer_name} in {where(peer_ns)} "
            f"(is {peer_name} taken there?)"
        )
        if peer_name in peer_state.links or (peer_ns == ns and peer_name == name):
            raise failure(errno.EEXIST, what)
        if mac is not None and not unicast_mac(mac):
            raise failure(errno.EADDRNOTAVAIL, what)
        size = DEFAULT_MTU if mtu is None else mtu
        # The kernel registers the peer first: it gets the lower index.
        peer = FakeLink(peer_name, "veth", 0, mtu=size, peer=(ns, name))
        self._add(peer_ns, peer_state, peer)
        if mac is not None:
            peer.mac = mac
        self._add(
            ns, state, FakeLink(name, "veth", 0, mtu=size, peer=(peer_ns, peer_name), alias=alias)
        )

    def ensure_dummy(self, ns: Namespace, name: str, *, alias: str | None = None) -> None:
        state = self._state(ns)
        if self._ensure_kind(state, ns, name, "dummy", alias) is None:
            self._add(ns, state, FakeLink(name, "dummy", 0, alias=alias))

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
        state = self._state(ns)
        want = VxlanInfo(vni, port, local, learning, proxy)
        found = self._ensure_kind(state, ns, name, "vxlan", alias)
        if found is not None:
            if found.vxlan != want:
                raise vxlan_clash(ns, name, cast(VxlanInfo, found.vxlan), want)
            if mtu is not None:
                found.mtu = mtu
            return
        size = DEFAULT_MTU if mtu is None else mtu
        if dev is not None:
            under = self._link(state, ns, dev).mtu
            if mtu is not None and mtu > under - VXLAN_OVERHEAD:
                raise vxlan_mtu_too_big(ns, name, mtu, dev, under)
            size = under - VXLAN_OVERHEAD if mtu is None else mtu
        if any(
            v.vxlan and (v.vxlan.vni, v.vxlan.port) == (vni, port) for v in state.links.values()
        ):
            # One namespace, one device per VNI and port, whatever the local address.
            raise failure(errno.EEXIST, f"create vxlan {name} (VNI {vni}) in {where(ns)}")
        self._add(ns, state, FakeLink(name, "vxlan", 0, mtu=size, vxlan=want, alias=alias))

    def delete_link(self, ns: Namespace, name: str) -> None:
        state = self._state(ns)
        link = state.links.get(name)
        if link is None:
            return
        self._drop(ns, state, link)
        if link.peer is not None:
            peer_ns, peer_name = link.peer
            peer_state = self.world.namespaces.get(peer_ns)
            if peer_state is not None and peer_name in self._of(peer_state).links:
                self._drop(peer_ns, self._of(peer_state), self._of(peer_state).links[peer_name])

    def get_link(self, ns: Namespace, name: str) -> Link | None:
        link = self._state(ns).links.get(name)
        return None if link is None else link.view()

    def list_links(self, ns: Namespace) -> list[Link]:
        found = [link.view() for link in self._state(ns).links.values()]
        return sorted(found, key=lambda link: link.index)

    def set_up(self, ns: Namespace, name: str) -> None:
        state = self._state(ns)
        link = self._link(state, ns, name)
        link.up = True
        if link.name == "lo" and not any(a.ifname == "lo" for a in state.addresses):
            state.addresses.append(Address("lo", "127.0.0.1/8"))  # as the kernel does

    def set_down(self, ns: Namespace, name: str) -> None:
        state = self._state(ns)
        self._link(state, ns, name).up = False
        self._flush_routes(state, name)
        self._flush_neighbours(state, name)

    def set_master(self, ns: Namespace, name: str, bridge: str | None) -> None:
        state = self._state(ns)
        link = self._link(state, ns, name)
        if bridge is not None and self._link(state, ns, bridge).kind != "bridge":
            raise failure(errno.EOPNOTSUPP, f"set master of {name} to {bridge} in {where(ns)}")
        link.master = bridge

    def set_mtu(self, ns: Namespace, name: str, mtu: int) -> None:
        self._link(self._state(ns), ns, name).mtu = mtu

    def set_mac(self, ns: Namespace, name: str, mac: str) -> None:
        address = mac_text(mac)
        state = self._state(ns)
        link = self._link(state, ns, name)
        if not unicast_mac(address):
            raise failure(errno.EADDRNOTAVAIL, f"set address={address} on {name} in {where(ns)}")
        link.mac = address
        self._flush_neighbours(state, name)  # neigh_changeaddr, even for the same MAC

    # addresses

    def ensure_address(self, ns: Namespace, ifname: str, cidr: str) -> None:
        self.ensure_addresses(ns, ifname, [cidr])

    def delete_address(self, ns: Namespace, ifname: str, cidr: str) -> None:
        self.delete_addresses(ns, ifname, [cidr])

    def ensure_addresses(self, ns: Namespace, ifname: str, cidrs: Iterable[str]) -> None:
        wanted = [Address(ifname, str(ipaddress.ip_interface(cidr))) for cidr in cidrs]
        state = self._state(ns)
        self._link(state, ns, ifname)
        present = set(state.addresses)  # a set: a VIP leg holds thousands
        for address in wanted:
            if address not in present:
                state.addresses.append(address)
                present.add(address)

    def delete_addresses(self, ns: Namespace, ifname: str, cidrs: Iterable[str]) -> None:
        unwanted = {Address(ifname, str(ipaddress.ip_interface(cidr))) for cidr in cidrs}
        state = self._state(ns)
        had = any(a.ifname == ifname for a in state.addresses)
        state.addresses = [a for a in state.addresses if a not in unwanted]
        if had and not any(a.ifname == ifname for a in state.addresses):
            self._flush_routes(state, ifname)  # the kernel's fib_disable_ip

    def list_addresses(self, ns: Namespace, ifname: str | None = None) -> list[Address]:
        state = self._state(ns)
        order = {name: link.index for name, link in state.links.items()}
        found = [a for a in state.addresses if ifname is None or a.ifname == ifname]
        return sorted(found, key=lambda a: order[a.ifname])

    # routes

    def ensure_route(self, ns: Namespace, route: Route) -> None:
        state = self._state(ns)
        prefix, prefixlen = route_dst(route.dst)
        ifname = route.ifname
        if ifname is not None and not self._link(state, ns, ifname).up:
            raise failure(errno.ENETDOWN, route_what(ns, route))
        if route.gateway is not None:
            ifname = self._gateway_link(state, route.gateway, ifname)
            if ifname is None:
                raise failure(errno.ENETUNREACH, route_what(ns, route))
        if ifname is None:
            raise failure(errno.EINVAL, route_what(ns, route))
        dst = route_name(prefix, prefixlen)
        state.routes[(route.table, dst)] = Route(dst, route.gateway, ifname, route.table)

    def delete_route(self, ns: Namespace, route: Route) -> None:
        state = self._state(ns)
        key = (route.table, route_name(*route_dst(route.dst)))
        found = state.routes.get(key)
        if found is None:
            return
        if route.gateway not in (None, found.gateway) or route.ifname not in (None, found.ifname):
            return  # another route for that dst: the kernel answers ESRCH, a no-op
        del state.routes[key]

    def list_routes(self, ns: Namespace, table: int = MAIN_TABLE) -> list[Route]:
        routes = [r for (t, _), r in self._state(ns).routes.items() if t == table]

        def order(route: Route) -> tuple[int, int]:
            # The kernel dumps a table by prefix, shorter prefixes first.
            prefix, prefixlen = route_dst(route.dst)
            return prefixlen, int(ipaddress.IPv4Address(prefix))

        return sorted(routes, key=order)

    def read_namespace(self, ns: Namespace, routes: bool = True) -> NamespaceLinks:
        table = self.list_routes(ns) if routes else []
        return NamespaceLinks(self.list_links(ns), self.list_addresses(ns), table)

    # helpers

    def _of(self, space: FakeNamespace) -> NsLinks:
        state: NsLinks = space.part(PART, NsLinks)
        return state

    def _state(self, ns: Namespace) -> NsLinks:
        return links_in(self.world, ns)

    def _link(self, state: NsLinks, ns: Namespace, name: str) -> FakeLink:
        return link_in(state, ns, name)

    def _ensure_kind(
        self, state: NsLinks, ns: Namespace, name: str, kind: str, alias: str | None
    ) -> FakeLink | None:
        found = state.links.get(name)
        if found is not None and found.kind != kind:
            raise kind_clash(ns, name, found.kind, kind)
        if found is not None and found.alias != alias:
            raise alias_clash(ns, name, found.alias, alias)
        if found is None and kind in self.unsupported_kinds:
            raise failure(errno.EOPNOTSUPP, f"create {kind} {name} in {where(ns)}")
        if found is None and alias is not None and len(alias.encode()) > ALIAS_MAX:
            # The real layer sets the alias right after making the link, and deletes it again.
            raise failure(errno.ERANGE, f"set alias {alias!r} on {name} in {where(ns)}")
        return found

    def _add(self, ns: Namespace, state: NsLinks, link: FakeLink) -> None:
        link.index = next(state.indexes)
        n = next(self._macs)
        link.mac = f"02:00:00:{n >> 16 & 0xFF:02x}:{n >> 8 & 0xFF:02x}:{n & 0xFF:02x}"
        state.links[link.name] = link

    def _drop(self, ns: Namespace, state: NsLinks, link: FakeLink) -> None:
        """Remove a link and all that lives on it, as the kernel does on unregister."""
        del state.links[link.name]
        for port in state.links.values():
            if port.master == link.name:
                port.master = None
        state.addresses = [a for a in state.addresses if a.ifname != link.name]
        state.fdb = {k: e for k, e in state.fdb.items() if e.ifname != link.name}
        self._flush_neighbours(state, link.name)
        self._flush_routes(state, link.name)

    def _flush_routes(self, state: NsLinks, ifname: str) -> None:
        state.routes = {k: r for k, r in state.routes.items() if r.ifname != ifname}

    def _flush_neighbours(self, state: NsLinks, ifname: str) -> None:
        state.neighbours = {k: n for k, n in state.neighbours.items() if n.ifname != ifname}

    def _gateway_link(self, state: NsLinks, gateway: str, ifname: str | None) -> str | None:
        """The up device with a subnet holding gateway (ifname if given), else None."""
        ip = ipaddress.IPv4Address(gateway)
        for address in state.addresses:
            link = state.links[address.ifname]
            if ifname not in (None, link.name) or not link.up:
                continue
            if ip in ipaddress.IPv4Interface(address.cidr).network:
                return link.name
        return None

    def _namespace_deleted(self, name: str) -> None:
        """A namespace went: the veth ends elsewhere whose peer lived there go with it."""
        for ns, space in self.world.namespaces.items():
            state = self._of(space)
            for link in list(state.links.values()):
                if link.peer is not None and link.peer[0] == name:
                    self._drop(ns, state, link)
