"""The cluster's own verbs: init (CA, first etcd member, auth, tokens), join (and a new
manager's seat in the store), join tokens, and the store a member of the cluster opens. What a
node's controller runs beside its passes is meshctl.commands.cluster_duties; roles and leaving
are meshctl.commands.cluster_roles."""

from __future__ import annotations

import logging
import secrets
import shutil
from dataclasses import dataclass
from typing import Literal

from meshctl import ipam
from meshctl.cluster import config as cluster_config
from meshctl.cluster import etcd_member, pki
from meshctl.cluster.config import ClusterConfig, ClusterPaths
from meshctl.cluster.etcd_member import Credentials, EtcdMember, MemberConfig, TlsFiles
from meshctl.cluster.join import (
    Admission,
    join,
    remove_membership,
)
from meshctl.cluster.tokens import make_token
from meshctl.model import NODE, NODE_STATUS, TASK, MeshctlError
from meshctl.store.etcd import EtcdAccess, EtcdStore

log = logging.getLogger("meshctl.cluster")

# What each role may do in the store, enforced by etcd, not by the CLI. Managers write desired
# state (networks, services, nodes' availability and labels) and read the join tokens, kept
# outside the store's prefix (a permission on "/meshctl" is a key range that covers every key
# starting with it). A worker reads the cluster and writes only what its controller must: its
# tasks' states, the addresses it claims, and through a role of its own (node_role) its node
# record and status. It cannot write a service (a task's command), a network, another node's
# record or status, the leadership or the event log, nor read the join tokens.
SECRETS_PREFIX = "/secrets/meshctl"
JOIN_TOKEN = "join-token"
_PREFIX = cluster_config.ClusterConfig.prefix
ROLE_PERMISSIONS: dict[str, tuple[str | dict[str, str], ...]] = {
    "manager": (_PREFIX, SECRETS_PREFIX),
    "worker": (
        etcd_member.prefix_permission(_PREFIX, "READ"),
        *(f"{_PREFIX}/{kind}/" for kind in (TASK, ipam.KIND, ipam.ADDRESS)),
    ),
}


def node_role(node: str) -> tuple[str, tuple[dict[str, str], ...]]:
    """A worker's own role: its node record and its status, and nobody else's."""
    keys = (f"{_PREFIX}/{NODE}/{node}", f"{_PREFIX}/{NODE_STATUS}/{node}")
    return f"node:{node}", tuple(etcd_member.key_permission(key) for key in keys)


def add_node_user(endpoint: str, tls: TlsFiles, root: Credentials, node: str, password: str,
                  role: str) -> None:  # fmt: skip
    """The store user of a node: a manager's role, or the worker role and the node's own."""
    roles = [role]
    if role == "worker":
        own, perms = node_role(node)
        etcd_member.add_role(endpoint, tls, root, own, perms)
        roles.append(own)
    etcd_member.add_user(endpoint, tls, root, node, password, roles)


START_TIMEOUT = 30.0
RECONFIG_WAIT = 15.0  # seconds etcd may refuse a membership change ("unhealthy cluster")


@dataclass(frozen=True)
class JoinTokens:
    """The join tokens asked for, and the manager a node joins through."""

    tokens: dict[str, str]
    manager: str  # ADDRESS:PORT of the join endpoint

    def join_command(self, role: str) -> str:
        return (
            f"meshctl cluster join --token {self.tokens[role]} "
            f"--advertise-addr <its address> {self.manager}"
        )


def tls_files(paths: ClusterPaths) -> TlsFiles:
    return TlsFiles(paths.ca_cert, paths.cert, paths.key)


def member_config(paths: ClusterPaths, config: ClusterConfig, client_port: int, peer_port: int,
                  state: Literal["new", "existing"] = "new",
                  members: dict[str, str] | None = None) -> MemberConfig:  # fmt: skip
    return MemberConfig(
        name=config.node, data_dir=paths.etcd_dir, address=config.address, tls=tls_files(paths),
        client_port=client_port, peer_port=peer_port, cluster_state=state,
        initial_cluster=members or {},
    )  # fmt: skip


def node_access(paths: ClusterPaths, config: ClusterConfig) -> EtcdAccess:
    """How this node reaches the store: TLS with its certificate, logged in as itself."""
    return EtcdAccess(paths.ca_cert, paths.cert, paths.key, config.node, paths.password)


def open_cluster_store(state_dir: str, prefix: str | None = None) -> EtcdStore:
    """The cluster's store as this node may use it (prefix: another key prefix, e.g. the
    managers' secrets). MeshctlError if this node is in no cluster."""
    config = cluster_config.load(state_dir)
    if config is None:
        raise MeshctlError("this node is in no cluster: `meshctl cluster init` or `join` first")
    paths = ClusterPaths(state_dir)
    endpoints = [host_port(e) for e in config.store]
    return EtcdStore(endpoints, prefix or config.prefix, access=node_access(paths, config))


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def host_port(endpoint: str) -> tuple[str, int]:
    """(HOST, PORT) of HOST:PORT."""
    host, _, port = endpoint.rpartition(":")
    return host, int(port)


def client_port(config: ClusterConfig) -> int:
    """The client port of this node's member (a manager's), as its store endpoints say."""
    own = f"{config.address}:{cluster_config.CLIENT_PORT}"
    return host_port(own if own in config.store else config.store[0])[1]


