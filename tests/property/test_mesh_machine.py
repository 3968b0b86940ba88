"""The stateful property test (tests/property/machine.py) as CI runs it, once with each
backend this kernel has: a fixed seed and a few hundred steps in a few minutes each with
iptables and nftables natively; with ipvs (marked `ipvs`: it skips where the kernel has no
IPVS, saying why) in the QEMU lane, whose emulated CPU makes each step several times slower,
so a short run there (IPVS_RUN). bench/property.py runs long campaigns with random seeds
through the same test: MESHCTL_PROPERTY_EXAMPLES and MESHCTL_PROPERTY_STEPS size the run (of
every backend), and `--hypothesis-seed N` replaces the fixed seed."""

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
# The ipvs run's examples and steps unless the environment sizes the run: the QEMU lane's
# whole run is kept near 15 minutes. One example, hypothesis's simplest: a service of two tasks
# whose health check flaps, so a task leaves IPVS and joins it again, step after step (a second
# example would be a random one, at about twice the time).
IPVS_RUN = (
    int(os.environ.get("MESHCTL_PROPERTY_EXAMPLES", "1")),
    int(os.environ.get("MESHCTL_PROPERTY_STEPS", "6")),
)


@pytest.mark.timeout(1800)  # a failure shrinks for up to 5 minutes on top of the run
@pytest.mark.parametrize(
    "backend", ["iptables", "nftables", pytest.param("ipvs", marks=pytest.mark.ipvs)]
)
def test_random_actions_keep_the_node_converged_and_explained(
    backend: str, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str]
) -> None:
    reason = backend_named(backend).available(real_kernel())
    if reason is not None:
        print(f"{backend} backend not tested here: {reason}")
        pytest.skip(f"the {backend} backend cannot run on this kernel: {reason}; "
                    "the QEMU lane (tests/vm/run) runs the ipvs one")  # fmt: skip
    examples, steps = IPVS_RUN if backend == "ipvs" else (EXAMPLES, STEPS)
    seeded = request.config.getoption("--hypothesis-seed", None) is not None
    machine = type(f"MeshMachine_{backend}", (MeshMachine,), {"backend": backend})
    STATS.reset()
    began = time.monotonic()
    try:
        run_state_machine_as_test(
            machine,
            settings=settings(
                max_examples=examples,
                stateful_step_count=steps,
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
