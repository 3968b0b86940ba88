"""A manager's etcd member on real etcd processes with real TLS (#26): what it refuses, its
users and roles, its life past the controller that started it, and a learner made a voter.

Members listen on loopback ports of this namespace; every one a test starts is stopped in a
finally, whatever the test did.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from meshctl.cluster import etcd_member, pki
from meshctl.cluster.etcd_member import (
    Credentials,
    EtcdMember,
    EtcdMemberError,
    MemberConfig,
    TlsFiles,
)
from tests.conftest import scaled
from tests.etcd import free_port
from tests.kernel.mesh import wait_for

pytestmark = pytest.mark.root

ROOT_PASSWORD = "root-secret-0"
LOOPBACK = "127.0.0.1"

MemberFactory = Callable[..., EtcdMember]


@pytest.fixture
def ca(tmp_path: Path) -> tuple[bytes, bytes]:
    return pki.make_ca()


def node_tls(
    directory: Path, ca: tuple[bytes, bytes], node: str, role: str = "manager"
) -> TlsFiles:
    """A node certificate from ca in directory, as a node keeps its files."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = pki.make_node_cert(*ca, node=node, role=role, addresses=[LOOPBACK])
    files = TlsFiles(
        str(directory / "ca.crt"), str(directory / "node.crt"), str(directory / "node.key")
    )
    pki.write_public(files.ca, ca[0])
    pki.write_public(files.cert, cert)
    pki.write_private(files.key, key)
    return files


@pytest.fixture
def new_member(tmp_path: Path, ca: tuple[bytes, bytes]) -> Iterator[MemberFactory]:
    """Makes members' configs (node certificates from ca, free loopback ports); stops every
    member whose directory it made, adopting it if need be."""
    made: list[MemberConfig] = []

    def make(name: str, **options: object) -> EtcdMember:
        directory = tmp_path / name
        fields: dict[str, object] = {"client_port": free_port(), "peer_port": free_port()}
        config = MemberConfig(
            name=name, data_dir=str(directory / "etcd"), address=LOOPBACK,
            tls=node_tls(directory / "tls", ca, name), **(fields | options),  # type: ignore[arg-type]
        )  # fmt: skip
        made.append(config)
        return EtcdMember(config)

    try:
        yield make
    finally:
        for config in made:
            EtcdMember(config).stop(grace=5)


def kv(member: EtcdMember, token: str | None, op: str, body: dict[str, str]) -> requests.Response:
    """A /v3/kv/ call to the member over mutual TLS with its node certificate."""
    tls = member.config.tls
    headers = {"Authorization": token} if token is not None else {}
    return requests.post(
        f"{member.config.local_url}/v3/kv/{op}", json=body, headers=headers, timeout=5,
        verify=tls.ca, cert=(tls.cert, tls.key),
    )  # fmt: skip


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def put_get(member: EtcdMember, token: str | None, key: str, value: str) -> str | None:
    """Put key=value and read it back: the value read, None if etcd refused either."""
    if not kv(member, token, "put", {"key": b64(key), "value": b64(value)}).ok:
        return None
    answer = kv(member, token, "range", {"key": b64(key)})
    if not answer.ok:
        return None
    kvs = answer.json().get("kvs", [])
    return base64.b64decode(kvs[0]["value"]).decode() if kvs else ""


def plain_http_refused(url: str) -> bool:
    """Whether a plain-HTTP request to url gets no etcd answer: the connection is closed, or
    Go's TLS server says 400 (its answer to HTTP on an HTTPS port)."""
    try:
        answer = requests.get(url, timeout=5)
    except requests.exceptions.ConnectionError:
        return True
    return answer.status_code == 400 and "health" not in answer.text


def test_member_refuses_plain_http_no_certificate_and_a_foreign_ca(
    new_member: MemberFactory, tmp_path: Path
) -> None:
    member = new_member("node1")
    member.start()
    config = member.config
    # Plain HTTP on the client and peer ports: no answer, or the TLS listener's 400.
    for port in (config.client_port, config.peer_port):
        assert plain_http_refused(f"http://{LOOPBACK}:{port}/health")
    # TLS that trusts the CA but shows no client certificate.
    with pytest.raises(requests.exceptions.RequestException):
        requests.get(f"{config.local_url}/health", verify=config.tls.ca, timeout=5)
    # A client certificate from another CA.
    stranger = node_tls(tmp_path / "stranger", pki.make_ca(), "node1")
    with pytest.raises(requests.exceptions.RequestException):
        requests.get(
            f"{config.local_url}/health", verify=config.tls.ca,
            cert=(stranger.cert, stranger.key), timeout=5,
        )  # fmt: skip
    foreign = TlsFiles(config.tls.ca, stranger.cert, stranger.key)
    with pytest.raises(EtcdMemberError, match="TLS failed"):
        etcd_member.authenticate(config.local_url, foreign, Credentials("root", "pw-0"))
    assert member.healthy()


def test_the_peer_port_admits_a_managers_certificate_and_no_workers(
    new_member: MemberFactory, ca: tuple[bytes, bytes], tmp_path: Path
) -> None:
    """A worker's certificate is signed by the same CA, yet it must not speak to the members as
    one of them (raft messages, snapshots): the peer port asks for the managers' own name."""
    member = new_member("node1")
    member.start()
    peer = f"https://{LOOPBACK}:{member.config.peer_port}/members"
    tls = member.config.tls
    answer = requests.get(peer, verify=tls.ca, cert=(tls.cert, tls.key), timeout=5)
    assert answer.ok and "node1" in answer.text
    worker = node_tls(tmp_path / "worker", ca, "node2", role="worker")
    with pytest.raises(requests.exceptions.RequestException):
        requests.get(peer, verify=tls.ca, cert=(worker.cert, worker.key), timeout=5)
    assert member.healthy()