# -- init and tokens ----------------------------------------------------------------------------


def init(state_dir: str, node: str, address: str, client_port: int, peer_port: int,
         join_port: int, cert_days: float = cluster_config.CERT_DAYS) -> JoinTokens:  # fmt: skip
    """Found a cluster on this node: CA, the manager's certificate, its etcd member with auth
    and roles, its store user, and a join token per role. Nothing is left half made: on a
    failure the membership files go and the member stops."""
    if cluster_config.load(state_dir) is not None:
        raise MeshctlError(f"this node is in a cluster already ({ClusterPaths(state_dir).config})")
    paths = ClusterPaths(state_dir)
    paths.make_dir()
    config = ClusterConfig(
        node, "manager", address, store=(f"{address}:{client_port}",), join_port=join_port,
        managers=(address,), cert_days=cert_days,
    )  # fmt: skip
    ca_cert, ca_key = pki.make_ca()
    cert, key = pki.make_node_cert(ca_cert, ca_key, node=node, role="manager", addresses=[address],
                                   days=cert_days)  # fmt: skip
    pki.write_public(paths.ca_cert, ca_cert)
    pki.write_private(paths.ca_key, ca_key)
    pki.write_public(paths.cert, cert)
    pki.write_private(paths.key, key)
    root = Credentials(etcd_member.ROOT, secrets.token_urlsafe(24))
    password = secrets.token_urlsafe(24)
    pki.write_private(paths.root_password, root.password.encode())
    pki.write_private(paths.password, password.encode())
    member = EtcdMember(member_config(paths, config, client_port, peer_port))
    try:
        member.start(timeout=START_TIMEOUT)
        local = member.config.local_url
        etcd_member.enable_auth(local, tls_files(paths), root.password, ROLE_PERMISSIONS)
        add_node_user(local, tls_files(paths), root, node, password, "manager")
        cluster_config.save(state_dir, config)
        tokens = {role: make_token(pki.ca_digest(ca_cert), role) for role in ("worker", "manager")}
        with open_cluster_store(state_dir, SECRETS_PREFIX) as secrets_store:
            for role, token in tokens.items():
                secrets_store.put(JOIN_TOKEN, role, {"token": token})
    except BaseException:
        member.stop()
        forget(paths)
        raise
    return JoinTokens(tokens, f"{address}:{join_port}")


def forget(paths: ClusterPaths) -> None:
    """Drop the node's whole cluster directory: config, keys, passwords, its member's data."""
    shutil.rmtree(paths.dir, ignore_errors=True)


def join_cluster(state_dir: str, manager: str, token: str, node: str, address: str) -> Admission:
    """Join through manager; a manager then starts its etcd member in the seat it was given."""
    admitted = join(manager, token, node, address, state_dir)
    if admitted.role != "manager":
        return admitted
    config = cluster_config.load(state_dir)
    assert config is not None
    try:
        seat_member(ClusterPaths(state_dir), config, admitted, manager.partition(":")[0])
    except BaseException:
        remove_membership(state_dir)
        raise
    return admitted


def seat_member(paths: ClusterPaths, config: ClusterConfig, admitted: Admission,
                manager: str) -> None:  # fmt: skip
    """Start a new manager's etcd member in the seat a manager (host) gave it, as a learner,
    and have it promoted to a voter once it has caught up, asked of that manager's member (a
    learner serves no client request). On a failure the learner is removed again, the member
    stopped and its data dropped: no seat is left to weigh on the quorum."""
    ports = cluster_config.CLIENT_PORT, cluster_config.PEER_PORT
    member = EtcdMember(member_config(paths, config, *ports, "existing", admitted.members))
    root = Credentials(etcd_member.ROOT, admitted.root_password)
    voter = f"https://{manager}:{cluster_config.CLIENT_PORT}"
    try:
        member.start(timeout=START_TIMEOUT)
        etcd_member.promote(voter, tls_files(paths), root, admitted.member_id)
    except BaseException:
        member.stop()
        try:
            etcd_member.remove_member(voter, tls_files(paths), root, admitted.member_id,
                                      timeout=RECONFIG_WAIT)  # fmt: skip
        except MeshctlError as err:
            log.warning("the learner %x stays in the store: %s", admitted.member_id, err)
        shutil.rmtree(paths.etcd_dir, ignore_errors=True)
        raise


def join_token(state_dir: str, role: str, *, rotate: bool = False) -> JoinTokens:
    """The current join token of role (a new one first if rotate), read by a manager."""
    config = cluster_config.load(state_dir)
    if config is None or config.role != "manager":
        raise MeshctlError("join tokens are a manager's: run this on a manager")
    paths = ClusterPaths(state_dir)
    with open_cluster_store(state_dir, SECRETS_PREFIX) as secrets_store:
        if rotate:
            token = make_token(pki.ca_digest(read_bytes(paths.ca_cert)), role)
            secrets_store.put(JOIN_TOKEN, role, {"token": token})
        record = secrets_store.get(JOIN_TOKEN, role)
    if record is None:
        raise MeshctlError(f"no {role} join token in the store: rotate one (--rotate)")
    return JoinTokens({role: str(record.value["token"])}, f"{config.address}:{config.join_port}")
