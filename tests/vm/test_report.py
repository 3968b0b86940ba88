"""The lane's verdict (tests/vm/report.py) on the files a guest leaves: no root, no VM."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.vm.report import MissingResult, main, problems, read_outcome


def write_results(results: Path, exit_code: int, cases: str) -> None:
    """A results directory as the guest writes it, with a pytest-style junit file."""
    tests = cases.count("<testcase")
    failures = cases.count("<failure")
    skipped = cases.count("<skipped")
    (results / "exit-code").write_text(f"{exit_code}\n")
    (results / "junit.xml").write_text(
        f'<?xml version="1.0"?><testsuites><testsuite name="pytest" errors="0" '
        f'failures="{failures}" skipped="{skipped}" tests="{tests}">{cases}'
        "</testsuite></testsuites>"
    )


PASS = '<testcase classname="tests.vm.test_vm_smoke" name="test_a"/>'
FAIL = '<testcase classname="t" name="test_b"><failure message="boom"/></testcase>'
SKIP_IPVS = (
    '<testcase classname="tests.kernel.test_ipvs" name="test_c">'
    '<skipped type="pytest.skip" message="kernel has no IPVS"/></testcase>'
)
SKIP_OTHER = '<testcase classname="t" name="test_d"><skipped message="needs dnsperf"/></testcase>'


def test_passing_run_passes_and_prints_the_closing_counts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_results(tmp_path, 0, PASS * 2 + SKIP_OTHER)

    assert main([str(tmp_path), "42"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "vm-lane: 2 passed, 0 failed, 1 skipped"


@pytest.mark.parametrize("missing", ["exit-code", "junit.xml"])
def test_missing_result_fails(tmp_path: Path, missing: str) -> None:
    write_results(tmp_path, 0, PASS)
    (tmp_path / missing).unlink()

    with pytest.raises(MissingResult, match=missing):
        read_outcome(tmp_path)
    assert main([str(tmp_path), "1"]) == 1


def test_failing_test_fails_the_lane(tmp_path: Path) -> None:
    write_results(tmp_path, 1, PASS + FAIL)

    assert problems(read_outcome(tmp_path)) == ["pytest exited 1 inside the VM (its log is above)"]


def test_no_test_passed_fails_the_lane(tmp_path: Path) -> None:
    write_results(tmp_path, 0, SKIP_OTHER)

    assert any("no test passed" in p for p in problems(read_outcome(tmp_path)))


def test_skip_for_lack_of_ipvs_fails_the_lane(tmp_path: Path) -> None:
    write_results(tmp_path, 0, PASS + SKIP_IPVS)

    assert problems(read_outcome(tmp_path)) == [
        "skipped inside the IPVS kernel: tests.kernel.test_ipvs.test_c: kernel has no IPVS"
    ]
