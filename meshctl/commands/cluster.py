"""The cluster's own verbs: init (CA, first etcd member, auth, tokens), join tokens, the store a
member of the cluster opens, and what a manager's controller runs beside its passes (its etcd
member and the join endpoint)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Literal

from meshctl import ipam
from meshctl.cluster import config as cluster_config
from meshctl.cluster import etcd_member, pki
from meshctl.cluster.config import ClusterConfig, ClusterPaths, read_secret
from meshctl.cluster.etcd_member import Credentials, EtcdMember, MemberConfig, TlsFiles
from meshctl.cluster.join import (
    Admission,
    Authority,
    JoinServer,
    StoreSeat,
    join,
    remove_membership,
    renew_through,
)
from meshctl.cluster.tokens import make_token
from meshctl.model import NODE, NODE_STATUS, TASK, MeshctlError
from meshctl.store import Store, StoreError
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
MEMBERS_FIRST, MEMBERS_REFRESH = 2.0, 10.0  # seconds to the first look at the members, between
RECONFIG_WAIT = 15.0


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
    endpoints = [_host_port(e) for e in config.store]
    return EtcdStore(endpoints, prefix or config.prefix, access=node_access(paths, config))


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _endpoint(url: str) -> str:
    """HOST:PORT of an https://HOST:PORT client URL."""
    return url.split("://", 1)[-1].rstrip("/")


