"""How a task reaches the embedded DNS server at 127.0.0.11:53: a redirect inside the task's own
namespace to the server's sockets there, which listen on random ports (as Docker does), so the
task's own server on port 53 still works. Two kinds behind one protocol, `TaskDns`, chosen once
per node beside the load-balancer backend (meshctl.controller.dataplane):

- `NftRewrite`, where nftables runs: a stateless port rewrite with conntrack skipped, so a query
  costs no conntrack entry (a nat rule costs one per query, which the table's limit and its
  garbage collection then pay for);
- `NatRedirect`, else: a nat DNAT in the task's OUTPUT chain, un-NATed by conntrack.

A task's `DnsRules` hold the rules of the redirect in use and of those after it in TASK_DNS,
desired empty: a node that used one of those before (nftables was missing then) removes its
rules when it moves to the better one.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from kernel.iptables_rules import (
    Match,
    OwnedTable,
    Rule,
    TableChange,
    opts,
    table_change,
    table_lines,
)
from kernel.netns import Namespace
from kernel.nftables_rules import Chain, Hook, NftChange, NftTable
from kernel.nftables_rules import table_change as nft_change
from kernel.system import Kernel
from meshctl.sysctls import Setting

DNS_ADDRESS = "127.0.0.11"
DNS_CHAIN = "MESH-DNS"  # the nat redirect's chain, jumped to from OUTPUT
DNS_NFT_CHAIN = "dns"  # the rewrite's chain in the task's nftables table
# Raw priority: before conntrack, which a notrack'd packet then skips.
DNS_NFT_HOOK = Hook("filter", "output", -300)

Ports = tuple[int, int]  # the DNS server's (udp, tcp) ports in a task's namespace


class DnsChange(Protocol):
    """A redirect's change to one task namespace: made by `TaskDns.change`, applied by its
    apply."""

    @property
    def empty(self) -> bool: ...

    def lines(self, where: str) -> Iterator[str]:
        """One `meshctl diff` line per difference, for the namespace `where`."""
        ...


class TaskDns(Protocol):
    """One way of sending a task's 127.0.0.11:53 to the DNS server's ports in its namespace."""

    @property
    def name(self) -> str: ...

    @property
    def needs(self) -> tuple[str, ...]:
        """The kernel features it runs on, as kernel.features names its checks (`meshctl
        doctor` reads those checks for them)."""
        ...

    @property
    def settings(self) -> tuple[Setting, ...]:
        """The sysctls it needs in a task's namespace (none so far)."""
        ...

    def available(self, kernel: Kernel, ns: Namespace = None) -> str | None:
        """None if the kernel can run it, else why not (one line)."""
        ...

    def render(self, task_id: str, ports: Ports | None) -> Any:
        """Its rules in the task's namespace (none when the task has no DNS ports yet)."""
        ...

    def observe(self, kernel: Kernel, ns: str) -> Any:
        """Its rules in the task namespace ns, in the shape render makes."""
        ...

    def change(self, desired: Any, held: Any) -> DnsChange:
        """Pure: the smallest change from held to desired."""
        ...

    def apply(self, kernel: Kernel, ns: str, change: Any) -> None: ...


@dataclass(frozen=True)
class NatChange:
    change: TableChange

    @property
    def empty(self) -> bool:
        return self.change.empty

    def lines(self, where: str) -> Iterator[str]:
        return table_lines(where, "nat", self.change)


@dataclass(frozen=True)
class NatRedirect:
    """127.0.0.11:53 DNATed to the DNS server's ports by the task's own nat table."""

    name: str = "nat-redirect"
    needs: tuple[str, ...] = ("iptables", "conntrack")
    settings: tuple[Setting, ...] = ()

    def available(self, kernel: Kernel, ns: Namespace = None) -> str | None:
        return None  # legacy iptables and conntrack are required anyway (meshctl doctor)

    def render(self, task_id: str, ports: Ports | None) -> OwnedTable:
        return dns_redirect(task_id, *ports) if ports else OwnedTable()

    def observe(self, kernel: Kernel, ns: str) -> OwnedTable:
        return kernel.iptables.list_owned(ns, "nat")

    def change(self, desired: OwnedTable, held: OwnedTable) -> NatChange:
        return NatChange(table_change(desired, held))

    def apply(self, kernel: Kernel, ns: str, change: NatChange) -> None:
        kernel.iptables.apply(ns, "nat", change.change)


def dns_redirect(task_id: str, udp_port: int, tcp_port: int) -> OwnedTable:
    """Inside a task, 127.0.0.11:53 goes to the DNS server's sockets on their random ports (as
    Docker does), so the task's own server on port 53 still works; replies are un-NATed by
    conntrack."""
    comment = f"meshctl:dns-{task_id}"
    rules = tuple(
        Rule(
            DNS_CHAIN,
            "DNAT",
            comment,
            target_args=opts(to_destination=f"{DNS_ADDRESS}:{port}"),
            destination=f"{DNS_ADDRESS}/32",
            protocol=proto,
            matches=(Match(proto, opts(dport="53")),),
        )
        for proto, port in (("udp", udp_port), ("tcp", tcp_port))
    )
    return OwnedTable(chains={DNS_CHAIN: rules}, jumps=(Rule("OUTPUT", DNS_CHAIN, comment),))


