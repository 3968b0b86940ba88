"""The desired load balancer of one network on one node, and the kernel objects it becomes.

Pure: an `LbSpec` (the network's VIPs with their backends) turns into the addresses of the LB
namespace's leg, its iptables tables, its IPVS services and its sysctls. Like Docker swarm, a VIP
balances every port and protocol: VIP traffic is balanced to backend:same-port (by IPVS on the
VIP's own fwmark, or by nat rules) and source-NATed to the node's LB address so replies come
back through the LB namespace (client and backend share the bridge).
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from kernel.iptables_rules import Match, OwnedTable, Rule, opts
from kernel.ipvs import Destination, VirtualService
from kernel.links import mac_for
from meshctl.controller import names
from meshctl.controller.names import lb_netns, lb_node_end

BackendKind = Literal["ipvs", "iptables"]
BACKENDS: tuple[BackendKind, ...] = ("ipvs", "iptables")

# meshctl's fwmark range: 'M' in the top byte, the VIP's offset in its subnet below.
FWMARK_BASE = 0x4D000000
FWMARK_MASK = 0xFF000000

MARK_CHAIN = "MESH-MARK"
REFUSE_CHAIN = "MESH-REFUSE"
SERVICES_CHAIN = "MESH-SERVICES"
POSTROUTING_CHAIN = "MESH-POSTROUTING"
SVC_CHAIN_PREFIX = "MESH-SVC-"
SEP_CHAIN_PREFIX = "MESH-SEP-"
# The VIPs of one /24 of the subnet, one rule each, reached from MESH-SERVICES (iptables backend)
# or MESH-MARK (ipvs backend) by one rule per block: see _by_block.
SERVICES_BLOCK_PREFIX = "MESH-VIPS-"
MARK_BLOCK_PREFIX = "MESH-MARKS-"
BLOCK_PREFIXLEN = 24


@functools.lru_cache(maxsize=1 << 18)  # every pass names every chain again: hash each name once
def _short(*parts: str) -> str:
    """A stable 16-character id for chain names (28 characters at most with their prefix)."""
    # 64 bits of SHA-256 in hex: base64's base32 is pure Python and cost 11 us a name.
    return hashlib.sha256("/".join(parts).encode()).hexdigest()[:16].upper()


def svc_chain(vip: VirtualIp) -> str:
    return f"{SVC_CHAIN_PREFIX}{_short(vip.service_id, vip.vip)}"


def sep_chain(vip: VirtualIp, backend: Backend) -> str:
    return f"{SEP_CHAIN_PREFIX}{_short(vip.service_id, vip.vip, backend.address)}"


@functools.lru_cache(maxsize=1 << 18)  # specs are rebuilt every pass from the same addresses
def _parsed(value: str) -> tuple[str, int]:
    """An IPv4 address as its canonical text and its integer (ValueError if it is not one)."""
    address = ipaddress.IPv4Address(value)
    return str(address), int(address)


@functools.lru_cache(maxsize=1024)
def _interface(cidr: str) -> ipaddress.IPv4Interface:
    return ipaddress.IPv4Interface(cidr)


def _as_int(address: str) -> int:
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
        backends = tuple(sorted(self.backends, key=lambda b: _as_int(b.address)))
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
        if not self.netns.startswith(names.LB_NETNS_PREFIX):
            raise ValueError(f"LB namespace {self.netns!r} must start with {names.LB_NETNS_PREFIX}")
        subnet = self.subnet
        if subnet.prefixlen < 8 or subnet.prefixlen > 30:
            raise ValueError(f"network {self.network_id} subnet {subnet}: use a /8 to /30")
        vips = tuple(sorted(self.vips, key=lambda v: _as_int(v.vip)))
        seen = [v.vip for v in vips]
        if len(set(seen)) != len(seen):
            raise ValueError(f"network {self.network_id}: two services share a VIP ({seen})")
        first, last = int(subnet.network_address), int(subnet.broadcast_address)
        for vip in vips:
            if not first <= _as_int(vip.vip) <= last:
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
        return names.mark(self.network_id)

    def fwmark(self, vip: VirtualIp) -> int:
        """The VIP's mark: stable, unique within the network, inside meshctl's fwmark range."""
        offset = _as_int(vip.vip) - int(self.subnet.network_address)
        return FWMARK_BASE | offset


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
        bridge=names.bridge(network_id),
        node_end=lb_node_end(network_id),
        lb_address_cidr=str(ipaddress.IPv4Interface(lb_address_cidr)),
        vips=vips,
        mtu=mtu,
    )


def addresses(spec: LbSpec) -> frozenset[str]:
    """The CIDRs of the LB leg: the LB address, and each VIP as a /32 so the leg answers ARP."""
    return frozenset({spec.lb_address_cidr, *(f"{v.vip}/32" for v in spec.vips)})


@functools.lru_cache(maxsize=256)
def take_turns(left: int) -> tuple[Match, ...]:
    """The match of a service chain's rule with `left` backends from it to the last: it takes
    every left-th of the new connections the earlier rules left (the last takes the rest), so
    the backends take turns, as IPVS's round robin does (a random pick, kube-proxy's, spreads
    as evenly only on average)."""
    return (Match("statistic", opts(mode="nth", every=str(left), packet="0")),) if left > 1 else ()


def _by_block(
    spec: LbSpec,
    top: str,
    block_prefix: str,
    vips: Iterable[VirtualIp],
    rule: Callable[[str, VirtualIp], Rule],
) -> dict[str, tuple[Rule, ...]]:
    """`top` with one rule per /24 of the VIPs, jumping to that block's chain, which holds
    rule(block chain, vip) for each of its VIPs (vips in address order).

    A connection's first packet walks the blocks and then one block's VIPs, not every VIP: one
    rule per VIP in `top` (kube-proxy's iptables mode) made a connect through the 10,000th VIP
    4x slower than a direct one.
    """
    blocks: dict[str, list[Rule]] = {}
    jumps: list[Rule] = []
    for vip in vips:
        network = _as_int(vip.vip) >> (32 - BLOCK_PREFIXLEN) << (32 - BLOCK_PREFIXLEN)
        chain = f"{block_prefix}{network:08X}"
        if chain not in blocks:
            blocks[chain] = []
            block = f"{ipaddress.IPv4Address(network)}/{BLOCK_PREFIXLEN}"
            jumps.append(Rule(top, chain, spec.comment, destination=block))
        blocks[chain].append(rule(chain, vip))
    return {top: tuple(jumps), **{chain: tuple(rules) for chain, rules in blocks.items()}}


def _dispatch_chains(spec: LbSpec) -> dict[str, tuple[Rule, ...]]:
    """nat chains of the iptables backend shared by the VIPs: MESH-SERVICES and its blocks,
    each VIP's rule jumping to its service chain. A VIP with no active backend is left out: it
    stays local and refuses the connection."""
    return _by_block(
        spec,
        SERVICES_CHAIN,
        SERVICES_BLOCK_PREFIX,
        (vip for vip in spec.vips if vip.active),
        lambda chain, vip: Rule(chain, svc_chain(vip), vip.comment, destination=vip.vip),
    )


def service_chains(spec: LbSpec) -> dict[str, tuple[Rule, ...]]:
    """nat chains of the iptables backend that belong to one service each: its MESH-SVC-*
    chain taking its active backends in turn, and a MESH-SEP-* DNAT chain per one."""
    chains: dict[str, tuple[Rule, ...]] = {}
    for vip in spec.vips:
        active = vip.active
        svc, comment = svc_chain(vip), vip.comment
        spread = []
        for index, backend in enumerate(active):
            sep = sep_chain(vip, backend)
            spread.append(Rule(svc, sep, comment, matches=take_turns(len(active) - index)))
            # No port in the DNAT: the connection keeps its port, as swarm's VIPs do.
            dnat = (("to-destination", backend.address),)
            chains[sep] = (Rule(sep, "DNAT", comment, target_args=dnat),)
        if active:
            chains[svc] = tuple(spread)
    return chains


def _mark_table(spec: LbSpec) -> OwnedTable:
    """mangle for the ipvs backend: each VIP's connections get the VIP's fwmark.

    MESH-MARK's blocks hold one rule per VIP and mangle sees every packet, but only a
    connection's first packet needs the mark: IPVS schedules on it once, then finds the
    connection by its addresses, and nat reads it once, for the SNAT. So only new connections
    walk it (at 10,000 VIPs, every packet walking it cost 5/6 of a VIP's requests/s).
    """

    def mark(chain: str, vip: VirtualIp) -> Rule:
        set_mark = opts(set_mark=f"{spec.fwmark(vip):#x}")
        return Rule(chain, "MARK", vip.comment, destination=vip.vip, target_args=set_mark)

    new_only = (Match("conntrack", opts(ctstate="NEW")),)
    return OwnedTable(
        chains=_by_block(spec, MARK_CHAIN, MARK_BLOCK_PREFIX, spec.vips, mark),
        jumps=(Rule("PREROUTING", MARK_CHAIN, spec.comment, matches=new_only),),
    )


def iptables_tables(spec: LbSpec, backend: BackendKind = "iptables") -> dict[str, OwnedTable]:
    """What meshctl owns in the LB namespace's mangle, nat and filter tables.

    Both backends SNAT VIP traffic to the LB address (client and backend share the bridge).
    The ipvs backend marks VIP traffic with the VIP's fwmark, which IPVS balances on; the
    iptables backend balances in nat and needs no mark: conntrack knows which connections
    its DNAT rules balanced, and the first packet walks no mark chain.
    """
    tables = shared_tables(spec, backend)
    if backend == "iptables":
        nat = tables["nat"]
        tables["nat"] = OwnedTable({**nat.chains, **service_chains(spec)}, nat.jumps)
    return tables


def shared_tables(spec: LbSpec, backend: BackendKind = "iptables") -> dict[str, OwnedTable]:
    """iptables_tables without the chains of single services: the chains the network's VIPs
    share (dispatch, marks, SNAT, refusals), one rule per VIP at most, and the jump rules."""
    if backend == "ipvs":
        mangle = _mark_table(spec)
        balanced = Match("mark", opts(mark=f"{FWMARK_BASE:#x}/{FWMARK_MASK:#x}"))
    else:
        mangle = OwnedTable()
        balanced = Match("conntrack", opts(ctstate="DNAT"))
    snat = Rule(
        POSTROUTING_CHAIN,
        "SNAT",
        spec.comment,
        matches=(balanced,),
        target_args=opts(to_source=spec.lb_address),
    )
    nat_chains: dict[str, tuple[Rule, ...]] = {POSTROUTING_CHAIN: (snat,)}
    nat_jumps = [Rule("POSTROUTING", POSTROUTING_CHAIN, spec.comment)]
    if backend == "iptables":
        nat_chains.update(_dispatch_chains(spec))
        nat_jumps.insert(0, Rule("PREROUTING", SERVICES_CHAIN, spec.comment))
    # A VIP with no backend to take a new connection refuses it at once (IPVS would drop it
    # silently and leave the client hanging).
    refuse = tuple(
        rule
        for vip in spec.vips
        if not vip.active
        for rule in (
            Rule(REFUSE_CHAIN, "REJECT", vip.comment, destination=vip.vip, protocol="tcp",
                 target_args=opts(reject_with="tcp-reset")),
            Rule(REFUSE_CHAIN, "REJECT", vip.comment, destination=vip.vip),
        )
    )  # fmt: skip
    filter_table = OwnedTable(
        chains={REFUSE_CHAIN: refuse}, jumps=(Rule("INPUT", REFUSE_CHAIN, spec.comment),)
    )
    return {
        "mangle": mangle,
        "nat": OwnedTable(chains=nat_chains, jumps=tuple(nat_jumps)),
        "filter": filter_table,
    }


def ipvs_state(spec: LbSpec) -> dict[VirtualService, tuple[Destination, ...]]:
    """One fwmark service per VIP (every port), round robin, masquerading to backend:same-port.

    Draining backends stay as weight-0 destinations so their connections carry on.
    """
    return {
        VirtualService(fwmark=spec.fwmark(vip), scheduler="rr"): tuple(
            Destination(b.address, 0, weight=b.weight, forward="masq") for b in vip.backends
        )
        for vip in spec.vips
    }


def is_owned_service(svc: VirtualService) -> bool:
    """An IPVS service in meshctl's fwmark range (the only ones it may change or delete)."""
    return svc.fwmark is not None and svc.fwmark & FWMARK_MASK == FWMARK_BASE
