"""A long campaign of the stateful property test (tests/property/machine.py): batches of
random examples, each with a new random seed, until the time is up.

Each batch is one pytest run of tests/property/test_mesh_machine.py (every backend the kernel
has, or the one --backend names) with
`--hypothesis-seed SEED` and MESHCTL_PROPERTY_EXAMPLES / MESHCTL_PROPERTY_STEPS set, so a
failing batch is reproduced by the command the report prints (a timing-dependent failure may
need a few tries); hypothesis also prints a @reproduce_failure blob for the exact example.
The report gives batches, examples, steps, wall time and every failure with its log file.
Needs root, like the root tests; like bench/failover.py it runs in a private mount namespace
with its own /run/netns, so no other controller on the host sees its namespaces.

    sudo .venv/bin/python bench/property.py [--minutes 60] [--examples 10] [--steps 60]

IPVS runs in the QEMU lane's kernel (this host's has none), several times slower under TCG:

    bench/vm .venv/bin/python bench/property.py --backend ipvs --minutes 30 --logs /tmp/prop
"""

from __future__ import annotations

import argparse
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from failover import isolate  # bench/failover.py: bench/ is this script's sys.path[0]

ROOT = Path(__file__).resolve().parents[1]
TEST = "tests/property/test_mesh_machine.py"
SUMMARY = re.compile(r"property run \(\w+\), (\d+)s: (\d+) examples, (\d+) steps")  # a backend


@dataclass
class Batch:
    seed: int
    passed: bool
    seconds: float
    examples: int
    steps: int
    log: str
    command: str


def run_batch(seed: int, examples: int, steps: int, logs: Path, backend: str | None) -> Batch:
    env = {
        **os.environ,
        "MESHCTL_PROPERTY_EXAMPLES": str(examples),
        "MESHCTL_PROPERTY_STEPS": str(steps),
    }
    argv = [sys.executable, "-m", "pytest", TEST, "-p", "no:cacheprovider", "-q",
            f"--hypothesis-seed={seed}"] + (["-k", backend] if backend else [])  # fmt: skip
    command = (
        f"MESHCTL_PROPERTY_EXAMPLES={examples} MESHCTL_PROPERTY_STEPS={steps} "
        f".venv/bin/pytest {TEST} --hypothesis-seed={seed}" + (f" -k {backend}" if backend else "")
    )
    began = time.monotonic()
    result = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.monotonic() - began
    log = logs / f"seed-{seed}.log"
    log.write_text(result.stdout + result.stderr)
    runs = SUMMARY.findall(result.stdout)  # one for each backend the test runs
    ran_examples, ran_steps = sum(int(r[1]) for r in runs), sum(int(r[2]) for r in runs)
    return Batch(seed, result.returncode == 0, seconds, ran_examples, ran_steps, str(log), command)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=60, help="wall time to fill")
    parser.add_argument("--examples", type=int, default=10, help="examples per batch")
    parser.add_argument("--steps", type=int, default=60, help="steps per example (at most)")
    parser.add_argument("--seed", type=int, help="the first batch's seed (then random ones)")
    parser.add_argument("--logs", help="where batch logs go (default: a new temp dir)")
    parser.add_argument(
        "--backend",
        choices=("iptables", "nftables", "ipvs"),
        help="run this backend only (default: every one the kernel has)",
    )
    args = parser.parse_args()
    isolate()
    logs = Path(args.logs or tempfile.mkdtemp(prefix="meshprop-campaign-"))
    logs.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.minutes * 60
    began = time.monotonic()
    batches: list[Batch] = []
    seed = args.seed if args.seed is not None else random.getrandbits(32)
    while time.monotonic() < deadline:
        batch = run_batch(seed, args.examples, args.steps, logs, args.backend)
        batches.append(batch)
        verdict = "ok" if batch.passed else f"FAILED (log {batch.log})"
        print(f"seed {batch.seed}: {batch.examples} examples, {batch.steps} steps, "
              f"{batch.seconds:.0f}s: {verdict}", flush=True)  # fmt: skip
        seed = random.getrandbits(32)
    failed = [b for b in batches if not b.passed]
    print(
        f"\n{len(batches)} batches, {sum(b.examples for b in batches)} examples, "
        f"{sum(b.steps for b in batches)} steps in {(time.monotonic() - began) / 60:.1f} min; "
        f"{len(failed)} failed; logs in {logs}"
    )
    for batch in failed:
        print(f"  seed {batch.seed}: {batch.log}\n    reproduce: {batch.command}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
