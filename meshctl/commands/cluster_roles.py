"""A node's role and its leaving (#26), in swarm's words: `node promote` and `node demote` on a
manager, `node rm` of a node gone for good, `cluster leave` on the node that goes.

A node's role is its etcd user's roles: the manager that promotes or demotes a node changes
them (as root), so the store enforces the new role from that moment, whatever the node runs.
The node's controller reads its own user's roles (etcd lets a user read its own) and follows
(meshctl.commands.cluster_duties): a worker made a manager asks a manager's join endpoint, with
its current certificate, for a manager's certificate, what managers share and a seat in the
store, and starts its etcd member (a learner, promoted once it has caught up); a manager made a
worker stops its member, which the demoting manager removed from the store before it changed
the roles (quorum never counts on a member that is going), and forgets the CA key and the root
password. Removing a node deletes its store user first and its record after: a failure in
between leaves a record to remove again, never a removed node whose credentials still work.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import TypeVar

from meshctl.cluster import config as cluster_config
from meshctl.cluster import etcd_member, pki
from meshctl.cluster.config import ClusterConfig, ClusterPaths, read_secret
from meshctl.cluster.etcd_member import Credentials, EtcdMember, EtcdMemberError, Member, TlsFiles
from meshctl.cluster.join import keep_managers_secrets, leave_through, renew_through, seat_through
from meshctl.cluster.membership import controller_ended
from meshctl.cluster.nodes import get_node
from meshctl.commands.cluster import (
    client_port,
    forget,
    member_config,
    node_role,
    open_cluster_store,
    seat_member,
    tls_files,
)
from meshctl.commands.node import check_removable, remove_node
from meshctl.model import LEADER, LEADER_KEY, NODE_STATUS, MeshctlError, NodeStatus, from_record
from meshctl.store import Store, StoreError
from meshctl.store.etcd import EtcdAccess, EtcdStore

T = TypeVar("T")
HEALTH_TIMEOUT = 2.0  # how long a member may take to say it is healthy, before a demotion
REVOKE_WAIT = 10.0  # a member just restarted may refuse logins for a moment


@dataclass(frozen=True)
class Admin:
    """A manager's root login to the store's administration, through one member."""

    endpoint: str  # https://HOST:PORT of the member asked
    tls: TlsFiles
    root: Credentials
    password_file: str  # the root password's file, for a store opened as root

    @classmethod
    def here(cls, state_dir: str) -> Admin:
        """This manager's administration, through its own member; MeshctlError elsewhere."""
        config = cluster_config.load(state_dir)
        if config is None:
            raise MeshctlError("this node is in no cluster: `meshctl cluster init` or `join` first")
        if config.role != "manager":
            raise MeshctlError("changing the cluster's nodes is a manager's: run this on a manager")
        paths = ClusterPaths(state_dir)
        root = Credentials(etcd_member.ROOT, read_secret(paths.root_password))
        endpoint = f"https://127.0.0.1:{client_port(config)}"
        return cls(endpoint, tls_files(paths), root, paths.root_password)

    def through(self, endpoint: str) -> Admin:
        return dataclasses.replace(self, endpoint=endpoint)

    def role_of(self, node: str) -> str | None:
        """The node's role as the store has it; None if it has no user (removed)."""
        try:
            roles = etcd_member.user_roles(self.endpoint, self.tls, self.root, node)
        except EtcdMemberError as err:
            if "not found" in str(err):
                return None
            raise
        return "manager" if "manager" in roles else "worker"

    def members(self) -> list[Member]:
        return etcd_member.members(self.endpoint, self.tls, self.root)

    def store(self, config: ClusterConfig) -> EtcdStore:
        """The cluster's store logged in as root, through this member."""
        host, _, port = self.endpoint.removeprefix("https://").rpartition(":")
        access = EtcdAccess(self.tls.ca, self.tls.cert, self.tls.key, etcd_member.ROOT,
                            self.password_file)  # fmt: skip
        return EtcdStore([(host, int(port))], config.prefix, access=access)


