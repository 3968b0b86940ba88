"""The nftables backend, kube-proxy's layout, where the kernel has nf_tables (and no IPVS).

In the LB namespace's table `ip meshctl`: nat prerouting looks each packet's destination up in
the verdict map `services` (VIP -> goto its service chain: one lookup, however many services),
a service chain spreads new connections over its active backends with `numgen inc mod N` (one
anonymous verdict map to a chain per endpoint, which DNATs to it, same port), and nat
postrouting masquerades what was DNATed, so replies come back through the LB (client and
backend share the bridge). A VIP with no active backend is in the set `no-endpoints` instead,
whose connections filter input refuses at once.

`numgen inc` (round robin), not kube-proxy's `numgen random`: the backends take turns exactly, as
IPVS's rr and the iptables backend's statistic nth do, so N connections spread N/n each, not
only on average. A draining endpoint (weight 0) is left out of the numgen map and has no chain:
conntrack carries its established flows on. A change rewrites only the service and endpoint
chains and the map elements it touches, in one nf_tables netlink batch (kernel.nftables): no
process is started and nothing is read back.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from kernel.netns import Namespace
from kernel.nftables_rules import Chain, Hook, NftChange, NftSet, NftTable, table_change
from kernel.system import Kernel
from meshctl.lb.spec import Backend, LbSpec, VirtualIp, short_id
from meshctl.sysctls import Setting, lb_sysctls

SERVICES_MAP = "services"
REFUSED_SET = "no-endpoints"
SERVICE_PREFIX = "service-"
ENDPOINT_PREFIX = "endpoint-"

_SHARED_CHAINS = {
    "prerouting": Chain((f"ip daddr vmap @{SERVICES_MAP}",), Hook("nat", "prerouting", -100)),
    "postrouting": Chain(("ct status dnat masquerade",), Hook("nat", "postrouting", 100)),
    "input": Chain(
        (
            f"ip daddr @{REFUSED_SET} reject with tcp reset",
            f"ip daddr @{REFUSED_SET} reject with icmp port-unreachable",
        ),
        Hook("filter", "input", 0),
    ),
}


def service_chain(vip: VirtualIp) -> str:
    return f"{SERVICE_PREFIX}{short_id(vip.service_id, vip.vip)}"


def endpoint_chain(vip: VirtualIp, backend: Backend) -> str:
    return f"{ENDPOINT_PREFIX}{short_id(vip.service_id, vip.vip, backend.address)}"


def spread(targets: list[str]) -> str:
    """The rule that sends a service's new connections to its endpoint chains in turn."""
    if len(targets) == 1:
        return f"goto {targets[0]}"
    choices = ", ".join(f"{index} : goto {chain}" for index, chain in enumerate(targets))
    return f"numgen inc mod {len(targets)} vmap {{ {choices} }}"


def service_chains(spec: LbSpec) -> dict[str, Chain]:
    """Each VIP with active backends: its service chain and a DNAT chain per active backend."""
    chains: dict[str, Chain] = {}
    for vip in spec.vips:
        endpoints = [endpoint_chain(vip, b) for b in vip.active]
        if not endpoints:
            continue
        chains[service_chain(vip)] = Chain((spread(endpoints),))
        for backend, name in zip(vip.active, endpoints, strict=True):
            # No port in the DNAT: the connection keeps its port, as swarm's VIPs do.
            chains[name] = Chain((f"dnat to {backend.address}",))
    return chains


def shared_table(spec: LbSpec) -> NftTable:
    """The base chains, the services map and the no-endpoints set of all the VIPs."""
    services = {vip.vip: f"goto {service_chain(vip)}" for vip in spec.vips if vip.active}
    refused = {vip.vip: "" for vip in spec.vips if not vip.active}
    return NftTable(
        chains=dict(_SHARED_CHAINS),
        sets={
            SERVICES_MAP: NftSet("type ipv4_addr : verdict", True, services),
            REFUSED_SET: NftSet("type ipv4_addr", False, refused),
        },
    )


@dataclass(frozen=True)
class NftObjectsChange:
    """One transaction on the LB namespace's table, with its `meshctl diff` lines."""

    change: NftChange

    @property
    def empty(self) -> bool:
        return self.change.empty

    def lines(self, where: str) -> Iterator[str]:
        c = self.change
        for name in c.add_sets:
            yield f"+ {where}: nftables set {name}"
        for name, chain in c.replace.items():
            yield f"~ {where}: nftables chain {name} ({len(chain.rules)} rules)"
        for name in c.delete:
            yield f"- {where}: nftables chain {name}"
        for name, keys in c.delete_elements.items():
            yield from (f"- {where}: nftables {name} element {key}" for key in keys)
        for name, elements in c.add_elements.items():
            for key, value in elements.items():
                yield f"+ {where}: nftables {name} element {key}" + (f" : {value}" if value else "")
        for name in c.delete_sets:
            yield f"- {where}: nftables set {name}"


@dataclass(frozen=True)
class NftablesBackend:
    name: str = "nftables"
    needs: tuple[str, ...] = ("nftables",)
    settings: tuple[Setting, ...] = ()
    parallel: bool = False  # its netlink batch is encoded and sent from this process

    def sysctls(self) -> dict[str, str]:
        return lb_sysctls(self.settings)

    def available(self, kernel: Kernel, ns: Namespace = None) -> str | None:
        return kernel.nftables.available(ns)

    def render(self, services: LbSpec, shared: LbSpec | None) -> NftTable:
        own = service_chains(services)
        if shared is None:
            return NftTable(chains=own)
        table = shared_table(shared)
        return NftTable(chains={**table.chains, **own}, sets=table.sets)

    def observe(self, kernel: Kernel, ns: str) -> NftTable:
        return kernel.nftables.list_table(ns)

    def change(self, desired: NftTable, held: NftTable) -> NftObjectsChange:
        return NftObjectsChange(table_change(desired, held))

    def apply(self, kernel: Kernel, ns: str, change: NftObjectsChange) -> None:
        kernel.nftables.apply(ns, change.change)

    def clear(self, kernel: Kernel, ns: str) -> None:
        if kernel.nftables.available(ns) is None:
            kernel.nftables.delete_table(ns)
