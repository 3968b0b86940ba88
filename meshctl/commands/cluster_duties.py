"""What a cluster's node runs beside its controller's passes (#26): every node keeps its list of
the store's members current, renews its certificate, and follows the role the store gives it
(meshctl.commands.cluster_roles); a manager also runs its etcd member (adopted if it runs,
else started: it outlives the controller as tasks do) and the join endpoint."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import threading
import time
from collections.abc import Callable

from meshctl.cluster import config as cluster_config
from meshctl.cluster import etcd_member, pki
from meshctl.cluster.config import ClusterConfig, ClusterPaths
from meshctl.cluster.etcd_member import EtcdMember
from meshctl.cluster.join import Authority, JoinServer, StoreSeat, renew_through
from meshctl.commands import cluster_roles
from meshctl.commands.cluster import (
    JOIN_TOKEN,
    RECONFIG_WAIT,
    SECRETS_PREFIX,
    START_TIMEOUT,
    add_node_user,
    client_port,
    host_port,
    member_config,
    open_cluster_store,
    read_bytes,
)
from meshctl.model import NODE, MeshctlError
from meshctl.store import Store, StoreError
from meshctl.store.etcd import EtcdStore

log = logging.getLogger("meshctl.cluster")

ROLE_CHECK = 2.0  # seconds between looks at the node's role, the first one included
MEMBERS_REFRESH = 10.0  # seconds between looks at the store's members and the certificate


def _endpoint(url: str) -> str:
    """HOST:PORT of an https://HOST:PORT client URL."""
    return url.split("://", 1)[-1].rstrip("/")


