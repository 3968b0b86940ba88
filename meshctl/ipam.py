"""IP address management: subnets for networks, and addresses inside each network.

Every allocated value is claimed by a store key written in the same transaction as the object
that uses it, so two CLIs or controllers racing can never both win (on SQLite and on etcd):
- an address: kind "address", named `<network-id>/<address>`, value its owner; creating it
  expects it absent, releasing it expects the revision read;
- a subnet: overlap is not equality, so one registry record (kind "registry", name "subnets")
  lists every network's subnet, and creating or removing a network compare-and-swaps on it.
Beside the claims, one record per network (kind "ipam", named by the network id) keeps its
gateway and where the last allocation stopped: addresses are handed out in order after it,
wrapping around, so a released address is not reused at once (stale ARP and conntrack entries).
Every allocation also checks the network record, so it cannot land on a network being removed.

A network keeps one address free per known node for that node's load balancer (at least one):
a task or VIP that would take the last such address is refused, so a full network never stops
a node's load balancer (or the controller) from working.

The arithmetic is pure functions of an IpamState; the store-bound helpers load a network's
state (StoredIpam) and turn a changed state into txn ops (commit_ops).

The default pool for networks without --subnet is 10.10.0.0/16 carved into /24s; set
MESHCTL_ADDRESS_POOL and MESHCTL_POOL_PREFIX (or pass pool/prefix to
meshctl.commands.network.create_network) to change it.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from meshctl.model import (
    NETWORK,
    NODE,
    MeshctlError,
    Network,
    NotFoundError,
    ValidationError,
    check_not_reserved,
)
from meshctl.store import Check, Delete, Op, Put, Snapshot, Store, retry_conflicts

KIND = "ipam"
ADDRESS = "address"
REGISTRY = "registry"
SUBNETS = "subnets"
DEFAULT_POOL = "10.10.0.0/16"
DEFAULT_PREFIX = 24
POOL_ENV = "MESHCTL_ADDRESS_POOL"
PREFIX_ENV = "MESHCTL_POOL_PREFIX"
LB_OWNER_PREFIX = "lb:"
ROUTER_OWNER_PREFIX = "router:"  # a node's HTTP router, on each network it joins


class AddressExhausted(MeshctlError):
    """No free address (or subnet) is left; nothing was written."""


def vip_owner(service_id: str) -> str:
    return f"vip:{service_id}"


def task_owner(task_id: str) -> str:
    return f"task:{task_id}"


def container_owner(container_id: str) -> str:
    return f"container:{container_id}"


def lb_owner(node: str) -> str:
    return f"{LB_OWNER_PREFIX}{node}"


def router_owner(node: str) -> str:
    return f"{ROUTER_OWNER_PREFIX}{node}"


def address_key(network_id: str, address: str) -> str:
    """The claim key's name of an address on a network."""
    return f"{network_id}/{address}"


