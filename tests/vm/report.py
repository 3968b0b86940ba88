"""The QEMU lane's verdict, read on the host from the files the guest wrote.

vng's exit status does not carry the guest's result, so the lane trusts only these files:
a missing file, a non-zero pytest exit code, no test run, or a test skipped for lack of IPVS
(inside the kernel that has it) all fail the lane.

    python -m tests.vm.report RESULTS_DIR WALL_SECONDS
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Outcome:
    """What one guest run produced: pytest's exit code and its junit counts."""

    exit_code: int
    tests: int
    failures: int
    errors: int
    skipped: int
    # "nodeid: reason" of every skipped test, to show and to check for IPVS skips.
    skips: list[str] = field(default_factory=list)

    @property
    def passed(self) -> int:
        return self.tests - self.failures - self.errors - self.skipped


class MissingResult(Exception):
    """The guest did not write its result: it crashed, hung or never started the tests."""


def read_outcome(results: Path) -> Outcome:
    """Read exit-code and junit.xml from the results directory the guest wrote into."""
    code_file, junit_file = results / "exit-code", results / "junit.xml"
    for f in (code_file, junit_file):
        if not f.is_file():
            raise MissingResult(f"no {f.name} in {results}: the guest never finished the tests")
    try:
        exit_code = int(code_file.read_text().strip())
    except ValueError as err:
        raise MissingResult(f"{code_file} holds no exit code: {err}") from err
    try:
        root = ET.parse(junit_file).getroot()
    except ET.ParseError as err:
        raise MissingResult(f"{junit_file} is not valid junit XML: {err}") from err
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    skips = [
        f"{case.get('classname')}.{case.get('name')}: {skip.get('message', '')}"
        for suite in suites
        for case in suite.iter("testcase")
        for skip in case.findall("skipped")
    ]
    return Outcome(
        exit_code=exit_code,
        tests=sum(int(s.get("tests", 0)) for s in suites),
        failures=sum(int(s.get("failures", 0)) for s in suites),
        errors=sum(int(s.get("errors", 0)) for s in suites),
        skipped=sum(int(s.get("skipped", 0)) for s in suites),
        skips=skips,
    )


def problems(outcome: Outcome) -> list[str]:
    """Why the lane fails, one line each; empty when it passes."""
    found = []
    if outcome.exit_code != 0:
        found.append(f"pytest exited {outcome.exit_code} inside the VM (its log is above)")
    if outcome.passed == 0:
        found.append("no test passed inside the VM: check the selection given to tests/vm/run")
    # The lane exists to run what the host skips for lack of IPVS; such a skip here is a bug.
    found += [f"skipped inside the IPVS kernel: {s}" for s in outcome.skips if "ipvs" in s.lower()]
    return found


def counts_line(lane: str, outcome: Outcome) -> str:
    """The plain closing line CI reads for a lane's counts."""
    failed = outcome.failures + outcome.errors
    return f"{lane}: {outcome.passed} passed, {failed} failed, {outcome.skipped} skipped"


def main(argv: list[str]) -> int:
    """Print the counts and wall time; exit non-zero when the lane failed."""
    results, wall = Path(argv[0]), int(argv[1])
    kernel = results / "kernel.txt"
    if kernel.is_file():
        print("vm lane:", kernel.read_text().strip().replace("\n", "; modules: "))
    try:
        outcome = read_outcome(results)
    except MissingResult as err:
        print(f"vm lane: FAILED in {wall}s: {err}; the console log is {results}/console.log")
        return 1
    for skip in outcome.skips:
        print(f"vm lane: skipped {skip}")
    found = problems(outcome)
    for line in found:
        print(f"vm lane: {line}")
    print(f"vm lane {'FAILED' if found else 'ok'}: {outcome.tests} tests in {wall}s")
    print(counts_line("vm-lane", outcome))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
