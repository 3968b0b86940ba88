"""The node's own networking as desired kernel objects: pure functions of the cluster view.

Per network a bridge (`mesh` + id) holding the gateway address; per task on this node a
namespace with one veth per network (node end on the bridge, `ethN` inside with the task's
address) and a default route via its first network's gateway. Each link's node end carries
meshctl's mark (naming.mark) as its alias. In the node namespace, filter and nat rules: egress
by masquerade unless the network is internal, and no forwarding between different networks'
bridges.

A link in the node namespace with a name meshctl wants but without its mark is another's: the
plan reports it as a clash and leaves it, and what would hang off it, alone.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace

from kernel.iptables_rules import Match, OwnedTable, Rule, TableChange, opts, table_change
from kernel.links import mac_for
from meshctl import naming
from meshctl.lb.endpoints import serving
from meshctl.lb.netfilter import take_turns
from meshctl.model import INGRESS, Container, Network, PublishedPort, Task
from meshctl.node.task_dns import NAT_REDIRECT, DnsRules, DnsRulesChange, TaskDns, desired_dns
from meshctl.overlay.vxlan import (
    DEFAULT_MTU,
    NO_UNDERLAY,
    OverlaySpec,
    PeerChange,
    Underlay,
    desired_overlays,
    plan_overlays,
)
from meshctl.runtime.process import read_start_time
from meshctl.view import ClusterView

FORWARD_CHAIN = "MESH-FORWARD"
ISOLATION_CHAIN = "MESH-ISOLATION-1"  # per network: from its bridge elsewhere → stage 2
ISOLATION_DROP_CHAIN = "MESH-ISOLATION-2"  # per network: into its bridge → dropped
POSTROUTING_CHAIN = "MESH-POSTROUTING"
INGRESS_CHAIN = "MESH-INGRESS"
NODE_COMMENT = "meshctl:node"


@dataclass(frozen=True)
class BridgeSpec:
    """A network's bridge on this node with the gateway address on it, marked and up."""

    name: str
    address: str  # gateway in CIDR form, e.g. 10.10.1.1/24
    mark: str  # the alias: naming.mark(network id)
    up: bool = True
    mtu: int = DEFAULT_MTU  # an overlay's is the underlay's less the VXLAN headers


@dataclass(frozen=True)
class TaskLinkSpec:
    """One of a task's legs: the node end on a bridge, the task end with the task's address."""

    node_end: str
    bridge: str
    task_end: str
    address: str  # CIDR
    # The task end's MAC, derived from its address (kernel.links.mac_for) so that other nodes
    # of an overlay know it from the store alone, and the MTU of both ends.
    mac: str = ""
    mtu: int = DEFAULT_MTU


@dataclass(frozen=True)
class TaskNetSpec:
    """A task's namespace, its legs and its default gateway."""

    task_id: str
    netns: str
    links: tuple[TaskLinkSpec, ...]
    gateway: str | None
    # False for an attached container: its namespace is another runtime's; meshctl adds only
    # its veth and address there (no lo, no route, no rules) and never deletes the namespace.
    owns_netns: bool = True
    # 127.0.0.11:53 sent to the embedded DNS server's ports, by the node's redirect (task_dns).
    dns: DnsRules = DnsRules()


@dataclass(frozen=True)
class NodeSpec:
    """Everything of the node's own networking, desired or observed, in one comparable shape.

    Observed, bridges and task legs are only the links that carry meshctl's mark; link_aliases
    holds the alias of every link of the node namespace named as meshctl names links (`mesh*`),
    marked or not, so that a plan can tell a name it wants taken by another's link.
    """

    bridges: dict[str, BridgeSpec]
    tasks: dict[str, TaskNetSpec]  # tasks and attached containers, by id
    tables: dict[str, OwnedTable]
    link_aliases: Mapping[str, str | None] = field(default_factory=dict)  # observed only
    overlays: dict[str, OverlaySpec] = field(default_factory=dict)  # VXLAN devices, by name


def _cidr(address: str, network: Network) -> str:
    return f"{address}/{ipaddress.IPv4Network(network.subnet).prefixlen}"


def bridge_spec(view: ClusterView, network: Network, underlay: Underlay) -> BridgeSpec:
    return BridgeSpec(
        name=naming.bridge(network.id),
        address=_cidr(view.gateways[network.name], network),
        mark=naming.mark(network.id),
        mtu=underlay.mtu_of(network),
    )


