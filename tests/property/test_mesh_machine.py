"""The stateful property test (tests/property/machine.py) as CI runs it, once with each
backend this kernel has (iptables, nftables): a fixed seed and a few hundred steps in a few
minutes each. bench/property.py runs long campaigns with random seeds
through the same test: MESHCTL_PROPERTY_EXAMPLES and MESHCTL_PROPERTY_STEPS size the run, and
`--hypothesis-seed N` replaces the fixed seed."""

from __future__ import annotations

import os
import time

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import run_state_machine_as_test

from kernel.system import real_kernel
from meshctl.lb.backends import backend_named
from tests.property.machine import STATS, MeshMachine

pytestmark = pytest.mark.root

EXAMPLES = int(os.environ.get("MESHCTL_PROPERTY_EXAMPLES", "7"))
STEPS = int(os.environ.get("MESHCTL_PROPERTY_STEPS", "30"))


@pytest.mark.timeout(1800)  # a failure shrinks for up to 5 minutes on top of the run
@pytest.mark.parametrize("backend", ["iptables", "nftables"])
def test_random_actions_keep_the_node_converged_and_explained(
    backend: str, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]
) -> None:
    reason = backend_named(backend).available(real_kernel())
    if reason is not None:
        pytest.skip(f"the {backend} backend cannot run on this kernel: {reason}")
    seeded = request.config.getoption("--hypothesis-seed", None) is not None
    machine = type(f"MeshMachine_{backend}", (MeshMachine,), {"backend": backend})
    STATS.reset()
    began = time.monotonic()
    try:
        run_state_machine_as_test(
            machine,
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
            print(f"\nproperty run ({backend}), {time.monotonic() - began:.0f}s: {STATS.summary()}")
