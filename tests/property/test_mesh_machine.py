"""The stateful property test (tests/property/machine.py) as CI runs it: a fixed seed and a
few hundred steps in a few minutes. bench/property.py runs long campaigns with random seeds
through the same test: MESHCTL_PROPERTY_EXAMPLES and MESHCTL_PROPERTY_STEPS size the run, and
`--hypothesis-seed N` replaces the fixed seed."""

from __future__ import annotations

import os
import time

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import run_state_machine_as_test

from tests.property.machine import STATS, MeshMachine

pytestmark = pytest.mark.root

EXAMPLES = int(os.environ.get("MESHCTL_PROPERTY_EXAMPLES", "7"))
STEPS = int(os.environ.get("MESHCTL_PROPERTY_STEPS", "30"))


@pytest.mark.timeout(1800)  # a failure shrinks for up to 5 minutes on top of the run
def test_random_actions_keep_the_node_converged_and_explained(
    request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]
) -> None:
    seeded = request.config.getoption("--hypothesis-seed", None) is not None
    began = time.monotonic()
    try:
        run_state_machine_as_test(
            MeshMachine,
            settings=settings(
                max_examples=EXAMPLES,
                stateful_step_count=STEPS,
                derandomize=not seeded,
                database=None,
                deadline=None,
                phases=(Phase.explicit, Phase.generate, Phase.shrink),
                suppress_health_check=list(HealthCheck),
                print_blob=True,
            ),
        )
    finally:
        with capsys.disabled():
            print(f"\nproperty run, {time.monotonic() - began:.0f}s: {STATS.summary()}")
