"""`meshctl diff`: what this node's kernel lacks or has too much of, compared to the store.

It computes exactly what a controller pass would plan — node networking and load balancers —
without applying anything, and prints one line per difference. What only a running controller
knows is read from where it leaves it: which task processes run (their pid and start time in
the store) and the DNS ports of each task (`dns-ports` in the task's directory).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

from kernel.iptables_rules import OwnedTable, table_lines
from kernel.system import Kernel
from meshctl import naming
from meshctl.controller.dataplane import choose_task_dns
from meshctl.lb.desired import lb_specs
from meshctl.lb.plan import LbPlan
from meshctl.lb.reconcile import LbReconciler
from meshctl.node.desired import NodePlan, container_spec, desired_node, plan_node
from meshctl.node.kernel import blocked_ports, observe_node
from meshctl.overlay.vxlan import NO_UNDERLAY, Underlay
from meshctl.router import haproxy
from meshctl.router.config import fingerprint_of
from meshctl.router.desired import router_spec
from meshctl.router.net import describe_net, plan_router_net, router_net_spec
from meshctl.router.slots import plan_runtime
from meshctl.router.sync import router_files
from meshctl.runtime import read_start_time
from meshctl.view import ClusterView

DNS_PORTS_FILE = "dns-ports"


def write_dns_ports(task_dir: str, ports: tuple[int, int]) -> None:
    os.makedirs(task_dir, exist_ok=True)
    with open(os.path.join(task_dir, DNS_PORTS_FILE), "w") as f:
        json.dump(list(ports), f)


def read_dns_ports(state_dir: str, task_ids: list[str]) -> dict[str, tuple[int, int]]:
    ports = {}
    for task_id in task_ids:
        try:
            with open(os.path.join(state_dir, "tasks", task_id, DNS_PORTS_FILE)) as f:
                udp, tcp = json.load(f)
        except (FileNotFoundError, ValueError):
            continue
        ports[task_id] = (int(udp), int(tcp))
    return ports


def running_here(view: ClusterView, node: str) -> set[str]:
    """The tasks of this node that should be wired: wanted running, or their process lives."""
    return {
        t.id
        for t in view.tasks_on(node)
        if t.desired_state == "running"
        or (t.pid is not None and read_start_time(t.pid) == t.start_time)
    }


def node_differences(
    kernel: Kernel,
    view: ClusterView,
    node: str,
    node_id: str,
    state_dir: str,
    lb: LbReconciler,
    underlay: Underlay = NO_UNDERLAY,
) -> tuple[NodePlan, LbPlan]:
    wired = running_here(view, node)
    containers = [
        spec
        for c in view.containers.values()
        if c.node == node and (spec := container_spec(view, c, underlay=underlay)) is not None
    ]
    mine = {task.id for task in view.tasks_on(node)}
    task_dns = choose_task_dns(kernel)
    actual, stray = observe_node(kernel, containers, mine=mine, task_dns=task_dns)
    blocked = blocked_ports(kernel, view, actual.tables.get("nat", OwnedTable()))
    dns_ports = read_dns_ports(state_dir, sorted(wired))
    desired = desired_node(view, node, wired, dns_ports, blocked, underlay, task_dns)
    node_plan = plan_node(desired, actual, stray)
    lb_plan = lb.plan(lb_specs(view, node, node_id, underlay), naming.lb_netns_prefix(node_id))
    return node_plan, lb_plan


def describe(node_plan: NodePlan, lb_plan: LbPlan) -> Iterator[str]:
    """One line per difference: `+` to add, `-` to remove, `~` to change, `!` what meshctl
    will not change because it is not its own (a link of the name it wants, without its mark)."""
    for name, alias in node_plan.clashes:
        yield f"! {naming.clash_text(name, alias)}"
    for bridge in node_plan.ensure_bridges:
        yield f"~ bridge {bridge.name} {bridge.address} mtu {bridge.mtu}"
    for device in node_plan.delete_overlays:
        yield f"- vxlan {device}"
    for overlay in node_plan.ensure_overlays:
        yield f"~ vxlan {overlay.device} vni {overlay.vni} port {overlay.port} mtu {overlay.mtu}"
    for peers in node_plan.peers:
        for peer in sorted(peers.add):
            yield f"+ peer {peer.address} {peer.mac} via {peer.vtep} on {peers.device}"
        for neighbour in sorted(peers.remove_neighbours, key=lambda n: n.address):
            yield f"- neighbour {neighbour.address} {neighbour.mac} on {peers.device}"
        for entry in sorted(peers.remove_fdb, key=lambda e: e.mac):
            yield f"- fdb {entry.mac} via {entry.dst} on {peers.device}"
    for task in node_plan.wire_tasks:
        yield f"~ task namespace {task.netns} ({len(task.links)} legs)"
    for ns, redirect in node_plan.task_dns:
        yield from redirect.lines(ns)
    for ns in node_plan.unwire_tasks:
        yield f"- task namespace {ns}"
    for link in node_plan.delete_links:
        yield f"- link {link}"
    for table, change in node_plan.tables.items():
        yield from table_lines("node", table, change)
    for ns_change in lb_plan.changes:
        ns = ns_change.spec.netns
        for name, alias in ns_change.clashes:
            yield f"! {ns}: {naming.clash_text(name, alias)}"
        if ns_change.create_netns:
            yield f"+ load-balancer namespace {ns}"
        if ns_change.ensure_leg:
            yield f"~ {ns}: leg {ns_change.spec.node_end} on {ns_change.spec.bridge}"
        for key, value in ns_change.sysctls.items():
            yield f"~ {ns}: sysctl {key}={value}"
        for address in ns_change.add_addresses:
            yield f"+ {ns}: address {address}"
        for address in ns_change.delete_addresses:
            yield f"- {ns}: address {address}"
        if ns_change.objects is not None:
            yield from ns_change.objects.lines(ns)
        for flow in ns_change.stale_udp:
            yield f"- {ns}: udp conntrack {flow.vip} -> {flow.backend}"
    for ns in lb_plan.delete_netns:
        yield f"- load-balancer namespace {ns}"
    for ns in lb_plan.unmarked_netns:
        yield f"! load-balancer namespace {ns} has no leg with meshctl's mark: left alone"


def router_differences(
    kernel: Kernel,
    view: ClusterView,
    node: str,
    node_id: str,
    state_dir: str,
    underlay: Underlay = NO_UNDERLAY,
) -> Iterator[str]:
    """The router's differences, one line each: its namespace and legs, whether HAProxy runs,
    whether it runs the configuration the store asks for (a reload is due if not), and the
    server changes the runtime API would make."""
    desired = router_net_spec(view, node, node_id, underlay)
    yield from describe_net(plan_router_net(kernel, desired, node_id))
    spec = router_spec(view, node)
    files = router_files(state_dir)
    process = haproxy.adopt(files)
    if process is not None:
        process.close()
    if spec is None:
        if process is not None:
            yield f"- router haproxy pid {process.pid}"
        return
    if process is None:
        yield "+ router haproxy (not running)"
        return
    if fingerprint_of(haproxy.read_config(files) or "") != spec.fingerprint():
        yield "~ router configuration: routes, certificates or ports changed (reload due)"
        return
    try:
        commands = plan_runtime(spec, haproxy.servers(files))
    except haproxy.RouterError as err:
        yield f"! router: {err}"
        return
    if commands is None:
        yield "~ router servers: more than the slots hold (reload due)"
        return
    yield from (f"~ router: {command}" for command in commands)