@dataclass(frozen=True)
class IpamState:
    """The addresses of one network: gateway reserved, allocations address → owner."""

    network: str
    subnet: str
    gateway: str
    allocations: dict[str, str] = field(default_factory=dict)
    last: str = ""  # the last address handed out; the next search starts after it

    @classmethod
    def new(cls, network: Network) -> IpamState:
        """Fresh state for a network: the gateway is the subnet's first host."""
        net = ipaddress.IPv4Network(network.subnet)
        gateway = str(net.network_address + 1)
        return cls(network.name, network.subnet, gateway, {}, gateway)

    def owner_address(self, owner: str) -> str | None:
        """The address owner holds, if any."""
        return next((a for a, o in self.allocations.items() if o == owner), None)

    def lb_count(self) -> int:
        return sum(owner.startswith(LB_OWNER_PREFIX) for owner in self.allocations.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "network": self.network,
            "subnet": self.subnet,
            "gateway": self.gateway,
            "allocations": dict(self.allocations),
            "last": self.last,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IpamState:
        allocations = dict(data.get("allocations", {}))
        return cls(data["network"], data["subnet"], data["gateway"], allocations, data["last"])

    def meta(self) -> dict[str, Any]:
        """What the network's ipam record keeps (the allocations are claim keys)."""
        return {k: v for k, v in self.to_dict().items() if k != "allocations"}


def allocate(
    state: IpamState, owner: str, what: str = "", reserve: int = 0
) -> tuple[IpamState, str]:
    """Give owner an address (the one it holds already, if any): new state and the address.

    reserve: addresses that must stay free for load balancers (ignored for a load balancer's
    own allocation). Raise AddressExhausted naming the network and `what` needed it when the
    subnet is full.
    """
    held = state.owner_address(owner)
    if held is not None:
        return state, held
    net = ipaddress.IPv4Network(state.subnet)
    first, last = int(net.network_address) + 1, int(net.broadcast_address) - 1
    size = last - first + 1
    taken = set(state.allocations) | {state.gateway}
    free = size - len(taken)
    kept = 0 if owner.startswith(LB_OWNER_PREFIX) else reserve
    if free > kept:
        start = int(ipaddress.IPv4Address(state.last or state.gateway)) + 1
        for step in range(size):
            candidate = str(ipaddress.IPv4Address(first + (start - first + step) % size))
            if candidate not in taken:
                allocations = dict(state.allocations)
                allocations[candidate] = owner
                return replace(state, allocations=allocations, last=candidate), candidate
    kept_note = f", {kept} kept for the nodes' load balancers" if kept else ""
    raise AddressExhausted(
        f"network {state.network} ({state.subnet}) has no free address"
        f"{' for ' + what if what else ''}: {len(state.allocations)} of {size - 1} are in use"
        f"{kept_note}; create the service on a network with a larger --subnet, or use fewer "
        "replicas"
    )


def release(state: IpamState, owners: Iterable[str]) -> IpamState:
    """State with every address of the given owners freed (unknown owners are ignored)."""
    gone = set(owners)
    allocations = {a: o for a, o in state.allocations.items() if o not in gone}
    return replace(state, allocations=allocations)


def lb_reserve(state: IpamState, nodes: int) -> int:
    """Addresses still to keep free for load balancers: one per node (at least one) that has
    none on this network yet."""
    return max(0, max(1, nodes) - state.lb_count())


# -- subnets -----------------------------------------------------------------------------------


class Subnetted(Protocol):
    """Anything with a name and a subnet: a Network, or a registry entry."""

    @property
    def name(self) -> str: ...
    @property
    def subnet(self) -> str: ...


@dataclass(frozen=True)
class SubnetEntry:
    name: str
    subnet: str


def configured_pool(pool: str | None = None, prefix: int | None = None) -> tuple[str, int]:
    """The default pool and per-network prefix: arguments, else environment, else defaults."""
    chosen_pool = pool or os.environ.get(POOL_ENV) or DEFAULT_POOL
    raw_prefix = prefix if prefix is not None else os.environ.get(PREFIX_ENV, DEFAULT_PREFIX)
    try:
        net = ipaddress.IPv4Network(chosen_pool)
        size = int(raw_prefix)
    except ValueError:
        raise ValidationError(
            f"invalid address pool {chosen_pool!r}/{raw_prefix!r} (${POOL_ENV}, ${PREFIX_ENV}): "
            "use an IPv4 CIDR like 10.10.0.0/16 and a prefix length like 24"
        ) from None
    check_not_reserved(str(net), f"address pool (${POOL_ENV}) {net}")
    if not net.prefixlen <= size <= 29:
        raise ValidationError(
            f"invalid pool prefix /{size} for pool {net} (${PREFIX_ENV}): use a length from "
            f"{net.prefixlen} to 29"
        )
    return str(net), size


def overlapping(subnet: str, networks: Iterable[Subnetted]) -> Subnetted | None:
    """The first network whose subnet overlaps `subnet`, if any."""
    wanted = ipaddress.IPv4Network(subnet)
    return next((n for n in networks if wanted.overlaps(ipaddress.IPv4Network(n.subnet))), None)


def pick_subnet(pool: str, prefix: int, networks: Iterable[Subnetted]) -> str:
    """The first /prefix of the pool that overlaps no existing network."""
    taken = [ipaddress.IPv4Network(n.subnet) for n in networks]
    for candidate in ipaddress.IPv4Network(pool).subnets(new_prefix=prefix):
        if not any(candidate.overlaps(t) for t in taken):
            return str(candidate)
    raise AddressExhausted(
        f"the address pool {pool} has no free /{prefix} left: remove a network, give --subnet, "
        f"or set ${POOL_ENV} to a larger pool"
    )


@dataclass(frozen=True)
class SubnetRegistry:
    """Every network's subnet by network id, and the registry record's revision (0: absent)."""

    entries: dict[str, SubnetEntry]
    revision: int

    def with_network(self, network: Network) -> Op:
        entries = {**self.entries, network.id: SubnetEntry(network.name, network.subnet)}
        return self._put(entries)

    def without(self, network_id: str) -> Op:
        return self._put({k: v for k, v in self.entries.items() if k != network_id})

    def _put(self, entries: Mapping[str, SubnetEntry]) -> Op:
        value = {k: {"name": v.name, "subnet": v.subnet} for k, v in entries.items()}
        return Put(REGISTRY, SUBNETS, {"networks": value}, expect=self.revision)


def load_registry(store: Store) -> SubnetRegistry:
    """The subnet registry; a store from before it existed gets one made from its networks."""
    record = store.get(REGISTRY, SUBNETS)
    if record is not None:
        entries = {
            network_id: SubnetEntry(entry["name"], entry["subnet"])
            for network_id, entry in record.value["networks"].items()
        }
        return SubnetRegistry(entries, record.mod_revision)
    networks = [Network.from_dict(r.value) for r in store.list(NETWORK)]
    return SubnetRegistry({n.id: SubnetEntry(n.name, n.subnet) for n in networks}, 0)


# -- a network's addresses in the store --------------------------------------------------------


@dataclass(frozen=True)
class StoredIpam:
    """A network's addresses as read: the state, and what a commit must compare against."""

    network: Network
    network_revision: int
    state: IpamState
    claims: dict[str, tuple[str, int]]  # address → (owner, claim key's mod_revision)
    legacy: bool  # the ipam record still holds allocations (written before claim keys)


def load(store: Store, network: Network) -> StoredIpam:
    """The network's IPAM state with its claims' revisions; NotFoundError if it is gone."""
    record = store.get(NETWORK, network.name)
    if record is None or record.value.get("id") != network.id:
        raise NotFoundError(
            f"network {network.name} not found; list networks with: meshctl network ls"
        )
    meta = store.get(KIND, network.id)
    state = IpamState.from_dict(meta.value) if meta else IpamState.new(network)
    claims = {
        r.name.partition("/")[2]: (str(r.value["owner"]), r.mod_revision)
        for r in store.list(ADDRESS, f"{network.id}/")
    }
    allocations = {**state.allocations, **{a: owner for a, (owner, _) in claims.items()}}
    legacy = bool(state.allocations)
    return StoredIpam(
        network, record.mod_revision, replace(state, allocations=allocations), claims, legacy
    )


def commit_ops(stored: StoredIpam, new: IpamState) -> list[Op]:
    """The txn ops that take the stored state to `new`: claims made, changed and released, the
    ipam record when its hint moved, and a check that the network is still the one read."""
    network = stored.network
    ops: list[Op] = [Check(NETWORK, network.name, stored.network_revision)]
    for address, owner in sorted(new.allocations.items()):
        held = stored.claims.get(address)
        if held is None or held[0] != owner:
            claim = {"owner": owner, "network": network.name}
            expect = held[1] if held else 0
            ops.append(Put(ADDRESS, address_key(network.id, address), claim, expect=expect))
    for address, (_, revision) in sorted(stored.claims.items()):
        if address not in new.allocations:
            ops.append(Delete(ADDRESS, address_key(network.id, address), expect=revision))
    if stored.legacy or new.last != stored.state.last:
        # A hint, written unconditionally: two allocations racing for the same address
        # conflict on its claim key, not here.
        ops.append(Put(KIND, network.id, new.meta()))
    return ops


def node_count(store: Store) -> int:
    return len(store.list(NODE))


def allocate_node_address(store: Store, network: Network, owner: str, what: str) -> str:
    """The address a node's own endpoint (`owner`: its load balancer, its router) holds on
    `network`, allocated and stored on first call."""

    def attempt() -> str:
        stored = load(store, network)
        state, address = allocate(stored.state, owner, what)
        if state is not stored.state:
            store.txn(commit_ops(stored, state))
        return address

    return retry_conflicts(attempt, f"allocating an address on network {network.name}")


def release_node_address(store: Store, network: Network, owner: str) -> None:
    """Free the address `owner` holds on `network` (a node left, its router left)."""

    def attempt() -> None:
        stored = load(store, network)
        if stored.state.owner_address(owner) is not None:
            store.txn(commit_ops(stored, release(stored.state, [owner])))

    retry_conflicts(attempt, f"releasing an address on network {network.name}")


def allocate_lb_address(store: Store, network: Network, node: str) -> str:
    """The load-balancer address of `node` on `network`, allocated and stored on first call."""
    return allocate_node_address(store, network, lb_owner(node), f"the load balancer of {node}")


def release_lb_address(store: Store, network: Network, node: str) -> None:
    """Free the load-balancer address of `node` on `network` (a node left)."""
    release_node_address(store, network, lb_owner(node))


# -- what a controller reads -------------------------------------------------------------------


def gateways(snapshot: Snapshot) -> dict[str, str]:
    """Network name → its gateway address."""
    return {r.value["network"]: r.value["gateway"] for r in snapshot.of(KIND)}


def lb_addresses(snapshot: Snapshot) -> dict[tuple[str, str], str]:
    """(network name, node) → that node's load-balancer address on the network."""
    return node_addresses(snapshot, LB_OWNER_PREFIX)


def router_addresses(snapshot: Snapshot) -> dict[tuple[str, str], str]:
    """(network name, node) → that node's router address on the network."""
    return node_addresses(snapshot, ROUTER_OWNER_PREFIX)


def node_addresses(snapshot: Snapshot, prefix: str) -> dict[tuple[str, str], str]:
    """(network name, node) → the address of the node's endpoint whose owners start with
    `prefix` (a load balancer's, a router's)."""
    found: dict[tuple[str, str], str] = {}
    for record in snapshot.of(KIND):  # ipam records written before claim keys
        for address, owner in record.value.get("allocations", {}).items():
            if owner.startswith(prefix):
                found[(record.value["network"], owner.removeprefix(prefix))] = address
    for record in snapshot.of(ADDRESS):
        owner = str(record.value["owner"])
        if owner.startswith(prefix):
            address = record.name.partition("/")[2]
            found[(record.value["network"], owner.removeprefix(prefix))] = address
    return found