def _host_port(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    return host, int(port)


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
        _forget(paths)
        raise
    return JoinTokens(tokens, f"{address}:{join_port}")


def _forget(paths: ClusterPaths) -> None:
    import shutil

    shutil.rmtree(paths.dir, ignore_errors=True)


def join_cluster(state_dir: str, manager: str, token: str, node: str, address: str) -> Admission:
    """Join through manager; a manager then starts its etcd member (added as a learner by the
    manager that admitted it) and has it promoted to a voter once it has caught up."""
    admitted = join(manager, token, node, address, state_dir)
    if admitted.role != "manager":
        return admitted
    config = cluster_config.load(state_dir)
    assert config is not None
    paths = ClusterPaths(state_dir)
    member = EtcdMember(
        member_config(
            paths,
            config,
            cluster_config.CLIENT_PORT,
            cluster_config.PEER_PORT,
            "existing",
            admitted.members,
        )  # fmt: skip
    )
    root = Credentials(etcd_member.ROOT, admitted.root_password)
    # A learner serves no client request: its promotion is asked of the manager that admitted it.
    voter = f"https://{manager.partition(':')[0]}:{cluster_config.CLIENT_PORT}"
    try:
        member.start(timeout=START_TIMEOUT)
        etcd_member.promote(voter, tls_files(paths), root, admitted.member_id)
    except BaseException:
        member.stop()
        remove_membership(state_dir)
        raise
    return admitted


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


class ClusterDuties:
    """What a cluster's node runs beside its controller's passes: every node keeps its list of
    the store's members up to date (managers that joined after it); a manager also runs its
    etcd member (adopted if it runs, else started: it outlives the controller as tasks do) and
    the join endpoint."""

    def __init__(self, state_dir: str, config: ClusterConfig) -> None:
        self.state_dir = state_dir
        self.config = config
        self.paths = ClusterPaths(state_dir)
        self.manager = config.role == "manager"
        own = f"{config.address}:{cluster_config.CLIENT_PORT}"
        client_port = _host_port(own if own in config.store else config.store[0])[1]
        self.member = EtcdMember(
            member_config(self.paths, config, client_port, cluster_config.PEER_PORT)
        )
        self.join_server: JoinServer | None = None
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None

    def serve(self, store: Store) -> None:
        if self.manager:
            self.serve_joins(store)
        if isinstance(store, EtcdStore):
            self._refresher = threading.Thread(
                target=self._refresh_members, args=(store,), name="members", daemon=True
            )
            self._refresher.start()

    def _refresh_members(self, store: EtcdStore) -> None:
        wait = MEMBERS_FIRST
        while not self._stop.wait(wait):
            wait = MEMBERS_REFRESH
            try:
                self.refresh_members(store)
            except (MeshctlError, StoreError, OSError) as err:
                log.debug("store members not refreshed: %s", err)
            try:
                self.renew_if_due()
            except (MeshctlError, OSError) as err:
                log.warning("certificate not renewed yet: %s", err)

    def renew_if_due(self, now: dt.datetime | None = None) -> bool:
        """Renew this node's certificate (same key, node, role and addresses) once half its
        lifetime has passed: a manager signs it itself, a worker asks a manager, which knows it
        by its current one. The file is replaced whole; TLS reads it for each new connection,
        so nothing restarts and no open connection drops."""
        cert = _read(self.paths.cert)
        issued, end = pki.valid_from(cert) + pki.CLOCK_SKEW, pki.expires(cert)
        if (now or dt.datetime.now(dt.UTC)) < issued + (end - issued) / 2:
            return False
        if self.manager:
            node, role = pki.identity(cert)
            csr = pki.make_csr(_read(self.paths.key), node)
            renewed = pki.issue(_read(self.paths.ca_cert), _read(self.paths.ca_key), csr,
                                node=node, role=role, addresses=pki.ip_addresses(cert),
                                days=self.config.cert_days)  # fmt: skip
        else:
            renewed = self._renew_through_a_manager()
        if pki.identity(renewed) != pki.identity(cert) or not pki.verify(
            renewed, _read(self.paths.ca_cert)
        ):
            raise MeshctlError("the renewed certificate is not this node's: kept the old one")
        pki.write_public(self.paths.cert, renewed)
        if self.join_server is not None:
            self.join_server.reload()
        log.info("certificate renewed: valid until %s", pki.expires(renewed).isoformat())
        return True

    def _renew_through_a_manager(self) -> bytes:
        hosts = [*self.config.managers, *(_host_port(e)[0] for e in self.config.store)]
        errors = []
        for host in dict.fromkeys(hosts):
            try:
                return renew_through(f"{host}:{self.config.join_port}", self.paths)
            except MeshctlError as err:
                errors.append(str(err))
        raise MeshctlError("; ".join(errors) or "no manager known")

    def refresh_members(self, store: EtcdStore) -> None:
        """Ask the store for its members and use every one's client endpoint from now on (in
        the open store and in cluster.json, for the CLI and the next controller)."""
        found = [f"{host}:{port}" for host, port in store.member_endpoints()]
        own = f"{self.config.address}:{cluster_config.CLIENT_PORT}"
        if self.manager and own in found:  # its own member first
            found = [own, *(e for e in found if e != own)]
        if not found or tuple(found) == self.config.store:
            return
        self.config = dataclasses.replace(self.config, store=tuple(found))
        cluster_config.save(self.state_dir, self.config)
        store.use_endpoints([_host_port(e) for e in found])
        log.info("store members: %s", ", ".join(found))

    def start_member(self) -> None:
        """The node's member, adopted or started (managers only). One that runs but is not
        healthy (its peers are away: no quorum) is left to come round; the controller waits
        for the store."""
        if not self.manager:
            return
        adopted = self.member.adopt() is not None
        try:
            self.member.start(timeout=START_TIMEOUT)
        except etcd_member.EtcdMemberError as err:
            if self.member.adopt() is None:
                raise
            log.warning("%s", err)
        log.info("%s the node's etcd member", "adopted" if adopted else "started")

    def serve_joins(self, store: Store) -> None:
        root = Credentials(etcd_member.ROOT, read_secret(self.paths.root_password))
        local = self.member.config.local_url
        tls = tls_files(self.paths)
        secrets_store = open_cluster_store(self.state_dir, SECRETS_PREFIX)

        def current_token(role: str) -> str | None:
            record = secrets_store.get(JOIN_TOKEN, role)
            return str(record.value["token"]) if record else None

        def clients() -> tuple[str, ...]:
            """Every started member's client endpoint: a joining node reaches any of them."""
            listed = etcd_member.members(local, tls, root)
            found = [_endpoint(url) for m in listed for url in m.client_urls]
            return tuple(dict.fromkeys(found)) or self.config.store

        def add_member(node: str, address: str) -> StoreSeat:
            peer = f"https://{address}:{cluster_config.PEER_PORT}"
            # etcd adds no member in the first seconds after another one connected
            # ("unhealthy cluster"): managers joining one after another wait for that.
            deadline = time.monotonic() + RECONFIG_WAIT
            while True:
                try:
                    member_id = etcd_member.add_learner(local, tls, root, peer)
                    break
                except etcd_member.EtcdMemberError as err:
                    if "unhealthy cluster" not in str(err) or time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)
            listed = etcd_member.members(local, tls, root)
            seats = {m.name or node: m.peer_urls[0] for m in listed if m.peer_urls}
            own = f"{address}:{cluster_config.CLIENT_PORT}"
            return StoreSeat(member_id, seats, tuple(dict.fromkeys([*clients(), own])))

        authority = Authority(
            ca_cert=_read(self.paths.ca_cert),
            ca_key=_read(self.paths.ca_key),
            store=clients, prefix=self.config.prefix,
            current_token=current_token,
            known=lambda node: store.get(NODE, node) is not None,
            add_user=lambda node, password, role: add_node_user(
                local, tls, root, node, password, role),
            root_password=lambda: root.password,
            add_member=add_member,
            cert_days=self.config.cert_days,
        )  # fmt: skip
        self.join_server = JoinServer(
            (self.config.address, self.config.join_port), authority, self.paths.cert,
            self.paths.key, self.paths.ca_cert,
        )  # fmt: skip
        self.join_server.start()
        log.info("taking joining nodes on %s:%d", self.config.address, self.config.join_port)

    def stop(self) -> None:
        """Stop taking joins; the member keeps running for the next controller."""
        self._stop.set()
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
    local = f"https://127.0.0.1:{port}"
    while True:
        try:
            etcd_member.remove_user(local, tls_files(paths), root, node)
            etcd_member.remove_role(local, tls_files(paths), root, node_role(node)[0])
            return
        except (StoreError, MeshctlError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
