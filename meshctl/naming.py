"""Names and marks of the kernel objects meshctl makes, derived from stable ids.

Interface names carry the `mesh` prefix and a short id within the kernel's 15 characters;
namespace names carry `mesh-`; iptables chains start with `MESH-`. A name says which object a
link would be, never that meshctl made it: another tool may use the same name. What meshctl
made carries its mark, `meshctl:<object-id>` — the comment of each rule, the alias
(IFLA_IFALIAS) of each link — and only marked objects are ever changed or deleted.
"""

from __future__ import annotations

import os

LINK_PREFIX = "mesh"
TASK_NETNS_PREFIX = "mesh-t-"
LB_NETNS_PREFIX = "mesh-lb-"
ROUTER_NETNS_PREFIX = "mesh-r-"
CHAIN_PREFIX = "MESH-"
TASK_VETH_PREFIX = f"{LINK_PREFIX}v"
CONTAINER_VETH_PREFIX = f"{LINK_PREFIX}c"
ROUTER_VETH_PREFIX = f"{LINK_PREFIX}r"
MARK_PREFIX = "meshctl:"
LB_INTERFACE = "eth0"  # the LB namespace's leg on the bridge, named as a task's first leg


def mark(object_id: str) -> str:
    """The alias of a link meshctl made for an object: a network's bridge and its LB leg carry
    the network's id, a task's veth the task's, an attached container's veth the container's."""
    return f"{MARK_PREFIX}{object_id}"


def is_marked(alias: str | None) -> bool:
    """Whether a link's alias says meshctl made it."""
    return alias is not None and alias.startswith(MARK_PREFIX)


def clash_text(name: str, alias: str | None) -> str:
    """A link that holds a name meshctl wants without the mark meshctl gives it there, as one
    line with what to do (for the log and `meshctl diff`)."""
    has = "no alias" if alias is None else f"alias {alias!r}"
    return (
        f"link {name} in the node namespace does not carry meshctl's mark for it ({has}): "
        f"left alone, and what needs it is not made; delete or rename it to let meshctl make "
        f"its own"
    )


def could_be_ours(link_name: str) -> bool:
    """Whether meshctl could want a link of this name (to look for clashes; never to own it)."""
    return link_name.startswith(LINK_PREFIX)


def bridge(network_id: str) -> str:
    """The bridge of a network on a node: `mesh` + 8 id characters."""
    return f"{LINK_PREFIX}{network_id[:8]}"


VXLAN_PREFIX = f"{LINK_PREFIX}x"


def vxlan(network_id: str) -> str:
    """An overlay network's VXLAN device on a node: `meshx` + 8 id characters."""
    return f"{VXLAN_PREFIX}{network_id[:8]}"


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


def router_id(node_id: str) -> str:
    """The id a node's router is marked with (meshctl:router-<node-id>)."""
    return f"router-{node_id}"


def router_netns(node_id: str) -> str:
    """`mesh-r-<node-id-8>`: the namespace of the node's HTTP router (HAProxy)."""
    return f"{ROUTER_NETNS_PREFIX}{node_id[:8]}"


def router_veth(network_id: str) -> str:
    """The node end of the router's leg on a network: `meshr` + 8 network id characters
    (inside, the leg is named as an attached container's: container_interface)."""
    return f"{ROUTER_VETH_PREFIX}{network_id[:8]}"


def task_dir(state_dir: str, task_id: str) -> str:
    """Where a node keeps one task's files: its log, resolv.conf and hosts, its DNS ports."""
    return os.path.join(state_dir, "tasks", task_id)
