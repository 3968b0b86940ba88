"""Fixtures of the root tests that drive a whole controller."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kernel.mesh import Mesh


@pytest.fixture
def mesh(node_ns: str, tmp_path: Path) -> Iterator[Mesh]:
    """A mesh of one node: its state dir, controller and CLI; removed whole afterwards."""
    m = Mesh(node_ns, str(tmp_path / "state"))
    try:
        yield m
    finally:
        m.close()
