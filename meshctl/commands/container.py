"""`container attach/detach`: a foreign network namespace's address on a network, stored for
the node's controller to wire (one veth), each write one store transaction."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping

from meshctl import ipam
from meshctl.cluster.nodes import node_views
from meshctl.commands.read import get_network
from meshctl.model import (
    CONTAINER,
    Container,
    MeshctlError,
    Network,
    NotFoundError,
    ValidationError,
    from_record,
    proc_pid,
)
from meshctl.store import Delete, Put, Store, retry_conflicts
from meshctl.store.changes import Changes, networks_by_name


def namespace_of(pid: int | None, netns: str | None) -> tuple[str, int | None]:
    """The path of the namespace `--pid` or `--netns` names, and for a PID its process's start
    time (recorded against PID reuse); refused when it is meshctl's own or the host's."""
    path = netns if netns is not None else f"/proc/{pid}/ns/net"
    _refuse_own_netns(path)
    return path, _start_time(path)


def _refuse_own_netns(path: str) -> None:
    """Refuse the namespace meshctl itself runs in, or the host's (PID 1's): a mesh leg there
    would wire the node itself into the network."""
    try:
        target = os.stat(path)
    except OSError:
        return  # a missing path is refused by attach_container, saying so
    for own, whose in (("/proc/self/ns/net", "meshctl's own"), ("/proc/1/ns/net", "the host's")):
        try:
            mine = os.stat(own)
        except OSError:
            continue  # PID 1's is not readable without root
        if (target.st_dev, target.st_ino) == (mine.st_dev, mine.st_ino):
            raise ValidationError(
                f"invalid namespace {path}: it is {whose} network namespace; attaching it "
                "would put a mesh leg into the node itself: give a container's namespace"
            )


def _start_time(path: str) -> int | None:
    """For /proc/PID/ns/net, the start time of PID's process, recorded against PID reuse."""
    from meshctl.runtime import read_start_time

    pid = proc_pid(path)
    if pid is None:
        return None
    start_time = read_start_time(pid)
    if start_time is None:
        raise MeshctlError(f"process {pid} is not running; give the PID of a running process")
    return start_time


def only_node(store: Store) -> str:
    """The node whose controller wires an attachment when none is named: the only one known."""
    known = [v.node.name for v in node_views(store)]
    if len(known) != 1:
        raise MeshctlError(
            f"{'no node is known' if not known else 'several nodes are known'}: "
            "say which node's controller wires it with --node NAME"
        )
    return known[0]


def attach_container(
    store: Store, name: str, netns: str, network: str, node: str, start_time: int | None = None
) -> Container:
    """Store a foreign namespace's attachment with its address; the node's controller wires it.

    start_time: for netns /proc/PID/ns/net, that process's start time (see Container)."""
    if not os.path.exists(netns):
        raise NotFoundError(f"network namespace {netns} does not exist; is the process running?")

    def attempt() -> Container:
        net = get_network(store, network)
        if store.get(CONTAINER, name) is not None:
            raise ValidationError(f"container {name} is attached already; detach it first")
        changes = Changes(store)
        container = Container(
            name, netns, net.name, node, created_at=time.time(), start_time=start_time
        )
        address = changes.allocate(net, ipam.container_owner(container.id), f"container {name}")
        container = dataclasses.replace(container, address=address)
        changes.ops.append(Put(CONTAINER, name, container.to_dict(), expect=0))
        changes.commit()
        return container

    return retry_conflicts(attempt, f"attaching container {name}")


def detach_container(store: Store, name: str) -> Container:
    """Forget an attachment and free its address; the controller removes its veth."""

    def attempt() -> Container:
        record = store.get(CONTAINER, name)
        if record is None:
            raise NotFoundError(f"container {name} is not attached; see meshctl container ls")
        container = from_record(Container, record)
        changes = Changes(store)
        drop_container(changes, container, record.mod_revision, networks_by_name(store))
        changes.commit()
        return container

    return retry_conflicts(attempt, f"detaching container {name}")


def drop_container(
    changes: Changes, container: Container, revision: int, networks: Mapping[str, Network]
) -> None:
    """Delete an attachment's record, releasing its address (into `changes`)."""
    changes.ops.append(Delete(CONTAINER, container.name, expect=revision))
    if container.network in networks:
        changes.release(networks[container.network], [ipam.container_owner(container.id)])
