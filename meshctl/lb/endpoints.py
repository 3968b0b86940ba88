"""Which tasks serve, and with what weight: what load balancing, DNS and the router share.

A task joins its service's VIP and its DNS answers only when it runs and is healthy (or the
service has no check). A task that is leaving (scaled away, updated, removed) or unhealthy
stays a VIP backend with weight 0 while its process runs: no new connections, established
ones continue; it is taken out when its process has stopped.
"""

from __future__ import annotations

from collections.abc import Iterable

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