def test_auth_roles_and_a_removed_user_locked_out_at_once(new_member: MemberFactory) -> None:
    member = new_member("node1")
    member.start()
    endpoint, tls = member.config.local_url, member.config.tls
    etcd_member.enable_auth(endpoint, tls, ROOT_PASSWORD)
    root = Credentials("root", ROOT_PASSWORD)
    # The node certificate alone opens nothing once auth is on.
    assert put_get(member, None, "/meshctl/x", "1") is None
    root_token = etcd_member.authenticate(endpoint, tls, root)
    assert put_get(member, root_token, "/meshctl/x", "1") == "1"
    # Running the bootstrap again is harmless (a controller cut short runs it again).
    etcd_member.enable_auth(endpoint, tls, ROOT_PASSWORD)

    etcd_member.add_user(endpoint, tls, root, "node2", "worker-secret", "worker")
    worker = Credentials("node2", "worker-secret")
    token = etcd_member.authenticate(endpoint, tls, worker)
    assert put_get(member, token, "/meshctl/task/t1", "running") == "running"
    assert put_get(member, token, "/meshctl", "the store's revision key") is not None
    # Outside the roles' prefix the worker has no rights.
    assert put_get(member, token, "/elsewhere", "x") is None

    etcd_member.remove_user(endpoint, tls, root, "node2")
    assert put_get(member, token, "/meshctl/task/t1", "again") is None
    with pytest.raises(EtcdMemberError) as refused:
        etcd_member.authenticate(endpoint, tls, worker)
    assert "worker-secret" not in str(refused.value)
    with pytest.raises(EtcdMemberError) as wrong:
        etcd_member.authenticate(endpoint, tls, Credentials("root", "not-the-password"))
    assert "not-the-password" not in str(wrong.value)
    etcd_member.remove_user(endpoint, tls, root, "node2")  # already gone: fine


def ended(pid: int) -> bool:
    """Whether the process is gone or a zombie (its parent, init, reaps it when it will)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


STARTER = """
import json, sys
from meshctl.cluster.etcd_member import EtcdMember, MemberConfig, TlsFiles
fields = json.loads(sys.argv[1])
fields["tls"] = TlsFiles(**fields["tls"])
print(EtcdMember(MemberConfig(**fields)).start().pid)
"""


def test_member_outlives_its_starter_and_is_adopted(new_member: MemberFactory) -> None:
    config = new_member("node1").config
    fields = {
        "name": config.name, "data_dir": config.data_dir, "address": config.address,
        "client_port": config.client_port, "peer_port": config.peer_port,
        "tls": {"ca": config.tls.ca, "cert": config.tls.cert, "key": config.tls.key},
    }  # fmt: skip

    starter = subprocess.run(
        [sys.executable, "-c", STARTER, json.dumps(fields)], capture_output=True, text=True,
        timeout=scaled(60), check=True, cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    pid = int(starter.stdout)
    assert os.stat(config.data_dir).st_mode & 0o777 == 0o700

    successor = EtcdMember(config)
    adopted = successor.adopt()
    assert adopted is not None and adopted.pid == pid
    assert successor.healthy()
    # A restarted controller's start() adopts it instead of starting a second member.
    assert EtcdMember(config).start().pid == pid

    successor.stop()
    assert ended(pid)
    assert EtcdMember(config).adopt() is None


def test_a_member_that_died_is_started_again(new_member: MemberFactory) -> None:
    member = new_member("node1")
    first = member.start()
    os.kill(first.pid, signal.SIGKILL)
    wait_for(first.exited, timeout=10, what="the killed member to end")
    again = EtcdMember(member.config).start()
    assert again.pid != first.pid
    assert EtcdMember(member.config).adopt() is not None
    member.stop()  # the object that started the dead one stops the new one, found by its file
    assert ended(again.pid)


def test_learner_joins_is_promoted_and_removed(new_member: MemberFactory) -> None:
    first = new_member("node1")
    first.start()
    endpoint, tls = first.config.local_url, first.config.tls
    etcd_member.enable_auth(endpoint, tls, ROOT_PASSWORD)
    root = Credentials("root", ROOT_PASSWORD)

    peer_port = free_port()
    peer_url = f"https://{LOOPBACK}:{peer_port}"
    learner_id = etcd_member.add_learner(endpoint, tls, root, peer_url)
    assert etcd_member.add_learner(endpoint, tls, root, peer_url) == learner_id  # once only
    second = new_member(
        "node2", peer_port=peer_port, cluster_state="existing",
        initial_cluster={"node1": first.config.peer_url, "node2": peer_url},
    )  # fmt: skip
    second.start()
    etcd_member.promote(endpoint, tls, root, learner_id)

    listed = {m.name: m for m in etcd_member.members(endpoint, tls, root)}
    assert set(listed) == {"node1", "node2"}
    assert not any(m.learner for m in listed.values())
    # The new voter serves the same data, with the same users.
    token = etcd_member.authenticate(second.config.local_url, second.config.tls, root)
    assert put_get(second, token, "/meshctl/k", "v") == "v"

    etcd_member.remove_member(endpoint, tls, root, learner_id)
    assert [m.name for m in etcd_member.members(endpoint, tls, root)] == ["node1"]
    assert second.process is not None
    # A removed member stops by itself.
    wait_for(second.process.exited, timeout=20, what="the removed member to exit")
    assert first.healthy()
