"""The iptables backend: VIPs balanced by nat rules (streamed iptables-legacy-restore), the last
resort where the kernel has neither IPVS nor nf_tables.

MESH-SERVICES sends a VIP's new connections, through its /24's MESH-VIPS-* chain, to the
service's MESH-SVC-* chain, which takes its active backends in turn (statistic nth) to a MESH-SEP-*
chain per backend that DNATs to it (same port). conntrack knows which connections its DNAT rules
balanced: the SNAT to the LB address matches them, and the first packet walks no mark chain.
"""

from __future__ import annotations

from dataclasses import dataclass

from kernel.iptables_rules import Match, OwnedTable, Rule, opts
from kernel.netns import Namespace
from kernel.system import Kernel
from meshctl.lb.netfilter import (
    TablesChange,
    apply_tables,
    by_block,
    clear_tables,
    observe_tables,
    snat_and_refuse,
    tables_change,
    take_turns,
)
from meshctl.lb.spec import Backend, LbSpec, VirtualIp, short_id
from meshctl.sysctls import Setting, lb_sysctls

SERVICES_CHAIN = "MESH-SERVICES"
SERVICES_BLOCK_PREFIX = "MESH-VIPS-"
SVC_CHAIN_PREFIX = "MESH-SVC-"
SEP_CHAIN_PREFIX = "MESH-SEP-"

Tables = dict[str, OwnedTable]


def svc_chain(vip: VirtualIp) -> str:
    return f"{SVC_CHAIN_PREFIX}{short_id(vip.service_id, vip.vip)}"


def sep_chain(vip: VirtualIp, backend: Backend) -> str:
    return f"{SEP_CHAIN_PREFIX}{short_id(vip.service_id, vip.vip, backend.address)}"


def service_chains(spec: LbSpec) -> dict[str, tuple[Rule, ...]]:
    """nat chains that belong to one service each: its MESH-SVC-* chain taking its active
    backends in turn, and a MESH-SEP-* DNAT chain per one."""
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


def shared_tables(spec: LbSpec) -> Tables:
    """The chains the network's VIPs share (dispatch, SNAT, refusals), one rule per VIP at most,
    and the jump rules. A VIP with no active backend is left out of the dispatch: it stays
    local and is refused."""
    nat, refusals = snat_and_refuse(spec, Match("conntrack", opts(ctstate="DNAT")))
    dispatch = by_block(
        spec,
        SERVICES_CHAIN,
        SERVICES_BLOCK_PREFIX,
        (vip for vip in spec.vips if vip.active),
        lambda chain, vip: Rule(chain, svc_chain(vip), vip.comment, destination=vip.vip),
    )
    jumps = (Rule("PREROUTING", SERVICES_CHAIN, spec.comment), *nat.jumps)
    return {
        "mangle": OwnedTable(),
        "nat": OwnedTable({**nat.chains, **dispatch}, jumps),
        "filter": refusals,
    }


def iptables_tables(spec: LbSpec) -> Tables:
    """What the backend owns in the LB namespace's mangle, nat and filter tables."""
    return IptablesBackend().render(spec, spec)


@dataclass(frozen=True)
class IptablesBackend:
    name: str = "iptables"
    needs: tuple[str, ...] = ("iptables",)
    settings: tuple[Setting, ...] = ()
    parallel: bool = True  # iptables-legacy-restore parses in its own process

    def sysctls(self) -> dict[str, str]:
        return lb_sysctls(self.settings)

    def available(self, kernel: Kernel, ns: Namespace = None) -> str | None:
        return None  # legacy iptables is required anyway (meshctl doctor checks it)

    def render(self, services: LbSpec, shared: LbSpec | None) -> Tables:
        tables = shared_tables(shared) if shared is not None else {}
        nat = tables.get("nat", OwnedTable())
        return {
            "mangle": tables.get("mangle", OwnedTable()),
            "nat": OwnedTable({**nat.chains, **service_chains(services)}, nat.jumps),
            "filter": tables.get("filter", OwnedTable()),
        }

    def observe(self, kernel: Kernel, ns: str) -> Tables:
        return observe_tables(kernel, ns)

    def change(self, desired: Tables, held: Tables) -> TablesChange:
        return tables_change(desired, held)

    def apply(self, kernel: Kernel, ns: str, change: TablesChange) -> None:
        apply_tables(kernel, ns, change)

    def clear(self, kernel: Kernel, ns: str) -> None:
        clear_tables(kernel, ns)