def leg(
    node_end: str, network: Network, task_end: str, address: str, underlay: Underlay
) -> TaskLinkSpec:
    """A leg onto the network's bridge for an endpoint with `address`."""
    return TaskLinkSpec(
        node_end=node_end,
        bridge=naming.bridge(network.id),
        task_end=task_end,
        address=_cidr(address, network),
        mac=mac_for(address),
        mtu=underlay.mtu_of(network),
    )


def task_spec(
    view: ClusterView,
    task: Task,
    dns_ports: tuple[int, int] | None = None,
    underlay: Underlay = NO_UNDERLAY,
    task_dns: TaskDns = NAT_REDIRECT,
) -> TaskNetSpec:
    """The wiring of one task: a leg per network in the order the service lists them; its
    DNS redirect by the node's task_dns."""
    links = []
    gateway = None
    service = view.service_of(task)
    # The service's network order decides eth0, eth1... and the default route; the stored
    # addresses carry no order.
    order = [a.network for a in service.networks] if service else []
    ordered = sorted(
        task.addresses, key=lambda n: (order.index(n) if n in order else len(order), n)
    )
    for index, network_name in enumerate(ordered):
        address = task.addresses[network_name]
        network = view.networks.get(network_name)
        if network is None:  # the network is going away; the task is being rolled off it
            continue
        if gateway is None:
            gateway = view.gateways.get(network_name)
        links.append(
            leg(naming.task_veth(task.id, index), network, naming.task_interface(index), address,
                underlay)
        )  # fmt: skip
    netns = naming.task_netns(task.id)
    dns = desired_dns(task_dns, task.id, dns_ports)
    return TaskNetSpec(task.id, netns, tuple(links), gateway, dns=dns)


def container_process_current(container: Container, start_time: int | None) -> bool:
    """Whether an attached container's namespace still belongs to the process it was attached
    with: start_time is what /proc now says of its PID (None: no such process). A PID reused
    by another process names that process's namespace, possibly the node's own."""
    return container.start_time is None or start_time == container.start_time


def container_spec(
    view: ClusterView,
    container: Container,
    start_time_of: Callable[[int], int | None] = read_start_time,
    underlay: Underlay = NO_UNDERLAY,
) -> TaskNetSpec | None:
    """An attached container's one leg; None (nothing wired, a leg there removed) when its
    network is gone or its process is no longer the one attached (container_process_current)."""
    pid = container.pid
    if pid is not None and not container_process_current(container, start_time_of(pid)):
        return None
    network = view.networks.get(container.network)
    if network is None:
        return None
    link = leg(
        naming.container_veth(container.id), network, naming.container_interface(network.id),
        container.address, underlay,
    )  # fmt: skip
    return TaskNetSpec(container.id, container.netns, (link,), None, owns_netns=False)


def node_tables(
    networks: Collection[Network], ingress: tuple[tuple[Rule, ...], tuple[Rule, ...]] = ((), ())
) -> dict[str, OwnedTable]:
    """filter: isolation between networks and egress; nat: masquerade for non-internal ones,
    and the published ports (ingress: the DNATs, and the masquerades that go first).

    Isolation is Docker's two stages, named by bridge, never by a name pattern (`mesh+` would
    catch other tools' `mesh*` links too): stage 1 sends what leaves a meshctl bridge for
    another interface to stage 2, which drops it if that interface is a meshctl bridge; egress
    and other tools' interfaces are left alone. Traffic within one bridge is accepted before
    stage 1 (Docker's `! -o <bridge>` there, which kernel.iptables.Rule does not express).
    """
    if not networks:
        return {"filter": OwnedTable(), "nat": OwnedTable()}
    ordered = sorted(networks, key=lambda n: n.name)
    bridges = [(naming.bridge(n.id), f"meshctl:net-{n.id}", n) for n in ordered]
    return {"filter": _filter_table(bridges), "nat": _nat_table(bridges, *ingress)}


_Bridge = tuple[str, str, Network]  # the bridge's name, its rules' comment, its network


