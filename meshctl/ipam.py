"""IP address management: subnets for networks, and addresses inside each network.

One store record per network (kind "ipam", named by the network id) holds who owns which
address, so allocations compare-and-swap on that record. The arithmetic is pure functions of
an IpamState; the store-bound helpers at the bottom are for the controller (load-balancer
addresses when a node joins). Addresses are handed out in order after the last one given,
wrapping around, so a released address is not reused at once (stale ARP and conntrack entries).

The default pool for networks without --subnet is 10.10.0.0/16 carved into /24s; set
MESHCTL_ADDRESS_POOL and MESHCTL_POOL_PREFIX (or pass pool/prefix to meshctl.ops) to change it.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from meshctl.model import NETWORK, MeshctlError, Network, NotFoundError, ValidationError
from meshctl.store import Conflict, Put, Store

KIND = "ipam"
DEFAULT_POOL = "10.10.0.0/16"
DEFAULT_PREFIX = 24
POOL_ENV = "MESHCTL_ADDRESS_POOL"
PREFIX_ENV = "MESHCTL_POOL_PREFIX"
_CAS_ATTEMPTS = 20
T = TypeVar("T")


class AddressExhausted(MeshctlError):
    """No free address (or subnet) is left; nothing was written."""


def vip_owner(service_id: str) -> str:
    return f"vip:{service_id}"


def task_owner(task_id: str) -> str:
    return f"task:{task_id}"


def container_owner(container_id: str) -> str:
    return f"container:{container_id}"


def lb_owner(node: str) -> str:
    return f"lb:{node}"


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
        allocations = dict(data["allocations"])
        return cls(data["network"], data["subnet"], data["gateway"], allocations, data["last"])


def allocate(state: IpamState, owner: str, what: str = "") -> tuple[IpamState, str]:
    """Give owner an address (the one it holds already, if any): new state and the address.

    Raise AddressExhausted naming the network and `what` needed it when the subnet is full.
    """
    held = state.owner_address(owner)
    if held is not None:
        return state, held
    net = ipaddress.IPv4Network(state.subnet)
    first, last = int(net.network_address) + 1, int(net.broadcast_address) - 1
    size = last - first + 1
    start = int(ipaddress.IPv4Address(state.last or state.gateway)) + 1
    taken = set(state.allocations) | {state.gateway}
    for step in range(size):
        candidate = str(ipaddress.IPv4Address(first + (start - first + step) % size))
        if candidate not in taken:
            allocations = dict(state.allocations)
            allocations[candidate] = owner
            return replace(state, allocations=allocations, last=candidate), candidate
    raise AddressExhausted(
        f"network {state.network} ({state.subnet}) has no free address"
        f"{' for ' + what if what else ''}: {len(state.allocations)} of {size - 1} are in use; "
        "create the service on a network with a larger --subnet, or use fewer replicas"
    )


def release(state: IpamState, owners: Iterable[str]) -> IpamState:
    """State with every address of the given owners freed (unknown owners are ignored)."""
    gone = set(owners)
    allocations = {a: o for a, o in state.allocations.items() if o not in gone}
    return replace(state, allocations=allocations)


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
    if not net.prefixlen <= size <= 29:
        raise ValidationError(
            f"invalid pool prefix /{size} for pool {net} (${PREFIX_ENV}): use a length from "
            f"{net.prefixlen} to 29"
        )
    return str(net), size


def overlapping(subnet: str, networks: Iterable[Network]) -> Network | None:
    """The first network whose subnet overlaps `subnet`, if any."""
    wanted = ipaddress.IPv4Network(subnet)
    return next((n for n in networks if wanted.overlaps(ipaddress.IPv4Network(n.subnet))), None)


def pick_subnet(pool: str, prefix: int, networks: Iterable[Network]) -> str:
    """The first /prefix of the pool that overlaps no existing network."""
    taken = [ipaddress.IPv4Network(n.subnet) for n in networks]
    for candidate in ipaddress.IPv4Network(pool).subnets(new_prefix=prefix):
        if not any(candidate.overlaps(t) for t in taken):
            return str(candidate)
    raise AddressExhausted(
        f"the address pool {pool} has no free /{prefix} left: remove a network, give --subnet, "
        f"or set ${POOL_ENV} to a larger pool"
    )


def load(store: Store, network: Network) -> tuple[IpamState, int]:
    """The network's IPAM state and its record's mod_revision (0 = not stored yet)."""
    record = store.get(KIND, network.id)
    if record is None:
        return IpamState.new(network), 0
    return IpamState.from_dict(record.value), record.mod_revision


def _network(store: Store, name: str) -> Network:
    record = store.get(NETWORK, name)
    if record is None:
        raise NotFoundError(f"network {name} not found; list networks with: meshctl network ls")
    return Network.from_dict(record.value)


def retry_conflicts(attempt: Callable[[], T], what: str) -> T:
    """Run a read-compute-txn attempt again while another writer wins the compare-and-swap."""
    for _ in range(_CAS_ATTEMPTS):
        try:
            return attempt()
        except Conflict:
            continue
    raise MeshctlError(f"{what}: the store kept changing meanwhile; try again")


def allocate_lb_address(store: Store, network: str, node: str) -> str:
    """The load-balancer address of `node` on `network`, allocated and stored on first call."""

    def attempt() -> str:
        net = _network(store, network)
        state, revision = load(store, net)
        new_state, address = allocate(state, lb_owner(node), f"the load balancer of node {node}")
        if new_state is not state:
            store.txn([Put(KIND, net.id, new_state.to_dict(), expect=revision)])
        return address

    return retry_conflicts(attempt, f"allocating an address on network {network}")


def release_lb_address(store: Store, network: str, node: str) -> None:
    """Free the load-balancer address of `node` on `network` (a node left)."""

    def attempt() -> None:
        net = _network(store, network)
        state, revision = load(store, net)
        if state.owner_address(lb_owner(node)) is not None:
            new_state = release(state, [lb_owner(node)])
            store.txn([Put(KIND, net.id, new_state.to_dict(), expect=revision)])

    retry_conflicts(attempt, f"releasing an address on network {network}")
