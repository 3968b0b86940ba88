"""The multi-VM lane's verdict (tests/vm/cluster/verdict.py) on the files the VMs and
tests/vm/cluster/boot leave: no root, no VM."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.vm.cluster.verdict import judge, main
from tests.vm.test_report import FAIL, PASS, write_results

VMS = ("node1", "node2", "node3")


def lane_dir(lane: Path) -> Path:
    """A lane where all went well: every VM provisioned, node1's tests passed, the others
    stopped by the lane (one powered off by the tests)."""
    (lane / "vms").write_text("".join(f"{n}=192.168.56.1{i}\n" for i, n in enumerate(VMS, 1)))
    for name in VMS:
        (lane / name).mkdir()
        (lane / name / "provisioned").write_text("0\n")
    write_results(lane / "node1", 0, PASS * 6)
    (lane / "node2" / "stopped").write_text("stopped by the lane\n")
    (lane / "node3" / "stopped").write_text("powered off by the tests\n")
    return lane


def test_a_good_lane_passes_and_prints_the_closing_counts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lane = lane_dir(tmp_path)

    assert judge(lane)[1] == []
    assert main([str(lane), "200"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "vm cluster lane: node3 powered off by the tests" in out
    assert out[-1] == "vm-cluster-lane: 6 passed, 0 failed, 0 skipped"


def test_a_vm_that_ended_on_its_own_fails_the_lane(tmp_path: Path) -> None:
    lane = lane_dir(tmp_path)
    (lane / "node2" / "stopped").unlink()

    assert judge(lane)[1] == [
        f"node2's VM ended before the lane stopped it (see {lane}/node2/console.log)"
    ]
    assert main([str(lane), "1"]) == 1


@pytest.mark.parametrize("provisioned", [None, "1"])
def test_a_vm_not_provisioned_fails_the_lane(tmp_path: Path, provisioned: str | None) -> None:
    lane = lane_dir(tmp_path)
    if provisioned is None:
        (lane / "node3" / "provisioned").unlink()
    else:
        (lane / "node3" / "provisioned").write_text(provisioned)

    (problem,) = judge(lane)[1]
    assert problem.startswith(
        "node3 brought back no result" if provisioned is None else "node3: provisioning exited 1"
    )


def test_no_test_result_from_the_first_vm_fails_the_lane(tmp_path: Path) -> None:
    lane = lane_dir(tmp_path)
    (lane / "node1" / "junit.xml").unlink()

    outcome, found = judge(lane)
    assert outcome is None
    assert len(found) == 1 and found[0].startswith("node1: no junit.xml in ")
    assert main([str(lane), "1"]) == 1


def test_a_failing_test_fails_the_lane(tmp_path: Path) -> None:
    lane = lane_dir(tmp_path)
    write_results(lane / "node1", 1, PASS * 5 + FAIL)

    assert judge(lane)[1] == ["node1: pytest exited 1 inside the VM (its log is above)"]


def test_no_list_of_vms_fails_the_lane(tmp_path: Path) -> None:
    assert judge(tmp_path) == (None, [f"no VM was started: no list of VMs in {tmp_path}"])
    assert main([str(tmp_path), "0"]) == 1