def _filter_table(bridges: Sequence[_Bridge]) -> OwnedTable:
    """FORWARD: replies and intra-bridge traffic first, then the two isolation stages, then
    each bridge's own verdict (internal networks drop what leaves or enters them)."""
    # Replies, and new connections a published port sent (DNAT), go into any bridge that is
    # not internal — before the isolation rules, so the routing mesh crosses networks.
    replies = Match("conntrack", opts(ctstate="RELATED,ESTABLISHED,DNAT"))
    forward: list[Rule] = [
        Rule(FORWARD_CHAIN, "ACCEPT", comment, out_interface=bridge, matches=(replies,))
        for bridge, comment, network in bridges
        if not network.internal
    ]
    forward += [
        Rule(FORWARD_CHAIN, "ACCEPT", comment, in_interface=bridge, out_interface=bridge)
        for bridge, comment, _ in bridges
    ]
    forward.append(Rule(FORWARD_CHAIN, ISOLATION_CHAIN, NODE_COMMENT))
    for bridge, comment, network in bridges:
        if network.internal:
            forward.append(Rule(FORWARD_CHAIN, "DROP", comment, in_interface=bridge))
            forward.append(Rule(FORWARD_CHAIN, "DROP", comment, out_interface=bridge))
        else:
            forward.append(Rule(FORWARD_CHAIN, "ACCEPT", comment, in_interface=bridge))
    stage1 = tuple(
        Rule(ISOLATION_CHAIN, ISOLATION_DROP_CHAIN, comment, in_interface=bridge)
        for bridge, comment, _ in bridges
    )
    stage2 = tuple(
        Rule(ISOLATION_DROP_CHAIN, "DROP", comment, out_interface=bridge)
        for bridge, comment, _ in bridges
    )
    return OwnedTable(
        chains={
            FORWARD_CHAIN: tuple(forward),
            ISOLATION_CHAIN: stage1,
            ISOLATION_DROP_CHAIN: stage2,
        },
        jumps=(Rule("FORWARD", FORWARD_CHAIN, NODE_COMMENT),),
    )


def _nat_table(
    bridges: Sequence[_Bridge], catch: tuple[Rule, ...], masquerade: tuple[Rule, ...]
) -> OwnedTable:
    """POSTROUTING: the published ports' masquerades, then each non-internal network's; and
    the published ports caught on every local address."""
    postrouting: list[Rule] = list(masquerade)
    for bridge, comment, network in bridges:
        if network.internal:
            continue
        postrouting.append(
            Rule(POSTROUTING_CHAIN, "RETURN", comment, source=network.subnet, out_interface=bridge)
        )
        postrouting.append(Rule(POSTROUTING_CHAIN, "MASQUERADE", comment, source=network.subnet))
    chains = {POSTROUTING_CHAIN: tuple(postrouting)}
    jumps = [Rule("POSTROUTING", POSTROUTING_CHAIN, NODE_COMMENT)]
    if catch:
        # Published ports are caught on every local address, from outside (PREROUTING) and
        # from the node itself (OUTPUT), as swarm's DOCKER-INGRESS does.
        chains[INGRESS_CHAIN] = catch
        local = (Match("addrtype", opts(dst_type="LOCAL")),)
        jumps += [
            Rule(hook, INGRESS_CHAIN, NODE_COMMENT, matches=local)
            for hook in ("PREROUTING", "OUTPUT")
        ]
    return OwnedTable(chains=chains, jumps=tuple(jumps))


def published_ports(view: ClusterView) -> dict[tuple[int, str], str]:
    """(port, protocol) → the id of the service (or router) that publishes it."""
    ports: dict[tuple[int, str], str] = {
        (port.published, port.protocol): service.id
        for service in view.services.values()
        for port in service.ports
    }
    if view.router is not None:
        ports.update(((p.published, p.protocol), view.router.id) for p in view.router.ports())
    return ports


def ports_in_use(nat: OwnedTable) -> set[tuple[int, str]]:
    """The (port, protocol) pairs the node's MESH-INGRESS chain catches now."""
    return {
        (int(value), match.name)
        for rule in nat.chains.get(INGRESS_CHAIN, ())
        for match in rule.matches
        if match.name in ("tcp", "udp")
        for key, value in match.args
        if key == "dport"
    }