# -- on a manager: promote, demote, remove ------------------------------------------------------


def promote(state_dir: str, store: Store, node: str) -> bool:
    """Make a worker a manager: its user takes the manager role (desired state is its to write
    from now on) and its controller takes its seat. False if it is a manager already."""
    admin = Admin.here(state_dir)
    get_node(store, node)
    role = _role_or_refuse(admin, node)
    if role == "manager":
        return False
    etcd_member.grant_role(admin.endpoint, admin.tls, admin.root, node, "manager")
    own = node_role(node)[0]
    for dropped in ("worker", own):
        etcd_member.revoke_role(admin.endpoint, admin.tls, admin.root, node, dropped)
    etcd_member.remove_role(admin.endpoint, admin.tls, admin.root, own)
    return True


def demotion_refusal(node: str, voters: Sequence[str], answering: Collection[str]) -> str | None:
    """Why node's member must not leave the store, or None. voters: the voting members' names;
    answering: those that say they are healthy. The others must still make a quorum."""
    others = [voter for voter in voters if voter != node]
    if not others:
        return (
            f"node {node} is the last manager: promote another node first "
            "(meshctl node promote NODE)"
        )
    up = sum(voter in answering for voter in others)
    quorum = len(others) // 2 + 1
    if up < quorum:
        return (
            f"demoting {node} leaves {len(others)} managers of which {up} answer, fewer than "
            f"the {quorum} that writes need: bring the others back first"
        )
    return None


def demote(state_dir: str, store: Store, node: str) -> bool:
    """Make a manager a worker: its member leaves the store first (refused if the rest would
    be no quorum), then its user becomes a worker's and it loses the leadership; its controller
    stops the member and forgets the managers' secrets. False if it is a worker already."""
    admin = Admin.here(state_dir)
    address = get_node(store, node).address
    if _role_or_refuse(admin, node) == "worker":
        _drop_leadership(store, node)  # a demotion cut short after its roles changed
        return False
    listed = admin.members()
    peer = f"https://{address}:{cluster_config.PEER_PORT}"
    seat = [m for m in listed if m.name == node or peer in m.peer_urls]
    voters = [m for m in listed if not m.learner]
    answering = {m.name for m in voters if _answering_url(m, admin.tls)}
    refusal = demotion_refusal(node, [m.name for m in voters], answering)
    if refusal is not None:
        raise MeshctlError(refusal)
    others = [m for m in voters if m.name != node]
    admin = admin.through(next(u for m in others if (u := _answering_url(m, admin.tls))))
    for member in seat:  # if it led the store, the others elect a leader before going on
        etcd_member.remove_member(admin.endpoint, admin.tls, admin.root, member.id)
        etcd_member.wait_answers(admin.endpoint, admin.tls)
    own, perms = node_role(node)
    etcd_member.add_role(admin.endpoint, admin.tls, admin.root, own, perms)
    for role in ("worker", own):
        etcd_member.grant_role(admin.endpoint, admin.tls, admin.root, node, role)
    etcd_member.revoke_role(admin.endpoint, admin.tls, admin.root, node, "manager")
    _drop_leadership(store, node)
    return True


def _drop_leadership(store: Store, node: str) -> None:
    """Free the leader key if node holds it: another manager takes it (a worker cannot)."""
    leader = store.get(LEADER, LEADER_KEY)
    if leader is not None and leader.value.get("node") == node:
        store.delete(LEADER, LEADER_KEY, expect=leader.mod_revision)


def _role_or_refuse(admin: Admin, node: str) -> str:
    role = admin.role_of(node)
    if role is None:
        raise MeshctlError(f"node {node} has no store user: it was removed, or never joined")
    return role


