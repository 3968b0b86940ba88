"""Names of the kernel objects meshctl makes: recognisably its own, derived from stable ids.

Interface names carry the `mesh` prefix and a short id within the kernel's 15 characters;
namespace names carry `mesh-`; iptables chains start with `MESH-`. Nothing else is ever touched.
"""

from __future__ import annotations

LINK_PREFIX = "mesh"
TASK_NETNS_PREFIX = "mesh-t-"
LB_NETNS_PREFIX = "mesh-lb-"
CHAIN_PREFIX = "MESH-"
TASK_VETH_PREFIX = f"{LINK_PREFIX}v"
CONTAINER_VETH_PREFIX = f"{LINK_PREFIX}c"


def bridge(network_id: str) -> str:
    """The bridge of a network on a node: `mesh` + 8 id characters."""
    return f"{LINK_PREFIX}{network_id[:8]}"


def task_netns(task_id: str) -> str:
    """A task's namespace; task ids are unique across nodes, so the name is too."""
    return f"{TASK_NETNS_PREFIX}{task_id}"


def task_veth(task_id: str, index: int) -> str:
    """The node-side end of a task's veth on its index-th network: `meshv` + 8 + 1 hex digit."""
    return f"{TASK_VETH_PREFIX}{task_id[:8]}{index:x}"


def task_interface(index: int) -> str:
    """The task-side end, named as Docker names a container's interfaces."""
    return f"eth{index}"


def container_veth(container_id: str) -> str:
    """The node-side end of an attached container's veth: `meshc` + 8 id characters."""
    return f"{CONTAINER_VETH_PREFIX}{container_id[:8]}"


def container_interface(network_id: str) -> str:
    """The container-side end: named for the network, so it never clashes with the runtime's own
    interfaces (Docker's eth0) and says whose it is."""
    return f"{LINK_PREFIX}-{network_id[:8]}"


def lb_netns_prefix(node_id: str) -> str:
    """The prefix of every LB namespace of this node: what `sync` may delete, and nothing else."""
    return f"{LB_NETNS_PREFIX}{node_id[:8]}-"


def lb_netns(node_id: str, network_id: str) -> str:
    """`mesh-lb-<node-id-8>-<network-id-8>`: one LB namespace per network per node."""
    return f"{lb_netns_prefix(node_id)}{network_id[:8]}"


def lb_node_end(network_id: str) -> str:
    """The node end of the LB leg's veth, enslaved to the network's bridge: `meshl` + 8."""
    return f"{LINK_PREFIX}l{network_id[:8]}"


def is_task_netns(name: str) -> bool:
    return name.startswith(TASK_NETNS_PREFIX)


def owns_link(name: str) -> bool:
    return name.startswith(LINK_PREFIX)