def ingress_rules(
    view: ClusterView, node: str, blocked: Collection[tuple[int, str]] = ()
) -> tuple[tuple[Rule, ...], tuple[Rule, ...]]:
    """The published ports of every service, as (DNAT rules, masquerade rules); ports in
    `blocked` (held by another process on this node) are left to that process.

    mode=ingress (traffic=cluster): port → the service's VIP on the ingress network, whose
    load-balancer namespace (swarm's ingress_sbox) spreads over every healthy task; masqueraded,
    so replies come back through this node (also for a task reaching the port: hairpin).
    mode=host and traffic=local: port → this node's own healthy tasks, spread at random,
    without source NAT: the task sees the client's address. No local task: no rule, and the
    node refuses the connection.
    """
    catch: list[Rule] = []
    masquerade: list[Rule] = []
    for owner, ports, vip, local in _publishers(view, node):
        comment = f"meshctl:{owner}"
        for port in ports:
            if (port.published, port.protocol) in blocked:
                continue
            proto = port.protocol
            published = (Match(proto, opts(dport=str(port.published))),)
            if port.mode == "ingress" and port.traffic == "cluster":
                if vip is None:
                    continue
                target = f"{vip}:{port.target}"
                catch.append(
                    Rule(
                        INGRESS_CHAIN,
                        "DNAT",
                        comment,
                        protocol=proto,
                        matches=published,
                        target_args=opts(to_destination=target),
                    )
                )
                dnat = (
                    Match(proto, opts(dport=str(port.target))),
                    Match("conntrack", opts(ctstate="DNAT")),
                )
                masquerade.append(
                    Rule(
                        POSTROUTING_CHAIN,
                        "MASQUERADE",
                        comment,
                        destination=vip,
                        protocol=proto,
                        matches=dnat,
                    )
                )
                continue  # fmt: skip
            for index, address in enumerate(local):
                catch.append(
                    Rule(INGRESS_CHAIN, "DNAT", comment, protocol=proto,
                         matches=published + take_turns(len(local) - index),
                         target_args=opts(to_destination=f"{address}:{port.target}"))
                )  # fmt: skip
    return tuple(catch), tuple(masquerade)


def _publishers(
    view: ClusterView, node: str
) -> Iterator[tuple[str, tuple[PublishedPort, ...], str | None, list[str]]]:
    """What publishes ports, as (its id, its ports, its VIP on the ingress network, this
    node's own addresses that mode=host and traffic=local send to): each service, then the
    HTTP router (its VIP spreads over every node's router; mode=host: this node's)."""
    for service in sorted(view.services.values(), key=lambda s: s.name):
        if not service.ports or not service.networks:
            continue
        first = service.networks[0].network
        local = sorted(
            t.addresses[first]
            for t in view.tasks_on(node)
            if t.service_id == service.id and serving(t) and first in t.addresses
        )
        yield service.id, service.ports, service.vips().get(INGRESS), local
    router = view.router
    if router is not None:
        address = view.router_addresses.get((INGRESS, node))
        yield router.id, router.ports(), router.vip, [address] if address else []


def desired_node(
    view: ClusterView,
    node: str,
    wired_tasks: Collection[str],
    dns_ports: Mapping[str, tuple[int, int]] | None = None,
    blocked_ports: Collection[tuple[int, str]] = (),
    underlay: Underlay = NO_UNDERLAY,
    task_dns: TaskDns = NAT_REDIRECT,
) -> NodeSpec:
    """The node's networking for the tasks in wired_tasks (those the supervisor runs or stops);
    dns_ports: the DNS server's (udp, tcp) ports in each task namespace that has them;
    blocked_ports: published ports another process of the node holds (not taken over);
    task_dns: how the tasks reach 127.0.0.11:53 (node.task_dns).

    A network's bridge (and rules) exists on the node while it takes part in the network
    (ClusterView.taking_part: a bridge network always, an overlay while it is in use here).
    """
    taking_part = view.taking_part(node)
    networks = [n for n in view.networks.values() if n.name in taking_part]
    bridges = {
        b.name: b
        for b in (bridge_spec(view, n, underlay) for n in networks if n.name in view.gateways)
    }
    tasks = {
        task_id: task_spec(
            view, view.tasks[task_id], (dns_ports or {}).get(task_id), underlay, task_dns
        )
        for task_id in wired_tasks
        if task_id in view.tasks and view.tasks[task_id].node == node
    }
    for container in view.containers.values():
        if container.node == node:
            spec = container_spec(view, container, underlay=underlay)
            if spec is not None:
                tasks[container.id] = spec
    tables = node_tables(networks, ingress_rules(view, node, blocked_ports))
    overlays = desired_overlays(view, node, networks, underlay)
    return NodeSpec(bridges=bridges, tasks=tasks, tables=tables, overlays=overlays)


