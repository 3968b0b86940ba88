"""Runs last (see conftest): the whole suite left the root namespace exactly as it found it."""

import difflib

import pytest

from tests.conftest import root_namespace_snapshot

pytestmark = pytest.mark.root


def test_root_namespace_unchanged(root_snapshot_at_start: dict[str, str]) -> None:
    """Every part of the snapshot compared, each change shown as a diff."""
    now = root_namespace_snapshot()
    assert now.keys() == root_snapshot_at_start.keys()
    changed = [
        f"{key}:\n" + "\n".join(difflib.unified_diff(before.splitlines(), now[key].splitlines()))
        for key, before in root_snapshot_at_start.items()
        if now[key] != before
    ]
    assert not changed, "the test suite changed the root namespace's " + "\n".join(changed)
