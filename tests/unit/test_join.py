"""Joining a cluster (meshctl.cluster.join): a manager's join endpoint over real TLS on
loopback, with the store's side (tokens, known nodes, users) kept in memory here."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from meshctl.cluster import config as cluster_config
from meshctl.cluster import pki
from meshctl.cluster.join import (
    Authority,
    JoinRefused,
    JoinServer,
    join,
    leave_through,
    renew_through,
    seat_through,
)
from meshctl.cluster.tokens import make_token
from meshctl.model import MeshctlError
from tests.etcd import free_port


@dataclass
class Manager:
    """A manager's join endpoint and what it remembers."""

    ca_cert: bytes
    tokens: dict[str, str]
    known: set[str] = field(default_factory=set)
    users: dict[str, tuple[str, str]] = field(default_factory=dict)  # node → (password, role)
    retired: list[str] = field(default_factory=list)
    port: int = 0


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[Manager]:
    ca_cert, ca_key = pki.make_ca()
    cert, key = pki.make_node_cert(ca_cert, ca_key, node="node1", role="manager",
                                   addresses=["127.0.0.1"])  # fmt: skip
    pki.write_public(str(tmp_path / "m.crt"), cert)
    pki.write_private(str(tmp_path / "m.key"), key)
    digest = pki.ca_digest(ca_cert)
    made = Manager(ca_cert, {r: make_token(digest, r) for r in ("worker", "manager")}, {"node1"})

    def add_user(node: str, password: str, role: str) -> None:
        made.users[node] = (password, role)
        made.known.add(node)

    def role_of(node: str) -> str | None:
        return made.users[node][1] if node in made.users else None

    authority = Authority(
        ca_cert, ca_key, lambda: ("127.0.0.1:2379",), "/meshctl", made.tokens.get,
        made.known.__contains__, add_user, role_of=role_of, retire=made.retired.append,
    )  # fmt: skip
    pki.write_public(str(tmp_path / "ca.crt"), ca_cert)
    made.port = free_port()
    server = JoinServer(("127.0.0.1", made.port), authority, str(tmp_path / "m.crt"),
                        str(tmp_path / "m.key"), str(tmp_path / "ca.crt"))  # fmt: skip
    server.start()
    try:
        yield made
    finally:
        server.stop()


def test_a_worker_joins_with_its_token_and_keeps_its_key_to_itself(
    manager: Manager, tmp_path: Path
) -> None:
    state = str(tmp_path / "node2")
    admitted = join(f"127.0.0.1:{manager.port}", manager.tokens["worker"], "node2", "10.0.0.2",
                    state)  # fmt: skip
    assert admitted.role == "worker"
    paths = cluster_config.ClusterPaths(state)
    with open(paths.cert, "rb") as f:
        cert = f.read()
    assert pki.identity(cert) == ("node2", "worker")
    assert pki.verify(cert, manager.ca_cert)
    for private in (paths.key, paths.password):
        assert os.stat(private).st_mode & 0o777 == 0o600
    assert os.stat(paths.dir).st_mode & 0o777 == 0o700
    config = cluster_config.load(state)
    assert config is not None
    assert (config.node, config.role, config.store) == ("node2", "worker", ("127.0.0.1:2379",))
    with open(paths.password) as f:
        assert manager.users["node2"] == (f.read(), "worker")


def test_wrong_rotated_foreign_tokens_and_known_names_are_refused(
    manager: Manager, tmp_path: Path
) -> None:
    old = manager.tokens["worker"]
    manager.tokens["worker"] = make_token(pki.ca_digest(manager.ca_cert), "worker")  # rotated
    other_ca, _ = pki.make_ca()
    foreign = make_token(pki.ca_digest(other_ca), "worker")
    endpoint = f"127.0.0.1:{manager.port}"
    cases = {
        old: "wrong or was rotated",
        foreign: "not the one the token names",
        manager.tokens["worker"].replace("-w", "-m"): "wrong or was rotated",
    }
    for token, why in cases.items():
        with pytest.raises(MeshctlError, match=why) as refused:
            join(endpoint, token, "node3", "10.0.0.3", str(tmp_path / "n3"))
        assert token.rsplit("-", 1)[-1] not in str(refused.value)
        assert "\n" not in str(refused.value)
        assert cluster_config.load(str(tmp_path / "n3")) is None
    with pytest.raises(MeshctlError, match="node node1 is in the cluster already"):
        join(endpoint, manager.tokens["worker"], "node1", "10.0.0.9", str(tmp_path / "again"))
    assert set(manager.users) == set()


def test_admit_refuses_a_malformed_request(manager: Manager) -> None:
    ca_cert, ca_key = pki.make_ca()
    authority = Authority(ca_cert, ca_key, tuple, "/meshctl", lambda r: None, lambda n: False,
                          lambda *a: None)  # fmt: skip
    with pytest.raises(JoinRefused) as refused:
        authority.admit({"token": "nonsense"})
    assert refused.value.status == 400


def test_a_member_renews_with_its_current_certificate_and_gets_its_role_now(
    manager: Manager, tmp_path: Path
) -> None:
    """POST /v1/renew: the same node and key, the role the store gives it now (a node promoted
    since gets a manager's), refused once the node was removed and without a certificate."""
    endpoint = f"127.0.0.1:{manager.port}"
    state = str(tmp_path / "node2")
    join(endpoint, manager.tokens["worker"], "node2", "10.0.0.2", state)
    paths = cluster_config.ClusterPaths(state)
    first = (tmp_path / "node2" / "cluster" / "node.crt").read_bytes()
    renewed = renew_through(endpoint, paths)
    assert pki.identity(renewed) == ("node2", "worker")
    assert pki.verify(renewed, manager.ca_cert)
    assert pki.ip_addresses(renewed) == ["10.0.0.2"]
    assert renewed != first
    manager.users["node2"] = (manager.users["node2"][0], "manager")  # `node promote node2`
    assert pki.identity(renew_through(endpoint, paths)) == ("node2", "manager")
    unsigned = requests.post(f"https://{endpoint}/v1/renew", json={"csr": "x"},
                             verify=paths.ca_cert, timeout=10)  # fmt: skip
    assert unsigned.status_code == 401
    del manager.users["node2"]  # `node rm node2`
    with pytest.raises(MeshctlError, match="node node2 was removed from the cluster"):
        renew_through(endpoint, paths)


def test_a_worker_leaves_through_a_manager_and_a_manager_is_demoted_first(
    manager: Manager, tmp_path: Path
) -> None:
    endpoint = f"127.0.0.1:{manager.port}"
    for node, role in (("node2", "worker"), ("node3", "manager")):
        join(endpoint, manager.tokens["worker"], node, "10.0.0.2", str(tmp_path / node))
        manager.users[node] = (manager.users[node][0], role)
    with pytest.raises(MeshctlError, match="node node3 is a manager: demote it first"):
        leave_through(endpoint, cluster_config.ClusterPaths(str(tmp_path / "node3")))
    # A worker asking for a manager's seat is refused: only the store makes a manager.
    with pytest.raises(MeshctlError, match="node node2 is not a manager"):
        seat_through(endpoint, cluster_config.ClusterPaths(str(tmp_path / "node2")))
    leave_through(endpoint, cluster_config.ClusterPaths(str(tmp_path / "node2")))
    assert manager.retired == ["node2"]
