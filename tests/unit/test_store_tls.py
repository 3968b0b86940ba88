"""The cluster store's door (#26): an etcd over TLS that wants a client certificate of the
cluster CA and an etcd login, refusing everything else in one line that says why, with no
password or token in it; a deleted user is out at once; the watch outlives its login's token.

Real etcd, real TLS: the run's TLS etcd (tests/unit/conftest.py), or one of a test's own where
the test stops it or shortens its tokens' lives.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace

import pytest
import requests
from click.testing import CliRunner

from meshctl.cli.root import main
from meshctl.store import Event, StoreError, Unavailable, open_store
from meshctl.store.etcd import EtcdAccess, EtcdStore, unprotected_warning
from tests.conftest import scaled
from tests.etcd import EtcdServer, TestCa
from tests.unit.conftest import TLS_PREFIX, TLS_USER, TlsEtcd, password_file


def _one_line(err: pytest.ExceptionInfo[StoreError], *secrets: str) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    for secret in secrets:
        assert secret not in message, "a secret is in the message"
    return message


def _user(tls: TlsEtcd, prefix: str) -> tuple[EtcdAccess, str]:
    """A new etcd user that may use keys under prefix, its access and its password."""
    name, password = f"u{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    tls.server.add_user(name, password, prefix)
    secret = password_file(tls.ca.directory, name, password)
    return replace(tls.access, user=name, password_file=secret), password


def test_plain_http_to_the_tls_port_is_refused(etcd_tls: TlsEtcd) -> None:
    plain = etcd_tls.server.url().replace("https://", "etcd://")
    with open_store(plain) as store, pytest.raises(StoreError) as caught:
        store.get("service", "web")
    assert "closed the connection unanswered, as etcd over TLS does: use https://" in _one_line(
        caught
    )


def test_tls_without_a_client_certificate_is_refused(etcd_tls: TlsEtcd) -> None:
    url = f"{etcd_tls.server.base}/v3/kv/range"
    with pytest.raises(requests.exceptions.ConnectionError):  # SSLError is one
        requests.post(url, json={"key": "YQ=="}, verify=etcd_tls.ca.path, timeout=5)


def test_a_client_certificate_of_another_ca_is_refused(
    etcd_tls: TlsEtcd, tmp_path: os.PathLike[str]
) -> None:
    cert, key = TestCa(str(tmp_path)).node("intruder")
    access = replace(etcd_tls.access, cert=cert, key=key)
    with open_store(etcd_tls.url(), access) as store, pytest.raises(StoreError) as caught:
        store.get("service", "web")
    assert f"refused this client's certificate {cert}" in _one_line(caught)


def test_a_store_certificate_of_another_ca_is_refused(
    etcd_tls: TlsEtcd, tmp_path: os.PathLike[str]
) -> None:
    other = TestCa(str(tmp_path))
    access = replace(etcd_tls.access, cacert=other.path)
    with open_store(etcd_tls.url(), access) as store, pytest.raises(StoreError) as caught:
        store.put("service", "web", {})
    message = _one_line(caught)
    assert f"is not signed by the cluster CA {other.path}" in message


def test_a_wrong_password_is_refused_in_one_line(etcd_tls: TlsEtcd) -> None:
    wrong = uuid.uuid4().hex
    secret = password_file(etcd_tls.ca.directory, "wrong", wrong)
    access = replace(etcd_tls.access, password_file=secret)
    with open_store(etcd_tls.url(), access) as store, pytest.raises(StoreError) as caught:
        store.put("service", "web", {})
    message = _one_line(caught, wrong)
    assert message.startswith("etcd user 'tester' cannot log in to https://")
    assert message.endswith("wrong password or removed from the cluster")


def test_a_user_confined_to_another_prefix_writes_nothing_here(etcd_tls: TlsEtcd) -> None:
    access, password = _user(etcd_tls, "/elsewhere-")
    url = etcd_tls.url()
    with open_store(url, access) as store:
        with pytest.raises(StoreError) as caught:
            store.put("service", "web", {"replicas": 1})
        message = _one_line(caught, password)
        assert message.startswith(f"etcd user {access.user!r} is not allowed to write {url}")
        with pytest.raises(StoreError, match="is not allowed to read"):
            store.watch(store.revision(), timeout=0.1)
    with open_store(url, etcd_tls.access) as allowed:
        assert allowed.get("service", "web") is None


def test_a_deleted_user_can_neither_read_nor_write_at_once(etcd_tls: TlsEtcd) -> None:
    access, password = _user(etcd_tls, TLS_PREFIX)
    url = etcd_tls.url()
    with open_store(url, access) as store:
        store.put("service", "web", {"replicas": 1})  # logged in, its token in use
        etcd_tls.server.delete_user(str(access.user))
        for attempt in (
            lambda: store.get("service", "web"),
            lambda: store.put("service", "api", {}),
        ):
            with pytest.raises(StoreError) as caught:
                attempt()
            assert "cannot log in" in _one_line(caught, password)
    with open_store(url, etcd_tls.access) as allowed:
        assert [r.name for r in allowed.list("service")] == ["web"]


def test_options_for_tls_with_a_plain_url_are_refused(etcd_tls: TlsEtcd) -> None:
    with pytest.raises(StoreError, match="are for an https:// store"):
        open_store("etcd://127.0.0.1:2379", etcd_tls.access)
    with pytest.raises(StoreError, match="is TLS: give --cacert, --cert and --key"):
        open_store(etcd_tls.url())
    with pytest.raises(StoreError, match="--user and --password-file together"):
        replace(etcd_tls.access, password_file=None)


def test_the_cli_reaches_a_tls_store_with_its_options(etcd_tls: TlsEtcd) -> None:
    access = etcd_tls.access
    url = etcd_tls.url()
    options = ["--store", url, "--cacert", access.cacert, "--cert", access.cert]
    options += ["--key", access.key, "--user", str(access.user)]
    runner = CliRunner()
    missing = runner.invoke(main, [*options, "network", "ls"])
    assert missing.exit_code == 1
    assert "needs --user and --password-file together" in missing.output
    result = runner.invoke(
        main,
        [*options, "network", "create", "front", "--subnet", "10.20.0.0/24"],
        env={"MESHCTL_PASSWORD_FILE": str(access.password_file)},
    )
    assert result.exit_code == 0, result.output
    with open_store(url, access) as store:
        assert store.get("network", "front") is not None


def test_a_plain_etcd_store_is_called_unprotected(
    etcd_tls: TlsEtcd, etcd_server: EtcdServer, tmp_path: os.PathLike[str]
) -> None:
    with open_store(etcd_server.url()) as plain:
        warning = unprotected_warning(plain)
    assert warning is not None
    assert "is unauthenticated: anyone who reaches it controls every node" in warning
    with open_store(etcd_tls.url(), etcd_tls.access) as protected:
        assert unprotected_warning(protected) is None
    with open_store(f"sqlite://{tmp_path}/state.db") as local:
        assert unprotected_warning(local) is None


def test_a_login_reads_its_own_roles_and_no_one_elses(
    etcd_tls: TlsEtcd, etcd_server: EtcdServer
) -> None:
    """What a cluster node's controller asks every few seconds to follow its role (#26)."""
    with open_store(etcd_tls.url(), etcd_tls.access) as store:
        assert isinstance(store, EtcdStore)
        assert store.user_roles() == (TLS_USER,)
    with open_store(etcd_server.url()) as plain:
        assert isinstance(plain, EtcdStore)
        with pytest.raises(StoreError, match="no login"):
            plain.user_roles()