class ClusterDuties:
    """A cluster node's work beside its controller: its role, its store's members, its
    certificate, and on a manager its etcd member and the join endpoint. on_role(manager) tells
    the controller when the node became a manager (it may lead) or a worker (it may not)."""

    def __init__(self, state_dir: str, config: ClusterConfig) -> None:
        self.state_dir = state_dir
        self.config = config
        self.paths = ClusterPaths(state_dir)
        self.member = self._member()
        self.join_server: JoinServer | None = None
        self.on_role: Callable[[bool], None] = lambda manager: None
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None

    @property
    def manager(self) -> bool:
        return self.config.role == "manager"

    def _member(self) -> EtcdMember:
        port = client_port(self.config)
        return EtcdMember(member_config(self.paths, self.config, port, cluster_config.PEER_PORT))

    def serve(self, store: Store, on_role: Callable[[bool], None] | None = None) -> None:
        if on_role is not None:
            self.on_role = on_role
        if self.manager:
            self.serve_joins(store)
        if isinstance(store, EtcdStore):
            self._refresher = threading.Thread(
                target=self._refresh, args=(store,), name="members", daemon=True
            )
            self._refresher.start()

    def _refresh(self, store: EtcdStore) -> None:
        last = time.monotonic()
        while not self._stop.wait(ROLE_CHECK):
            try:
                self.follow_role(store)
            except (MeshctlError, StoreError, OSError) as err:
                log.warning("the node's role not followed yet: %s", err)
            if time.monotonic() - last < MEMBERS_REFRESH:
                continue
            last = time.monotonic()
            try:
                self.refresh_members(store)
            except (MeshctlError, StoreError, OSError) as err:
                log.debug("store members not refreshed: %s", err)
            try:
                self.renew_if_due()
            except (MeshctlError, OSError) as err:
                log.warning("certificate not renewed yet: %s", err)

    def follow_role(self, store: EtcdStore) -> bool:
        """Become what the store says this node is, if it says otherwise now; True if so."""
        wanted = cluster_roles.own_role(store)
        if wanted is None or wanted == self.config.role:
            return False
        if wanted == "manager":
            self.config = cluster_roles.become_manager(self.state_dir, self.config)
            self.member = self._member()
            self.serve_joins(store)
        else:
            self.config = cluster_roles.become_worker(self.state_dir, self.config, self.member)
            if self.join_server is not None:
                self.join_server.stop()
                self.join_server = None
        store.use_endpoints([host_port(e) for e in self.config.store])
        self.on_role(self.manager)
        log.info("this node is a %s now", self.config.role)
        return True

    def renew_if_due(self, now: dt.datetime | None = None) -> bool:
        """Renew this node's certificate (same key, node and addresses) once half its lifetime
        has passed: a manager signs it itself, a worker asks a manager, which knows it by its
        current one. The file is replaced whole; TLS reads it for each new connection, so
        nothing restarts and no open connection drops."""
        cert = read_bytes(self.paths.cert)
        issued, end = pki.valid_from(cert) + pki.CLOCK_SKEW, pki.expires(cert)
        if (now or dt.datetime.now(dt.UTC)) < issued + (end - issued) / 2:
            return False
        if self.manager:
            node, role = pki.identity(cert)
            csr = pki.make_csr(read_bytes(self.paths.key), node)
            renewed = pki.issue(read_bytes(self.paths.ca_cert), read_bytes(self.paths.ca_key), csr,
                                node=node, role=role, addresses=pki.ip_addresses(cert),
                                days=self.config.cert_days)  # fmt: skip
        else:
            renewed, _ = cluster_roles.through_a_manager(
                self.config, lambda manager: renew_through(manager, self.paths)
            )
        if pki.identity(renewed)[0] != pki.identity(cert)[0] or not pki.verify(
            renewed, read_bytes(self.paths.ca_cert)
        ):
            raise MeshctlError("the renewed certificate is not this node's: kept the old one")
        pki.write_public(self.paths.cert, renewed)
        if self.join_server is not None:
            self.join_server.reload()
        log.info("certificate renewed: valid until %s", pki.expires(renewed).isoformat())
        return True

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
        store.use_endpoints([host_port(e) for e in found])
        log.info("store members: %s", ", ".join(found))

    def start_member(self) -> None:
        """The node's member, adopted or started (managers only; a manager demoted while its
        controller was stopped steps down instead). One that runs but is not healthy (its peers
        are away: no quorum) is left to come round; the controller waits for the store."""
        if not self.manager:
            return
        with open_cluster_store(self.state_dir) as store:
            wanted = cluster_roles.own_role(store)
        if wanted == "worker":
            try:  # demoted while no controller ran: its member was removed, it starts no more
                self.config = cluster_roles.become_worker(self.state_dir, self.config, self.member)
                log.info("this node was demoted meanwhile: it is a worker now")
                return
            except MeshctlError as err:
                log.warning("demoted, but not stepping down yet: %s", err)
        adopted = self.member.adopt() is not None
        try:
            self.member.start(timeout=START_TIMEOUT)
        except etcd_member.EtcdMemberError as err:
            if self.member.adopt() is None:
                raise
            log.warning("%s", err)
        log.info("%s the node's etcd member", "adopted" if adopted else "started")

    def serve_joins(self, store: Store) -> None:
        """Take joining nodes, renewals, promoted workers' seats and leaving workers."""
        admin = cluster_roles.Admin.here(self.state_dir).through(self.member.config.local_url)
        local, tls, root = admin.endpoint, admin.tls, admin.root
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
            # ("unhealthy cluster"): managers joining one after another wait for that,
            deadline = time.monotonic() + RECONFIG_WAIT
            while True:
                try:
                    member_id = etcd_member.add_learner(local, tls, root, peer)
                    break
                except etcd_member.EtcdMemberError as err:
                    # and one learner at a time: a second promoted node waits for the first
                    passing = ("unhealthy cluster", "too many learner")
                    if not any(r in str(err) for r in passing) or time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)
            listed = etcd_member.members(local, tls, root)
            seats = {m.name or node: m.peer_urls[0] for m in listed if m.peer_urls}
            own = f"{address}:{cluster_config.CLIENT_PORT}"
            return StoreSeat(member_id, seats, tuple(dict.fromkeys([*clients(), own])))

        authority = Authority(
            ca_cert=read_bytes(self.paths.ca_cert),
            ca_key=read_bytes(self.paths.ca_key),
            store=clients, prefix=self.config.prefix,
            current_token=current_token,
            known=lambda node: store.get(NODE, node) is not None,
            add_user=lambda node, password, role: add_node_user(
                local, tls, root, node, password, role),
            root_password=lambda: root.password,
            add_member=add_member,
            cert_days=self.config.cert_days,
            role_of=admin.role_of,
            retire=lambda node: cluster_roles.retire(admin, store, node),
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
