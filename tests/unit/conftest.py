"""Fixtures of the unit tests: a store of each kind, so a test of the store protocol (or of
what is built on it) runs on both."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshctl.store import Store, default_store_url, open_store
from tests.etcd import EtcdServer


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
