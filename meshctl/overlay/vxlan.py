"""Overlay networks on this node: per overlay it takes part in, a VXLAN device on the network's
bridge and one static neighbour and FDB entry per remote endpoint (libnetwork's peerdb,
flannel's static entries: no multicast, no learning, no miss handlers).

Everything is derived from the view alone: a remote endpoint is a task of another node that is
up (or another node's load-balancer address, or an attached container) with an address on the
network; its MAC is derived from that address (kernel.links.mac_for, as every interface meshctl
makes on a network gets it), and its node's underlay address is in the node's record. The
device answers ARP for remote addresses from its neighbour table (proxy on) and sends each
frame to the node its FDB entry naming.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, replace

from kernel.links import Link, mac_for
from kernel.neighbours import FdbEntry, Neighbour
from kernel.system import Kernel
from meshctl import naming
from meshctl.model import Network
from meshctl.view import ClusterView

NODE = None  # the controller's own namespace
VXLAN_PORT = 4789
VXLAN_OVERHEAD = 50  # outer Ethernet (14) + IPv4 (20) + UDP (8) + VXLAN (8) headers
DEFAULT_MTU = 1500  # a bridge network's links, as Docker's


@dataclass(frozen=True)
class Underlay:
    """How this node reaches the others: its address, the MTU there, the VXLAN port."""

    address: str = ""  # "" when the node advertises none: it cannot take part in overlays
    mtu: int = DEFAULT_MTU
    port: int = VXLAN_PORT

    def mtu_of(self, network: Network) -> int:
        """The MTU of a network's bridge and interfaces on this node."""
        return self.mtu - VXLAN_OVERHEAD if network.overlay else DEFAULT_MTU


NO_UNDERLAY = Underlay()  # a node on its own: bridge networks only


@dataclass(frozen=True, order=True)
class Peer:
    """A remote endpoint of an overlay: its address and MAC on the network, and the underlay
    address of the node it is on (the VXLAN tunnel's far end)."""

    address: str
    mac: str
    vtep: str


@dataclass(frozen=True)
class OverlaySpec:
    """One overlay network's VXLAN device on this node and the peers it knows."""

    device: str
    vni: int
    local: str
    port: int
    mtu: int
    bridge: str  # the device is a port of it
    mark: str
    up: bool = True
    peers: frozenset[Peer] = frozenset()

    def neighbours(self) -> set[Neighbour]:
        return {Neighbour(self.device, p.address, p.mac) for p in self.peers if p.address}

    def fdb(self) -> set[FdbEntry]:
        return {FdbEntry(self.device, p.mac, p.vtep) for p in self.peers if p.vtep}


def remote_peers(view: ClusterView, network: Network, node: str) -> frozenset[Peer]:
    """Every endpoint on the network that lives on another node that advertises an address:
    tasks (whatever their state: a draining one still answers), load balancers, routers and
    attached containers.

    Down nodes too: a node whose lease ran out may only have lost the store, and its tasks
    still answer and its clients and load balancer still wait for replies; without its
    entries every reply to it is dropped until the heal (#27). Its entries go when its
    records do (its tasks removed, the node removed), as the data plane keeps its last state."""
    vteps = {name: n.address for name, n in view.nodes.items() if name != node and n.address}
    endpoints: list[tuple[str, str]] = []  # (address, node)
    endpoints += [
        (t.addresses[network.name], t.node)
        for t in view.tasks.values()
        if network.name in t.addresses and t.node in vteps
    ]
    endpoints += [
        (address, owner)
        for addresses in (view.lb_addresses, view.router_addresses)
        for (net, owner), address in addresses.items()
        if net == network.name and owner in vteps
    ]
    endpoints += [
        (c.address, c.node)
        for c in view.containers.values()
        if c.network == network.name and c.node in vteps and c.address
    ]
    return frozenset(Peer(address, mac_for(address), vteps[owner]) for address, owner in endpoints)


def desired_overlays(
    view: ClusterView, node: str, networks: Collection[Network], underlay: Underlay
) -> dict[str, OverlaySpec]:
    """The VXLAN device of every overlay among `networks` (those the node takes part in), by
    device name; none when the node advertises no underlay address."""
    if not underlay.address:
        return {}
    specs = [
        OverlaySpec(
            device=naming.vxlan(network.id),
            vni=network.vni,
            local=underlay.address,
            port=underlay.port,
            mtu=underlay.mtu_of(network),
            bridge=naming.bridge(network.id),
            mark=naming.mark(network.id),
            peers=remote_peers(view, network, node),
        )
        for network in networks
        if network.overlay
    ]
    return {spec.device: spec for spec in specs}


@dataclass(frozen=True)
class PeerChange:
    """The entries to write and remove on one device (neighbours after the device is up)."""

    device: str
    add: frozenset[Peer] = frozenset()
    remove_neighbours: frozenset[Neighbour] = frozenset()
    remove_fdb: frozenset[FdbEntry] = frozenset()


