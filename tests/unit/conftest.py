"""Fixtures of the unit tests: a store of each kind, so a test of the store protocol (or of
what is built on it) runs on both; and an etcd over TLS with etcd users on (#26)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from meshctl.store import Store, default_store_url, open_store
from meshctl.store.etcd import EtcdAccess
from tests.etcd import EtcdServer, TestCa

TLS_USER = "tester"
TLS_PREFIX = "/tls-"  # the keys TLS_USER may read and write


@pytest.fixture(params=["sqlite", "etcd"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of an empty store: a new SQLite file (tmp_path/state/state.db), or a new key
    prefix on the run's etcd."""
    if request.param == "sqlite":
        return default_store_url(str(tmp_path / "state"))
    server: EtcdServer = request.getfixturevalue("etcd_server")
    prefix = f"/test-{uuid.uuid4().hex[:12]}"
    request.addfinalizer(lambda: server.clear(prefix + "/"))
    return server.url(prefix)


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    with open_store(store_url) as opened:
        yield opened


@dataclass(frozen=True)
class TlsEtcd:
    """The run's etcd over TLS with etcd users on; access logs in as TLS_USER, who may read
    and write only keys under TLS_PREFIX."""

    server: EtcdServer
    ca: TestCa
    access: EtcdAccess

    def url(self) -> str:
        """The URL of a new, empty key prefix TLS_USER may use."""
        return self.server.url(f"{TLS_PREFIX}{uuid.uuid4().hex[:12]}")


def password_file(directory: str, name: str, password: str) -> str:
    """A private file holding password, as an operator writes one (a newline at the end)."""
    path = os.path.join(directory, f"{name}.password")
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as file:
        file.write(password + "\n")
    return path


@pytest.fixture(scope="session")
def etcd_tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsEtcd]:
    """One etcd over TLS for the run: client certificates of its CA only, etcd users on."""
    ca = TestCa(str(tmp_path_factory.mktemp("etcd-tls")))
    with EtcdServer(tls=ca.server_tls()) as server:
        server.enable_auth(uuid.uuid4().hex)
        password = uuid.uuid4().hex
        server.add_user(TLS_USER, password, TLS_PREFIX)
        cert, key = ca.node("client")
        secret = password_file(ca.directory, TLS_USER, password)
        access = EtcdAccess(ca.path, cert, key, TLS_USER, secret)
        yield TlsEtcd(server, ca, access)
