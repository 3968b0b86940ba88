"""The multi-VM lane's verdict, read on the host from what each VM wrote (tests/vm/cluster/boot).

vng's exit status says nothing, so the lane trusts only files: the lane fails when the first VM's
tests fail or bring back nothing (the single-VM lane's rules, tests.vm.report), when a VM's
provisioning failed or never finished, or when a VM other than the first ended before the lane
stopped it (it died, or its provisioning gave up).

    python -m tests.vm.cluster.verdict LANE_DIR WALL_SECONDS
"""

from __future__ import annotations

import sys
from pathlib import Path

from tests.vm.report import MissingResult, Outcome, counts_line, problems, read_outcome


def vm_names(lane: Path) -> list[str]:
    """The VMs the lane started, the first running the tests; none if it started none."""
    try:
        return [line.split("=", 1)[0] for line in (lane / "vms").read_text().split()]
    except FileNotFoundError:
        return []


def vm_problems(lane: Path, name: str, first: bool) -> list[str]:
    """Why one VM fails the lane, apart from the first one's tests."""
    vm = lane / name
    found = []
    try:
        provisioned = (vm / "provisioned").read_text().strip()
    except FileNotFoundError:
        provisioned = ""
    if not provisioned:
        found.append(f"{name} brought back no result: its provisioning never finished "
                     f"(see {vm}/output.log and {vm}/console.log)")  # fmt: skip
    elif provisioned != "0":
        found.append(f"{name}: provisioning exited {provisioned} (see {vm}/output.log)")
    if not first and not (vm / "stopped").is_file():
        found.append(f"{name}'s VM ended before the lane stopped it (see {vm}/console.log)")
    return found


def judge(lane: Path) -> tuple[Outcome | None, list[str]]:
    """The first VM's test outcome (None if it brought back none) and every problem found."""
    names = vm_names(lane)
    if not names:
        return None, [f"no VM was started: no list of VMs in {lane}"]
    found = []
    for i, name in enumerate(names):
        found += vm_problems(lane, name, first=i == 0)
    try:
        outcome = read_outcome(lane / names[0])
    except MissingResult as err:
        return None, [*found, f"{names[0]}: {err}"]
    return outcome, [*found, *(f"{names[0]}: {p}" for p in problems(outcome))]


def main(argv: list[str]) -> int:
    """Print the problems, the counts and the wall time; exit non-zero when the lane failed."""
    lane, wall = Path(argv[0]), int(argv[1])
    outcome, found = judge(lane)
    for name in vm_names(lane):
        stopped = lane / name / "stopped"
        if stopped.is_file():
            print(f"vm cluster lane: {name} {stopped.read_text().strip()}")
    for line in found:
        print(f"vm cluster lane: {line}")
    tests = outcome.tests if outcome else 0
    print(f"vm cluster lane {'FAILED' if found else 'ok'}: {tests} tests in {wall}s; "
          f"results in {lane}")  # fmt: skip
    if outcome:
        print(counts_line("vm-cluster-lane", outcome))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
