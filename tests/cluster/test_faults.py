"""The fault campaign's short form (#27): each fault once, in a fixed order with a fixed seed, on
one cluster under traffic the whole time (tests/cluster/faults.py; bench/faults.py runs the
long, random one). After each fault and its heal every node converges (every slot once, its LB
and DNS equal to the serving tasks, `meshctl diff` empty, nothing leaked), and a request failed
only if it went to a task that died, within the detection time."""

from __future__ import annotations

import random
import tempfile
from collections.abc import Iterator

import pytest

from tests.cluster.faults import FAULTS, World, build, run_step
from tests.cluster.harness import Cluster
from tests.conftest import scaled
from tests.kernel.restart_loops import CLIENT_TIMEOUT

pytestmark = [pytest.mark.root, pytest.mark.cluster]

TTL = 6.0  # the nodes' lease: a restarted controller takes over within it on a loaded host
SEED = 27


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    """One cluster for every fault: made once, its loops running from the first to the last."""
    with (
        tempfile.TemporaryDirectory(prefix="meshctl-sick-") as sick,
        Cluster(nodes=3, controller_args=("--node-ttl", f"{TTL:g}s")) as cluster,
    ):
        made = build(cluster, TTL, sick, interval=0.1, timeout=scaled(CLIENT_TIMEOUT))
        try:
            yield made
        finally:
            assert made.traffic is not None
            made.traffic.close()


@pytest.fixture(scope="module")
def rng() -> random.Random:
    return random.Random(SEED)


@pytest.mark.parametrize("fault", FAULTS)
def test_a_fault_fails_only_requests_to_tasks_that_died(
    world: World, rng: random.Random, fault: str
) -> None:
    step = run_step(world, fault, rng)
    j = step.judged
    print(
        f"{fault} ({step.what}): {j.sent} requests, {j.failed} failed, {j.attributable} to "
        f"dead tasks, converged in {step.converged_in}, held up by {step.held_by[:2]}"
    )
    assert j.sent > 0
    assert not step.broken, "\n".join(step.broken)
