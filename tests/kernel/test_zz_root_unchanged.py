"""Runs last (see conftest): the whole suite left the root namespace exactly as it found it."""

import pytest

from tests.conftest import root_namespace_snapshot

pytestmark = pytest.mark.root


def test_root_namespace_unchanged(root_snapshot_at_start: dict[str, str]) -> None:
    now = root_namespace_snapshot()
    for key, before in root_snapshot_at_start.items():
        assert now[key] == before, f"the test suite changed the root namespace's {key}"
