"""The pure parts of a manager's etcd member (#26): its command line, the permissions of its
roles, the members etcd lists, and credentials that never show their password."""

from __future__ import annotations

import base64

import pytest

from meshctl.cluster.etcd_member import (
    Credentials,
    MemberConfig,
    TlsFiles,
    etcd_argv,
    parse_members,
    prefix_permission,
)

TLS = TlsFiles("/s/ca.crt", "/s/node.crt", "/s/node.key")


def config(**options: object) -> MemberConfig:
    fields: dict[str, object] = {"name": "node1", "data_dir": "/s/etcd", "address": "10.0.0.1"}
    return MemberConfig(tls=TLS, **(fields | options))  # type: ignore[arg-type]


def flags(argv: list[str]) -> dict[str, str]:
    """--name=value flags as a dict (a bare flag maps to "")."""
    return dict(arg.removeprefix("--").partition("=")[::2] for arg in argv[1:])


def test_argv_serves_tls_with_client_certificates_on_both_sides() -> None:
    argv = etcd_argv(config(), etcd="/usr/bin/etcd")
    assert argv[0] == "/usr/bin/etcd"
    assert flags(argv) == {
        "name": "node1",
        "data-dir": "/s/etcd/data",
        "listen-client-urls": "https://10.0.0.1:2379,https://127.0.0.1:2379",
        "advertise-client-urls": "https://10.0.0.1:2379",
        "listen-peer-urls": "https://10.0.0.1:2380",
        "initial-advertise-peer-urls": "https://10.0.0.1:2380",
        "initial-cluster": "node1=https://10.0.0.1:2380",
        "initial-cluster-state": "new",
        "initial-cluster-token": "meshctl",
        "client-cert-auth": "",
        "trusted-ca-file": "/s/ca.crt",
        "cert-file": "/s/node.crt",
        "key-file": "/s/node.key",
        "peer-client-cert-auth": "",
        "peer-cert-allowed-hostname": "etcd-peer.meshctl.invalid",
        "peer-trusted-ca-file": "/s/ca.crt",
        "peer-cert-file": "/s/node.crt",
        "peer-key-file": "/s/node.key",
        "heartbeat-interval": "100",
        "election-timeout": "1000",
        "bcrypt-cost": "4",
        "logger": "zap",
        "log-outputs": "stderr",
    }
    assert not any("http://" in arg for arg in argv)


def test_argv_of_a_joining_member_names_the_cluster_it_joins() -> None:
    cluster = {"node1": "https://10.0.0.1:2380", "node2": "https://10.0.0.2:2390"}
    joining = MemberConfig(
        name="node2", data_dir="/s/etcd", address="10.0.0.2", tls=TLS, client_port=2389,
        peer_port=2390, initial_cluster=cluster, cluster_state="existing",
    )  # fmt: skip
    got = flags(etcd_argv(joining))
    assert got["initial-cluster"] == "node1=https://10.0.0.1:2380,node2=https://10.0.0.2:2390"
    assert got["initial-cluster-state"] == "existing"
    assert got["listen-client-urls"] == "https://10.0.0.2:2389,https://127.0.0.1:2389"
    assert got["listen-peer-urls"] == "https://10.0.0.2:2390"


def test_argv_on_loopback_listens_once() -> None:
    got = flags(etcd_argv(config(address="127.0.0.1")))
    assert got["listen-client-urls"] == "https://127.0.0.1:2379"


def test_cluster_state_is_new_or_existing() -> None:
    with pytest.raises(ValueError, match="cluster_state"):
        config(cluster_state="join")


def test_prefix_permission_covers_exactly_the_prefix() -> None:
    perm = prefix_permission("/meshctl/")
    assert perm["permType"] == "READWRITE"
    assert base64.b64decode(perm["key"]) == b"/meshctl/"
    assert base64.b64decode(perm["range_end"]) == b"/meshctl0"  # '/' + 1


def test_parse_members() -> None:
    answer = {
        "header": {"cluster_id": "1"},
        "members": [
            {
                "ID": "10276657743932975437",
                "name": "node1",
                "peerURLs": ["https://10.0.0.1:2380"],
                "clientURLs": ["https://10.0.0.1:2379"],
            },
            {"ID": "42", "peerURLs": ["https://10.0.0.2:2380"], "isLearner": True},
        ],
    }
    first, second = parse_members(answer)
    assert (first.id, first.name, first.learner) == (10276657743932975437, "node1", False)
    assert first.client_urls == ("https://10.0.0.1:2379",)
    assert (second.id, second.name, second.learner) == (42, "", True)
    assert second.client_urls == ()


def test_credentials_keep_the_password_out_of_their_repr() -> None:
    assert "s3cret" not in repr(Credentials("root", "s3cret"))
