"""The cluster's own verbs: init (CA, first etcd member, auth, tokens), join tokens, the store a
member of the cluster opens, and what a manager's controller runs beside its passes (its etcd
member and the join endpoint)."""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass
from typing import Literal

from meshctl.cluster import config as cluster_config
from meshctl.cluster import etcd_member, pki
from meshctl.cluster.config import ClusterConfig, ClusterPaths, read_secret
from meshctl.cluster.etcd_member import Credentials, EtcdMember, MemberConfig, TlsFiles
from meshctl.cluster.join import Authority, JoinServer
from meshctl.cluster.tokens import make_token
from meshctl.model import NODE, MeshctlError
from meshctl.store import Store, StoreError
from meshctl.store.etcd import EtcdAccess, EtcdStore

log = logging.getLogger("meshctl.cluster")

# Keys only managers may read or write (the worker role has no permission on them): the join
# tokens. Not under the store's prefix: a permission on "/meshctl" is a key range that covers
# every key that starts with it.
SECRETS_PREFIX = "/secrets/meshctl"
JOIN_TOKEN = "join-token"
ROLE_PREFIXES = {
    "manager": (*etcd_member.ROLE_PREFIXES["manager"], SECRETS_PREFIX),
    # Narrowed once a task's desired state and its node's reports are separate keys (#26).
    "worker": tuple(etcd_member.ROLE_PREFIXES["worker"]),
}
START_TIMEOUT = 30.0


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
                  state: Literal["new", "existing"] = "new") -> MemberConfig:  # fmt: skip
    return MemberConfig(
        name=config.node, data_dir=paths.etcd_dir, address=config.address, tls=tls_files(paths),
        client_port=client_port, peer_port=peer_port, cluster_state=state,
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
    endpoints = [_host_port(e) for e in config.store]
    return EtcdStore(endpoints, prefix or config.prefix, access=node_access(paths, config))


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _host_port(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    return host, int(port)


# -- init and tokens ----------------------------------------------------------------------------


def init(state_dir: str, node: str, address: str, client_port: int, peer_port: int,
         join_port: int) -> JoinTokens:  # fmt: skip
    """Found a cluster on this node: CA, the manager's certificate, its etcd member with auth
    and roles, its store user, and a join token per role. Nothing is left half made: on a
    failure the membership files go and the member stops."""
    if cluster_config.load(state_dir) is not None:
        raise MeshctlError(f"this node is in a cluster already ({ClusterPaths(state_dir).config})")
    paths = ClusterPaths(state_dir)
    paths.make_dir()
    config = ClusterConfig(
        node, "manager", address, store=(f"{address}:{client_port}",), join_port=join_port,
        managers=(address,),
    )  # fmt: skip
    ca_cert, ca_key = pki.make_ca()
    cert, key = pki.make_node_cert(ca_cert, ca_key, node=node, role="manager", addresses=[address])
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
        etcd_member.enable_auth(local, tls_files(paths), root.password, ROLE_PREFIXES)
        etcd_member.add_user(local, tls_files(paths), root, node, password, "manager")
        cluster_config.save(state_dir, config)
        tokens = {role: make_token(pki.ca_digest(ca_cert), role) for role in ("worker", "manager")}
        with open_cluster_store(state_dir, SECRETS_PREFIX) as secrets_store:
            for role, token in tokens.items():
                secrets_store.put(JOIN_TOKEN, role, {"token": token})
    except BaseException:
        member.stop()
        _forget(paths)
        raise
    return JoinTokens(tokens, f"{address}:{join_port}")


def _forget(paths: ClusterPaths) -> None:
    import shutil

    shutil.rmtree(paths.dir, ignore_errors=True)


def join_token(state_dir: str, role: str, *, rotate: bool = False) -> JoinTokens:
    """The current join token of role (a new one first if rotate), read by a manager."""
    config = cluster_config.load(state_dir)
    if config is None or config.role != "manager":
        raise MeshctlError("join tokens are a manager's: run this on a manager")
    paths = ClusterPaths(state_dir)
    with open_cluster_store(state_dir, SECRETS_PREFIX) as secrets_store:
        if rotate:
            token = make_token(pki.ca_digest(_read(paths.ca_cert)), role)
            secrets_store.put(JOIN_TOKEN, role, {"token": token})
        record = secrets_store.get(JOIN_TOKEN, role)
    if record is None:
        raise MeshctlError(f"no {role} join token in the store: rotate one (--rotate)")
    return JoinTokens({role: str(record.value["token"])}, f"{config.address}:{config.join_port}")


# -- a manager's controller ---------------------------------------------------------------------


class ManagerDuties:
    """What a manager runs beside its controller's passes: its etcd member (adopted if it runs,
    else started: it outlives the controller as tasks do) and the join endpoint."""

    def __init__(self, state_dir: str, config: ClusterConfig) -> None:
        self.state_dir = state_dir
        self.config = config
        self.paths = ClusterPaths(state_dir)
        client_port = _host_port(config.store[0])[1] if config.store else cluster_config.CLIENT_PORT
        self.member = EtcdMember(
            member_config(self.paths, config, client_port, cluster_config.PEER_PORT)
        )
        self.join_server: JoinServer | None = None

    def start_member(self) -> None:
        if self.member.adopt() is not None:
            log.info("adopted the node's etcd member")
        else:
            self.member.start(timeout=START_TIMEOUT)
            log.info("started the node's etcd member")

    def serve_joins(self, store: Store) -> None:
        root = Credentials(etcd_member.ROOT, read_secret(self.paths.root_password))
        local = self.member.config.local_url
        tls = tls_files(self.paths)
        secrets_store = open_cluster_store(self.state_dir, SECRETS_PREFIX)

        def current_token(role: str) -> str | None:
            record = secrets_store.get(JOIN_TOKEN, role)
            return str(record.value["token"]) if record else None

        authority = Authority(
            ca_cert=_read(self.paths.ca_cert),
            ca_key=_read(self.paths.ca_key),
            store=self.config.store, prefix=self.config.prefix,
            current_token=current_token,
            known=lambda node: store.get(NODE, node) is not None,
            add_user=lambda node, password, role: etcd_member.add_user(
                local, tls, root, node, password, role),
        )  # fmt: skip
        self.join_server = JoinServer(
            (self.config.address, self.config.join_port), authority, self.paths.cert,
            self.paths.key,
        )  # fmt: skip
        self.join_server.start()
        log.info("taking joining nodes on %s:%d", self.config.address, self.config.join_port)

    def stop(self) -> None:
        """Stop taking joins; the member keeps running for the next controller."""
        if self.join_server is not None:
            self.join_server.stop()


def revoke(state_dir: str, node: str) -> None:
    """Delete a removed node's store user: its certificate and password open nothing from now."""
    config = cluster_config.load(state_dir)
    if config is None:
        return
    if config.role != "manager":
        raise MeshctlError("removing a node is a manager's: run this on a manager")
    paths = ClusterPaths(state_dir)
    root = Credentials(etcd_member.ROOT, read_secret(paths.root_password))
    port = _host_port(config.store[0])[1]
    deadline = time.monotonic() + 10
    while True:
        try:
            etcd_member.remove_user(f"https://127.0.0.1:{port}", tls_files(paths), root, node)
            return
        except (StoreError, MeshctlError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
