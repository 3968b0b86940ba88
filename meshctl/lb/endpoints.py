"""Which tasks serve, and with what weight: what load balancing, DNS and the router share.

A task joins its service's VIP and its DNS answers only when it runs and is healthy (or the
service has no check). A task that is leaving (scaled away, updated, removed) or unhealthy
stays a VIP backend with weight 0 while its process runs: no new connections, established
ones continue; it is taken out when its process has stopped. Its own node stops it only once
every other node balancing over it has taken it out of its spread too (the end of this file).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from meshctl import naming
from meshctl.lb.spec import Backend
from meshctl.model import Task
from meshctl.view import ClusterView


def serving(task: Task) -> bool:
    """Whether the task gets new connections and appears in DNS answers."""
    return (
        task.desired_state == "running"
        and task.state == "running"
        and task.health in ("none", "healthy")
    )


def backend_weight(task: Task) -> int | None:
    """1 serving, 0 draining (running but leaving or unhealthy), None not a backend at all."""
    if serving(task):
        return 1
    if task.state == "running" and task.pid is not None and task.health != "starting":
        return 0
    return None


def reachable(view: ClusterView, task: Task, network: str, node: str) -> bool:
    """Whether `node` can send to the task on the network: it runs there, or on another node
    that is up, on a network that spans nodes (a bridge network is one node's own)."""
    if task.node == node:
        return True
    if not task.node or not view.up(task.node):
        return False
    net = view.networks.get(network)
    return net is not None and (net.driver != "bridge" or task.node == node)


def weights(view: ClusterView, tasks: Iterable[Task], network: str, node: str) -> dict[str, int]:
    """The endpoints of a service on one network that node reaches: each address of its tasks
    (`tasks`) that is a backend, with its weight (1 serving, 0 draining)."""
    found: dict[str, int] = {}
    for task in tasks:
        if network not in task.addresses:
            continue
        if not reachable(view, task, network, node):
            continue
        weight = backend_weight(task)
        if weight is None:
            continue
        address = task.addresses[network]
        # A slot being replaced may briefly have two tasks; an address is one endpoint.
        found[address] = max(weight, found.get(address, 0))
    return found


def backends_of(
    view: ClusterView, tasks: Iterable[Task], network: str, node: str
) -> tuple[Backend, ...]:
    """A VIP's backends on one network, each with its weight."""
    found = weights(view, tasks, network, node)
    return tuple(Backend(address, weight) for address, weight in sorted(found.items()))


# -- a task leaving the spread across nodes ----------------------------------------------------
# Every node balances over every task it reaches, so a task leaving (scaled away, updated,
# removed) or unhealthy (to be replaced) must keep running until every node has taken it out of
# its spread, not only the node it runs on: else a node that learns later still sends it new
# connections, to a stopped task.
# A node says how far its load balancers have followed the tasks by reporting the newest task
# revision it has programmed (NodeStatus.programmed), and only while some task it reaches is out
# of the spread: at rest nothing is written.


def out_of_spread(task: Task) -> bool:
    """Whether the task runs on with weight 0: it is to stop, or ill (and to be replaced)."""
    return backend_weight(task) == 0


def programmed_revision(
    view: ClusterView, node: str, node_id: str, failures: Mapping[str, str]
) -> int | None:
    """What `node` reports once its pass over view is done: the newest task revision its load
    balancers now follow, while a task on another node that it balances over is out of the
    spread (leaving or unhealthy); None (no report) when none is, or the load balancer of such a
    task's network failed this pass (failures: the pass's, by kernel object)."""
    networks = view.taking_part(node)
    nets_out = {
        net
        for task in view.tasks.values()
        if task.node != node and out_of_spread(task)
        for net in task.addresses
        if net in networks and reachable(view, task, net, node)
    }
    if not nets_out:
        return None
    if any(naming.lb_netns(node_id, view.networks[net].id) in failures for net in nets_out):
        return None
    return max(view.task_revisions.values(), default=0)


def out_of_every_spread(view: ClusterView, task: Task) -> bool:
    """Whether every other live node that balances over the task has reported programming its
    revision or a later one: none sends it new connections any more."""
    revision = view.task_revisions.get(task.id, 0)
    for node, status in view.statuses.items():
        if node == task.node or status.programmed >= revision:
            continue
        shared = view.taking_part(node) & set(task.addresses)
        if any(reachable(view, task, net, node) for net in shared):
            return False
    return True