def test_doctor_reports_a_plain_etcd_store(etcd_tls: TlsEtcd, etcd_server: EtcdServer) -> None:
    from kernel.features import Check
    from meshctl.controller.doctor import store_checks

    with open_store(etcd_server.url(f"/test-{uuid.uuid4().hex[:12]}")) as plain:
        assert store_checks(plain) == [
            Check("store", False, False, str(unprotected_warning(plain)))
        ]
    with open_store(etcd_tls.url(), etcd_tls.access) as protected:
        assert store_checks(protected) == []
    assert store_checks(None) == []


@pytest.fixture
def short_tokens(tmp_path: os.PathLike[str]) -> Iterator[tuple[EtcdServer, EtcdAccess]]:
    """An etcd of this test's own over TLS whose login tokens live 2 seconds."""
    ca = TestCa(str(tmp_path))
    with EtcdServer(tls=ca.server_tls(), extra=["--auth-token-ttl", "2"]) as server:
        server.enable_auth(uuid.uuid4().hex)
        password = uuid.uuid4().hex
        server.add_user("tester", password, "/meshctl/")
        cert, key = ca.node("client")
        secret = password_file(str(tmp_path), "tester", password)
        yield server, EtcdAccess(ca.path, cert, key, "tester", secret)


def _watch_until(store: EtcdStore, revision: int, name: str) -> list[Event]:
    """Watch (again after a broken stream, as the informer does) until name is put."""
    deadline = time.monotonic() + scaled(15)
    while time.monotonic() < deadline:
        try:
            events = store.watch(revision, timeout=1)
        except Unavailable:
            time.sleep(0.2)
            continue
        if any(e.name == name for e in events):
            return events
        revision = events[-1].revision if events else revision
    raise AssertionError(f"the watch never saw {name}")


def test_the_watch_outlives_expired_and_forgotten_tokens(
    short_tokens: tuple[EtcdServer, EtcdAccess],
) -> None:
    server, access = short_tokens
    with open_store(server.url(), access) as store:
        assert isinstance(store, EtcdStore)
        start = store.revision()
        store.put("service", "web", {})
        assert [e.name for e in _watch_until(store, start, "web")] == ["web"]
        time.sleep(3)  # the token has expired: the next request logs in again
        revision = store.put("service", "api", {}).mod_revision
        assert [e.name for e in _watch_until(store, revision - 1, "api")] == ["api"]
        server.stop()  # a restart forgets every token and breaks the watch's stream
        server.start()
        with open_store(server.url(), access) as writer:
            writer.put("service", "db", {})
        # The watch's first request after the restart: its stream is refused for the token.
        assert [e.name for e in _watch_until(store, revision, "db")] == ["db"]