@dataclass(frozen=True)
class NftRewriteChange:
    change: NftChange

    @property
    def empty(self) -> bool:
        return self.change.empty

    def lines(self, where: str) -> Iterator[str]:
        yield from (f"~ {where}: nftables chain {name}" for name in self.change.replace)
        yield from (f"- {where}: nftables chain {name}" for name in self.change.delete)


@dataclass(frozen=True)
class NftRewrite:
    """127.0.0.11:53 rewritten statelessly by the task's own nftables table (dns_rewrite)."""

    name: str = "nftables-rewrite"
    needs: tuple[str, ...] = ("nftables",)
    settings: tuple[Setting, ...] = ()

    def available(self, kernel: Kernel, ns: Namespace = None) -> str | None:
        return kernel.nftables.available(ns)

    def render(self, task_id: str, ports: Ports | None) -> NftTable:
        return dns_rewrite(*ports) if ports else NftTable()

    def observe(self, kernel: Kernel, ns: str) -> NftTable:
        return kernel.nftables.list_table(ns)

    def change(self, desired: NftTable, held: NftTable) -> NftRewriteChange:
        return NftRewriteChange(nft_change(desired, held))

    def apply(self, kernel: Kernel, ns: str, change: NftRewriteChange) -> None:
        kernel.nftables.apply(ns, change.change)


def dns_rewrite(udp_port: int, tcp_port: int) -> NftTable:
    """Inside a task, 127.0.0.11:53 goes to the DNS server's sockets (bound on 127.0.0.11) by a
    stateless port rewrite both ways, the queries' destination port and the answers' source
    port, with conntrack skipped. The task's own server on port 53 still works: only
    127.0.0.11's port 53 is rewritten, and only answers from the DNS server's ports."""
    rules = tuple(
        rule
        for proto, port in (("udp", udp_port), ("tcp", tcp_port))
        for rule in (
            f"ip daddr {DNS_ADDRESS} {proto} dport 53 notrack {proto} dport set {port}",
            f"ip saddr {DNS_ADDRESS} {proto} sport {port} notrack {proto} sport set 53",
        )
    )
    return NftTable(chains={DNS_NFT_CHAIN: Chain(rules, DNS_NFT_HOOK)})


NFT_REWRITE = NftRewrite()
NAT_REDIRECT = NatRedirect()
# In the order a node prefers them; the last needs nothing beyond what the mesh needs anyway.
TASK_DNS: tuple[TaskDns, ...] = (NFT_REWRITE, NAT_REDIRECT)


@dataclass(frozen=True)
class DnsRulesChange:
    """A task namespace's DNS redirect change, redirect by redirect, in the order applied."""

    parts: tuple[tuple[TaskDns, DnsChange], ...] = ()

    @property
    def empty(self) -> bool:
        return all(change.empty for _, change in self.parts)

    def lines(self, where: str) -> Iterator[str]:
        for _, change in self.parts:
            yield from change.lines(where)

    def apply(self, kernel: Kernel, ns: str) -> None:
        for redirect, change in self.parts:
            if not change.empty:
                redirect.apply(kernel, ns, change)


@dataclass(frozen=True)
class DnsRules:
    """A task namespace's DNS redirect as rules, redirect by redirect: those the one in use
    replaces first (desired empty), the one in use last. Empty for a namespace meshctl puts
    no redirect in (an attached container's, the router's)."""

    parts: tuple[tuple[TaskDns, Any], ...] = ()

    def change_from(self, held: DnsRules) -> DnsRulesChange:
        """Pure: the change that makes held these rules."""
        have = dict(held.parts)
        return DnsRulesChange(
            tuple(
                (redirect, redirect.change(want, have.get(redirect, redirect.render("", None))))
                for redirect, want in self.parts
            )
        )

    def make(self, kernel: Kernel, ns: str) -> None:
        """Put the rules into a namespace being wired, and take those of the replaced redirects
        out. The one in use is not read when it has no rules to make (a task's first wiring,
        before its DNS server has ports there): the next observe reads it."""
        for index, (redirect, want) in enumerate(self.parts):
            in_use = index == len(self.parts) - 1
            if not in_use or want != redirect.render("", None):
                change = redirect.change(want, redirect.observe(kernel, ns))
                if not change.empty:
                    redirect.apply(kernel, ns, change)

    @property
    def settings(self) -> tuple[Setting, ...]:
        """The sysctls of the redirect in use."""
        return self.parts[-1][0].settings if self.parts else ()


def _in_play(task_dns: TaskDns) -> tuple[TaskDns, ...]:
    """The redirect in use and those after it in TASK_DNS, which it replaces: those first."""
    after = TASK_DNS[TASK_DNS.index(task_dns) + 1 :] if task_dns in TASK_DNS else ()
    return (*reversed(after), task_dns)


def desired_dns(task_dns: TaskDns, task_id: str, ports: Ports | None) -> DnsRules:
    """The task's DNS rules with task_dns in use: its rules for ports, the replaced ones none."""
    return DnsRules(
        tuple(
            (redirect, redirect.render(task_id, ports if redirect == task_dns else None))
            for redirect in _in_play(task_dns)
        )
    )


def observe_dns(task_dns: TaskDns, kernel: Kernel, ns: str) -> DnsRules:
    """The task namespace's DNS rules of task_dns and of those it replaces."""
    return DnsRules(
        tuple((redirect, redirect.observe(kernel, ns)) for redirect in _in_play(task_dns))
    )
