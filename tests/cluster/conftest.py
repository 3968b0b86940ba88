"""Fixtures of the cluster tests: a netns cluster of controllers on one etcd (harness.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.cluster.harness import Cluster


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    """Three nodes, each with its controller registered, on one etcd; removed whole afterwards."""
    with Cluster(nodes=3) as made:
        yield made