def plan_overlays(
    desired: Mapping[str, OverlaySpec], actual: Mapping[str, OverlaySpec]
) -> tuple[tuple[OverlaySpec, ...], tuple[PeerChange, ...], tuple[str, ...]]:
    """(devices to make or set right, entry changes, devices to delete). A device made or set
    right gets all its peers written again: a device that went down lost its neighbours."""
    ensure, changes = [], []
    for device, want in sorted(desired.items()):
        have = actual.get(device)
        if have is None or replace(have, peers=want.peers) != want:
            ensure.append(want)
            have = replace(want, peers=frozenset()) if have is None else have
        neighbours = want.neighbours() - have.neighbours() if have.up else want.neighbours()
        fdb = want.fdb() - have.fdb()
        add = frozenset(
            p for p in want.peers
            if Neighbour(device, p.address, p.mac) in neighbours
            or FdbEntry(device, p.mac, p.vtep) in fdb
        )  # fmt: skip
        gone_n = frozenset(have.neighbours() - want.neighbours())
        gone_f = frozenset(have.fdb() - want.fdb())
        if add or gone_n or gone_f:
            changes.append(PeerChange(device, add, gone_n, gone_f))
    delete = tuple(sorted(set(actual) - set(desired)))
    return tuple(ensure), tuple(changes), delete


# -- the kernel ------------------------------------------------------------------------------


def underlay_of(kernel: Kernel, address: str, port: int = VXLAN_PORT) -> Underlay:
    """This node's underlay: the MTU of the interface holding its advertised address."""
    for held in kernel.links.list_addresses(NODE):
        if address and held.cidr.split("/")[0] == address:
            link = kernel.links.get_link(NODE, held.ifname)
            if link is not None:
                return Underlay(address, link.mtu, port)
    return Underlay(address, DEFAULT_MTU, port)


def observe_overlays(
    kernel: Kernel, devices: Iterable[Link], known: Mapping[str, OverlaySpec] | None = None
) -> dict[str, OverlaySpec]:
    """The VXLAN devices given (meshctl's marked links of the node) as they are, with their
    entries; a device listed in `known` is taken to hold the entries it says, unread (the
    controller passes what it saw converged since its last full observe)."""
    known = known or {}
    found: dict[str, OverlaySpec] = {}
    for link in devices:
        name = link.name
        if link.vxlan is None or link.alias is None:
            continue
        if name in known:
            peers = known[name].peers
        else:
            neighbours = {n.address: n.mac for n in kernel.neighbours.list_neighbours(NODE, name)}
            fdb = {e.mac: e.dst for e in kernel.neighbours.list_fdb(NODE, name)}
            listed = {Peer(a, mac, fdb.get(mac, "")) for a, mac in neighbours.items()}
            known_macs = set(neighbours.values())
            listed |= {Peer("", mac, dst) for mac, dst in fdb.items() if mac not in known_macs}
            peers = frozenset(listed)
        found[name] = OverlaySpec(
            device=name,
            vni=link.vxlan.vni,
            local=link.vxlan.local or "",
            port=link.vxlan.port,
            mtu=link.mtu,
            bridge=link.master or "",
            mark=link.alias,
            up=link.up,
            peers=peers,
        )
    return found


def ensure_overlay(kernel: Kernel, spec: OverlaySpec) -> None:
    """The device as the spec says: made (or its settings and MTU set), a port of the bridge,
    up. A device of that name with other VXLAN settings is deleted first: it is meshctl's
    (the caller checked its mark) and a device's VNI or port cannot change in place."""
    existing = kernel.links.get_link(NODE, spec.device)
    if existing is not None and existing.vxlan is not None and existing.alias == spec.mark:
        info = existing.vxlan
        if (info.vni, info.port, info.local or "") != (spec.vni, spec.port, spec.local):
            kernel.links.delete_link(NODE, spec.device)
    kernel.links.ensure_vxlan(
        NODE, spec.device, spec.vni, local=spec.local, port=spec.port, mtu=spec.mtu,
        alias=spec.mark,
    )  # fmt: skip
    kernel.links.set_master(NODE, spec.device, spec.bridge)
    kernel.links.set_up(NODE, spec.device)


def apply_peers(kernel: Kernel, change: PeerChange) -> None:
    """Old entries out, new ones in: FDB first, so a neighbour never points nowhere."""
    if change.remove_neighbours:
        kernel.neighbours.delete_neighbours(NODE, change.remove_neighbours)
    if change.remove_fdb:
        kernel.neighbours.delete_fdb_entries(NODE, change.remove_fdb)
    entries = [FdbEntry(change.device, p.mac, p.vtep) for p in sorted(change.add)]
    if entries:
        kernel.neighbours.ensure_fdb_entries(NODE, entries)
        neighbours = [Neighbour(change.device, p.address, p.mac) for p in sorted(change.add)]
        kernel.neighbours.ensure_neighbours(NODE, neighbours)


# -- is the overlay up? ----------------------------------------------------------------------


@dataclass(frozen=True)
class PeerProbe:
    """One overlay path to check: from this node's LB namespace on a network to a peer node's
    load-balancer address there, over VXLAN (UDP `port` between the two underlay addresses)."""

    network: str
    peer: str  # the peer node's name
    netns: str  # this node's LB namespace on the network
    address: str  # the peer's LB address on the network
    local: str
    remote: str
    port: int


def peer_probes(view: ClusterView, node: str, node_id: str, underlay: Underlay) -> list[PeerProbe]:
    """Every (overlay network, peer node) pair that should carry traffic now: both nodes take
    part in the network and hold a load-balancer address on it, and the peer is up."""
    probes = []
    for network in sorted(view.networks.values(), key=lambda n: n.name):
        if not network.overlay or (network.name, node) not in view.lb_addresses:
            continue
        for (net, peer), address in sorted(view.lb_addresses.items()):
            other = view.nodes.get(peer)
            if net != network.name or peer == node or other is None or not view.up(peer):
                continue
            probes.append(
                PeerProbe(network.name, peer, naming.lb_netns(node_id, network.id), address,
                          underlay.address, other.address, underlay.port)
            )  # fmt: skip
    return probes