@dataclass(frozen=True)
class NodePlan:
    """What to change on the node, in the order apply runs it."""

    ensure_bridges: tuple[BridgeSpec, ...] = ()
    wire_tasks: tuple[TaskNetSpec, ...] = ()
    # Tasks wired as desired but for their DNS redirect (a new DNS endpoint): the rules alone.
    task_dns: tuple[tuple[str, DnsRulesChange], ...] = ()  # (task netns, its DNS change)
    # Node-side links to delete (before the namespaces): unwired tasks' legs, stale veths, old
    # bridges. A task's legs go by name: the kernel frees a deleted namespace, and with it the
    # node ends of its veths, only later (in a work queue, once no socket or process holds it).
    delete_links: tuple[str, ...] = ()
    unwire_tasks: tuple[str, ...] = ()  # task namespaces to delete
    tables: dict[str, TableChange] = field(default_factory=dict)
    # Names meshctl wants in the node namespace held by links without its mark, and their
    # aliases: left alone (and what would hang off them not made), reported, never converged.
    clashes: tuple[tuple[str, str | None], ...] = ()
    # Overlays: VXLAN devices to make or set right (after the bridges), their peer entries,
    # and devices to delete.
    ensure_overlays: tuple[OverlaySpec, ...] = ()
    peers: tuple[PeerChange, ...] = ()
    delete_overlays: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(
            self.ensure_overlays
            or self.peers
            or self.delete_overlays
            or self.ensure_bridges
            or self.wire_tasks
            or self.task_dns
            or self.unwire_tasks
            or self.delete_links
            or self.tables
            or self.clashes
        )


def wanted_marks(desired: NodeSpec) -> dict[str, str]:
    """Every link meshctl wants in the node namespace, with the mark it must carry."""
    marks = {bridge.name: bridge.mark for bridge in desired.bridges.values()}
    marks.update((device, spec.mark) for device, spec in desired.overlays.items())
    for task in desired.tasks.values():
        marks.update((leg.node_end, naming.mark(task.task_id)) for leg in task.links)
    return marks


def clashes(desired: NodeSpec, actual: NodeSpec) -> dict[str, str | None]:
    """The names desired links need that links with another alias hold, with that alias."""
    return {
        name: actual.link_aliases[name]
        for name, mark in sorted(wanted_marks(desired).items())
        if name in actual.link_aliases and actual.link_aliases[name] != mark
    }


def plan_node(desired: NodeSpec, actual: NodeSpec, stray_links: Collection[str] = ()) -> NodePlan:
    """The smallest change from actual to desired; empty (falsy) when they agree.

    stray_links are node-side links of meshctl's (marked) that belong to nothing observed (a
    veth whose task namespace is gone); they are deleted, and so are the legs of the tasks
    unwired. A name that a desired link needs, held by a link without the mark meshctl gives
    it (`clashes`), is left alone — neither deleted nor taken over — and the bridge or task
    that needs it is not made: reported.
    """
    taken = clashes(desired, actual)
    tables = {}
    for table in sorted(set(desired.tables) | set(actual.tables)):
        change = table_change(
            desired.tables.get(table, OwnedTable()), actual.tables.get(table, OwnedTable())
        )
        if not change.empty:
            tables[table] = change
    wire, dns = [], []
    for task_id, want in sorted(desired.tasks.items()):
        have = actual.tasks.get(task_id)
        if have == want or any({leg.node_end, leg.bridge} & taken.keys() for leg in want.links):
            continue
        if have is not None and replace(have, dns=want.dns) == want:
            redirect = want.dns.change_from(have.dns)
            if not redirect.empty:
                dns.append((want.netns, redirect))
        else:
            wire.append(want)
    overlays = {
        d: o for d, o in desired.overlays.items() if d not in taken and o.bridge not in taken
    }
    ensure_overlays, peers, delete_overlays = plan_overlays(overlays, actual.overlays)
    unwired = [
        task
        for task_id, task in sorted(actual.tasks.items())
        if task_id not in desired.tasks and task.owns_netns
    ]
    legs = {leg.node_end for task in unwired for leg in task.links if leg.node_end}
    old_bridges = {b for b in actual.bridges if b not in desired.bridges}
    return NodePlan(
        ensure_overlays=ensure_overlays,
        peers=peers,
        delete_overlays=tuple(d for d in delete_overlays if d not in taken),
        ensure_bridges=tuple(
            b
            for name, b in sorted(desired.bridges.items())
            if actual.bridges.get(name) != b and name not in taken
        ),
        wire_tasks=tuple(wire),
        task_dns=tuple(dns),
        delete_links=tuple(sorted({*stray_links, *legs, *old_bridges} - taken.keys())),
        unwire_tasks=tuple(task.netns for task in unwired),
        tables=tables,
        clashes=tuple(taken.items()),
    )
