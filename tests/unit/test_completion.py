"""Shell completion as bash runs it: an interactive bash sources `meshctl completion bash` and
calls its function with COMP_WORDS, as pressing TAB does; names come from the store."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from meshctl.cli import main
from meshctl.model import NODE, Node
from meshctl.store import open_store
from tests.conftest import scaled

BIN = Path(sys.executable).parent  # where the venv put the meshctl entry point


def complete(state_dir: Path, *words: str) -> list[str]:
    """COMPREPLY for the command line `words` with the cursor on the last word."""
    line = " ".join(f"'{w}'" for w in words)
    script = (
        'eval "$(meshctl completion bash)"\n'
        f"COMP_WORDS=({line}); COMP_CWORD={len(words) - 1}\n"
        "_meshctl_completion meshctl\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}",
           "MESHCTL_STATE_DIR": str(state_dir), "HOME": str(state_dir)}  # fmt: skip
    result = subprocess.run(["bash", "-ic", script], env=env, capture_output=True, text=True,
                            timeout=scaled(60), stdin=subprocess.DEVNULL)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return [line for line in result.stdout.splitlines() if line]


@pytest.fixture
def state(tmp_path: Path) -> Path:
    runner = CliRunner()
    for args in (
        ["network", "create", "front"],
        ["network", "create", "back"],
        ["service", "create", "--name", "web", "--replicas", "2", "-d", "--", "true"],
        ["service", "create", "--name", "worker", "-d", "--", "true"],
    ):
        result = runner.invoke(main, ["--state-dir", str(tmp_path), *args])
        assert result.exit_code == 0, result.output
    with open_store(f"sqlite://{tmp_path}/state.db") as store:
        from tests.unit.leader import settle

        settle(store)  # the leader's task records: web.1, web.2, worker.1
        store.put(NODE, "node1", Node("node1").to_dict())
    return tmp_path


def test_commands_and_options_complete(state: Path) -> None:
    assert complete(state, "meshctl", "ser") == ["service"]
    assert "scale" in complete(state, "meshctl", "service", "")
    assert complete(state, "meshctl", "service", "logs", "--t") == ["--tail", "--timestamps"]


def test_names_complete_from_the_store(state: Path) -> None:
    assert complete(state, "meshctl", "service", "scale", "w") == ["web=", "worker="]
    assert complete(state, "meshctl", "service", "ps", "wo") == ["worker"]
    assert complete(state, "meshctl", "service", "create", "--network", "") == ["back", "front"]
    assert complete(state, "meshctl", "network", "rm", "f") == ["front"]
    assert complete(state, "meshctl", "exec", "web") == ["web.1", "web.2"]
    assert complete(state, "meshctl", "service", "logs", "web") == ["web", "web.1", "web.2"]
    assert complete(state, "meshctl", "node", "inspect", "") == ["node1"]


def test_without_a_store_nothing_is_made_and_nothing_completes(tmp_path: Path) -> None:
    assert complete(tmp_path / "none", "meshctl", "service", "ps", "") == []
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_every_shell_gets_a_script(shell: str) -> None:
    result = CliRunner().invoke(main, ["completion", shell])
    assert result.exit_code == 0 and "_MESHCTL_COMPLETE" in result.output
