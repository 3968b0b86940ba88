"""Task log rotation (copytruncate) on plain files: what is kept, in which file, and bounds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from meshctl.runtime import read_log, rotate_log, rotated_paths, task_log_path


def files(directory: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(directory.iterdir())}


def test_a_log_past_its_size_moves_to_log_1_and_the_oldest_copy_goes(tmp_path: Path) -> None:
    log = tmp_path / "log"
    assert not rotate_log(str(log), 10, 3)  # nothing written yet
    log.write_text("0123456789\n")
    assert rotate_log(str(log), 10, 3)
    assert not rotate_log(str(log), 10, 3)  # empty now
    for text in ("second....\n", "third.....\n"):
        with open(log, "a") as f:
            f.write(text)
        assert rotate_log(str(log), 10, 3)
    assert files(tmp_path) == {"log": "", "log.1": "third.....\n", "log.2": "second....\n"}
    assert rotated_paths(str(log), 3) == [f"{log}.2", f"{log}.1"]


def test_only_emptied_with_keep_1_and_a_flood_keeps_its_last_lines(tmp_path: Path) -> None:
    log = tmp_path / "log"
    log.write_text("x" * 30)
    assert rotate_log(str(log), 10, 1)
    assert files(tmp_path) == {"log": ""}
    log.write_text("".join(f"line {i}\n" for i in range(10)))  # 70 bytes, over twice 20
    assert rotate_log(str(log), 20, 2)
    assert files(tmp_path) == {"log": "", "log.1": "line 8\nline 9\n"}  # from a line start


def test_a_log_that_cannot_be_rotated_is_left_and_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log = tmp_path / "log"
    log.write_text("x" * 30)
    (tmp_path / "log.1").mkdir()  # in the way of the copy
    (tmp_path / "log.1" / "f").touch()
    assert not rotate_log(str(log), 10, 2)
    assert log.read_text() == "x" * 30
    assert "cannot rotate" in caplog.text


def test_the_clock_notes_when_lines_were_written_and_rotation_keeps_the_notes(
    tmp_path: Path,
) -> None:
    from meshctl.runtime import LogClock, line_time, read_times

    log = tmp_path / "log"
    clock = LogClock()
    log.write_text("one\ntwo\n")
    os.utime(log, (100.0, 100.0))
    clock.note([str(log)])
    clock.note([str(log)])  # no growth, no note
    with open(log, "a") as f:
        f.write("three\n")
    os.utime(log, (200.0, 200.0))
    clock.note([str(log)])
    notes = read_times(str(log))
    assert notes == [(8, 100.0), (14, 200.0)]
    assert [line_time(notes, end, 300.0) for end in (3, 7, 13, 20)] == [100, 100, 200, 300]
    with open(log, "a") as f:
        f.write("four\n")
    assert clock.rotate(str(log), 10, 3)  # notes what it holds first, then moves the notes
    assert read_times(str(log) + ".1")[:2] == notes and read_times(str(log)) == []
    assert not (tmp_path / "log.times").exists()


def test_following_a_log_goes_on_across_a_rotation(tmp_path: Path) -> None:
    log = Path(task_log_path(str(tmp_path), "t1"))
    log.parent.mkdir(parents=True)
    log.write_text("a\nb\n")
    lines, offset = read_log(str(log), None)
    assert ([text for text, _ in lines], offset) == (["a", "b"], 4)
    with open(log, "a") as f:
        f.write("c\nd\n")
    assert rotate_log(str(log), 4, 3)  # c and d are in log.1 now, unread
    with open(log, "a") as f:
        f.write("e\n")
    lines, offset = read_log(str(log), offset)
    assert ([text for text, _ in lines], offset) == (["c", "d", "e"], 2)