def _answering_url(member: Member, tls: TlsFiles) -> str | None:
    """A client URL at which member says it is healthy, if any."""
    return next(
        (u for u in member.client_urls if etcd_member.answers(u, tls, HEALTH_TIMEOUT)), None
    )


def retire(admin: Admin, store: Store, node: str) -> None:
    """Remove a node that is down for good (`node rm`, or a worker that leaves): its store user
    and role first, so its certificate and password open nothing from then, then its record and
    what it held. A manager is demoted first (its member would weigh on the quorum)."""
    check_removable(store, node)
    if admin.role_of(node) == "manager":
        raise MeshctlError(
            f"node {node} is a manager: demote it first (meshctl node demote {node})"
        )
    revoke(admin, node)
    remove_node(store, node)


def revoke(admin: Admin, node: str) -> None:
    """Delete a node's store user and its own role: its credentials open nothing from now."""
    deadline = time.monotonic() + REVOKE_WAIT
    while True:
        try:
            etcd_member.remove_user(admin.endpoint, admin.tls, admin.root, node)
            etcd_member.remove_role(admin.endpoint, admin.tls, admin.root, node_role(node)[0])
            return
        except (StoreError, MeshctlError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


# -- on the node that leaves --------------------------------------------------------------------


def leave(state_dir: str, force: bool = False) -> str:
    """Leave the cluster from this node, whose controller is stopped: a worker is retired by a
    manager, a manager (with force only: demote it first) removes its own member, user and
    record; the last manager takes the store down with it. Then the node forgets the cluster.
    What happened, in a line."""
    config = cluster_config.load(state_dir)
    if config is None:
        raise MeshctlError("this node is in no cluster")
    paths = ClusterPaths(state_dir)
    if config.role == "manager" and not force:
        raise MeshctlError(
            f"this node is a manager: demote it first (meshctl node demote {config.node}) or "
            "leave with --force, which may cost the cluster its quorum"
        )
    try:
        with open_cluster_store(state_dir) as store:
            _end_status(store, config.node)
            if config.role == "worker":
                through_a_manager(config, lambda manager: leave_through(manager, paths))
                said = "this node left the cluster: its credentials open nothing now"
            else:
                said = _leave_as_manager(state_dir, config)
    except ControllerRuns:
        raise
    except (MeshctlError, StoreError) as err:
        if not force:
            raise
        said = (
            f"this node forgot the cluster, which was not told ({err}): on a manager, "
            f"meshctl node demote {config.node}, then node rm {config.node}"
        )
    member = member_config(paths, config, client_port(config), cluster_config.PEER_PORT)
    EtcdMember(member).stop()
    forget(paths)
    return said


class ControllerRuns(MeshctlError):
    """The node's controller runs: it must be stopped before the node leaves."""


def _end_status(store: Store, node: str) -> None:
    """End this node's status now (its lease), refused while its controller runs."""
    record = store.get(NODE_STATUS, node)
    if record is None:
        return
    if not controller_ended(from_record(NodeStatus, record)):
        raise ControllerRuns(
            "this node's controller runs: stop it first (the node leaves, its tasks move)"
        )
    store.revoke_lease(int(record.value.get("lease", 0)))


def _leave_as_manager(state_dir: str, config: ClusterConfig) -> str:
    """A manager leaves: its member, then its user, then its record, asked of another member;
    with no other member, the cluster's store ends here."""
    admin = Admin.here(state_dir)
    listed = admin.members()
    others = [m for m in listed if m.name != config.node and not m.learner]
    url = next((u for m in others if (u := _answering_url(m, admin.tls))), None)
    if url is None:
        if others:
            return "no other manager answers: this node forgot the cluster, which may be stuck"
        return "this node was the last manager: the cluster's store is gone with it"
    admin = admin.through(url)
    for member in listed:
        if member.name == config.node:
            etcd_member.remove_member(admin.endpoint, admin.tls, admin.root, member.id)
            etcd_member.wait_answers(admin.endpoint, admin.tls)
    revoke(admin, config.node)
    with admin.store(config) as store:
        remove_node(store, config.node)
    return "this node left the cluster: its member, user and record are gone"


# -- on a node whose role changed: its controller follows ---------------------------------------


def own_role(store: EtcdStore) -> str | None:
    """This node's role as the store has it (its own user's roles, asked with the login the
    store holds); None if the store does not answer."""
    try:
        roles = store.user_roles()
    except StoreError:
        return None
    return "manager" if "manager" in roles else "worker"


def through_a_manager(config: ClusterConfig, ask: Callable[[str], T]) -> tuple[T, str]:
    """ask(HOST:PORT) of each manager's join endpoint in turn, until one answers: (its answer,
    that manager's host). MeshctlError with every refusal if none does."""
    hosts = [*config.managers, *(e.rpartition(":")[0] for e in config.store)]
    errors = []
    for host in dict.fromkeys(hosts):
        if host == config.address:
            continue
        try:
            return ask(f"{host}:{config.join_port}"), host
        except MeshctlError as err:
            errors.append(str(err))
    raise MeshctlError("; ".join(errors) or "no manager known")


def become_manager(state_dir: str, config: ClusterConfig) -> ClusterConfig:
    """Take the seat the store gave this promoted node: a manager's certificate, the managers'
    secrets, its etcd member (a learner, then a voter). Its config says manager once done."""
    paths = ClusterPaths(state_dir)
    admitted, host = through_a_manager(config, lambda manager: seat_through(manager, paths))
    keep_managers_secrets(paths, admitted)
    own = f"{config.address}:{cluster_config.CLIENT_PORT}"
    store = (own, *(e for e in admitted.store if e != own))
    promoted = dataclasses.replace(config, role="manager", store=store)
    with open(paths.cert, "rb") as f:
        worker_cert = f.read()
    # The member speaks to its peers with the manager's certificate: theirs admit no other.
    pki.write_public(paths.cert, admitted.cert)
    try:
        seat_member(paths, promoted, admitted, host)
    except BaseException:
        pki.write_public(paths.cert, worker_cert)
        _drop_managers_secrets(paths)
        raise
    cluster_config.save(state_dir, promoted)
    return promoted


def become_worker(state_dir: str, config: ClusterConfig, member: EtcdMember) -> ClusterConfig:
    """Step down once the store no longer lists this node's member: stop it, drop its data and
    the managers' secrets, and take a worker's certificate. Its config says worker once done.
    MeshctlError while the member is still listed (its demotion is under way)."""
    paths = ClusterPaths(state_dir)
    me = Credentials(config.node, read_secret(paths.password))
    own = f"{config.address}:{client_port(config)}"
    others = [e for e in config.store if e != own]
    listed = _first(lambda e: etcd_member.members(f"https://{e}", tls_files(paths), me), others)
    if any(m.name == config.node for m in listed):
        raise MeshctlError("this node's member is still in the store: its demotion is under way")
    member.stop()
    shutil.rmtree(paths.etcd_dir, ignore_errors=True)
    _drop_managers_secrets(paths)
    demoted = dataclasses.replace(config, role="worker", store=tuple(others))
    cluster_config.save(state_dir, demoted)
    renewed, _ = through_a_manager(demoted, lambda manager: renew_through(manager, paths))
    pki.write_public(paths.cert, renewed)
    return demoted


def _drop_managers_secrets(paths: ClusterPaths) -> None:
    for path in (paths.ca_key, paths.root_password):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _first(ask: Callable[[str], T], endpoints: Sequence[str]) -> T:
    """ask(endpoint) of each endpoint until one answers."""
    errors = []
    for endpoint in endpoints:
        try:
            return ask(endpoint)
        except EtcdMemberError as err:
            errors.append(str(err))
    raise MeshctlError("; ".join(errors) or "no other member of the store known")
