"""The desired load balancer of one network on one node: its namespace, leg, address and VIPs.

Pure. Like Docker swarm, a VIP balances every port and protocol: each backend (meshctl.lb.ipvs,
.nftables, .iptables) turns an `LbSpec` into its own kernel objects, which balance VIP traffic to
backend:same-port and source-NAT it to the node's LB address so replies come back through the
LB namespace (client and backend share the bridge).
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
from dataclasses import dataclass

from kernel.links import mac_for
from meshctl import naming
from meshctl.naming import lb_netns, lb_node_end


@functools.lru_cache(maxsize=1 << 18)  # every pass names every chain again: hash each name once
def short_id(*parts: str) -> str:
    """A stable 16-character id for the names of a backend's chains (28 characters at most with
    an iptables prefix)."""
    # 64 bits of SHA-256 in hex: base64's base32 is pure Python and cost 11 us a name.
    return hashlib.sha256("/".join(parts).encode()).hexdigest()[:16].upper()


@functools.lru_cache(maxsize=1 << 18)  # specs are rebuilt every pass from the same addresses
def _parsed(value: str) -> tuple[str, int]:
    """An IPv4 address as its canonical text and its integer (ValueError if it is not one)."""
    address = ipaddress.IPv4Address(value)
    return str(address), int(address)


@functools.lru_cache(maxsize=1024)
def _interface(cidr: str) -> ipaddress.IPv4Interface:
    return ipaddress.IPv4Interface(cidr)


def as_int(address: str) -> int:
    return _parsed(address)[1]


def _ipv4(value: str, what: str) -> str:
    try:
        return _parsed(value)[0]
    except ValueError:
        raise ValueError(
            f"{what} {value!r} is not an IPv4 address; give one like 10.0.1.5"
        ) from None


@dataclass(frozen=True)
class Backend:
    """One task of a service on this network; weight 0 drains it (no new connections)."""

    address: str
    weight: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "address", _ipv4(self.address, "backend address"))
        if self.weight not in (0, 1):
            raise ValueError(f"backend {self.address} weight {self.weight}: use 1, or 0 to drain")


@dataclass(frozen=True)
class VirtualIp:
    """A service's VIP on this network and its backends (kept sorted by address)."""

    service_id: str
    service_name: str
    vip: str
    backends: tuple[Backend, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "vip", _ipv4(self.vip, f"VIP of service {self.service_name}"))
        backends = tuple(sorted(self.backends, key=lambda b: as_int(b.address)))
        addresses = [b.address for b in backends]
        if len(set(addresses)) != len(addresses):
            raise ValueError(
                f"service {self.service_name}: a backend address is listed twice ({addresses}); "
                "give each task's address once"
            )
        object.__setattr__(self, "backends", backends)

    @property
    def active(self) -> tuple[Backend, ...]:
        """The backends that take new connections."""
        return tuple(b for b in self.backends if b.weight > 0)

    @property
    def comment(self) -> str:
        return f"meshctl:{self.service_id}"


@dataclass(frozen=True)
class LbSpec:
    """The load balancer of one network on one node: its namespace, leg, address and VIPs."""

    netns: str
    network_id: str
    bridge: str
    node_end: str
    lb_address_cidr: str  # the node's LB address of this network with the subnet's prefix
    vips: tuple[VirtualIp, ...] = ()
    mtu: int = 1500  # of the leg: an overlay's is the underlay's less the VXLAN headers

    def __post_init__(self) -> None:
        if not self.netns.startswith(naming.LB_NETNS_PREFIX):
            raise ValueError(
                f"LB namespace {self.netns!r} must start with {naming.LB_NETNS_PREFIX}"
            )
        subnet = self.subnet
        if subnet.prefixlen < 8 or subnet.prefixlen > 30:
            raise ValueError(f"network {self.network_id} subnet {subnet}: use a /8 to /30")
        vips = tuple(sorted(self.vips, key=lambda v: as_int(v.vip)))
        seen = [v.vip for v in vips]
        if len(set(seen)) != len(seen):
            raise ValueError(f"network {self.network_id}: two services share a VIP ({seen})")
        first, last = int(subnet.network_address), int(subnet.broadcast_address)
        for vip in vips:
            if not first <= as_int(vip.vip) <= last:
                raise ValueError(
                    f"VIP {vip.vip} of service {vip.service_name} is outside the network's subnet "
                    f"{subnet}; allocate it from the network's IPAM"
                )
        object.__setattr__(self, "vips", vips)

    @property
    def mac(self) -> str:
        """The leg's MAC inside, derived from the LB address: the peers of an overlay know it
        from the store alone (replies to this node's source-NATed flows come to it)."""
        return mac_for(self.lb_address_cidr.split("/")[0])

    @property
    def subnet(self) -> ipaddress.IPv4Network:
        return _interface(self.lb_address_cidr).network

    @property
    def lb_address(self) -> str:
        return str(_interface(self.lb_address_cidr).ip)

    @property
    def comment(self) -> str:
        """The comment of the rules that belong to the LB itself rather than to one service."""
        return f"meshctl:lb-{self.network_id}"

    @property
    def mark(self) -> str:
        """The alias of the leg's node end (and the bridge's): the network's mark."""
        return naming.mark(self.network_id)


def lb_spec(
    node_id: str,
    network_id: str,
    lb_address_cidr: str,
    vips: tuple[VirtualIp, ...],
    mtu: int = 1500,
) -> LbSpec:
    """The spec of a network's LB on a node, with every name derived from the two ids."""
    return LbSpec(
        netns=lb_netns(node_id, network_id),
        network_id=network_id,
        bridge=naming.bridge(network_id),
        node_end=lb_node_end(network_id),
        lb_address_cidr=str(ipaddress.IPv4Interface(lb_address_cidr)),
        vips=vips,
        mtu=mtu,
    )


def addresses(spec: LbSpec) -> frozenset[str]:
    """The CIDRs of the LB leg: the LB address, and each VIP as a /32 so the leg answers ARP."""
    return frozenset({spec.lb_address_cidr, *(f"{v.vip}/32" for v in spec.vips)})
