"""Fuzz: random arguments to every command never end in a traceback, and a refusal changes
nothing in the store.

Every leaf command is listed here, fuzzed (FUZZED) or left out for a reason (SKIPPED), and
test_every_command_is_fuzzed holds the list to the click command tree: a new command fails it
until it is listed. Options are read from the tree, so a new option is fuzzed without a
change here. Each example runs one command through click's
CliRunner against a copy of a small seeded state dir (a network, two services, a port), with
no controller: the exit code must be 0, 1 or 2 with no traceback, and when it is not 0 the
store's records and revision must be exactly what they were.

The run is derandomized (the same examples every time) and takes a few seconds; set
MESHCTL_FUZZ_EXAMPLES to a larger number to search longer.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshctl.cli import main

# Every leaf command that is fuzzed, by its path.
FUZZED = [
    ("cluster", "join-token"), ("cluster", "leave"),
    ("completion",),
    ("container", "attach"), ("container", "detach"), ("container", "ls"),
    ("controller", "health"),
    ("events",),
    ("network", "create"), ("network", "inspect"), ("network", "ls"), ("network", "rm"),
    ("node", "demote"), ("node", "inspect"), ("node", "ls"), ("node", "promote"), ("node", "rm"),
    ("node", "update"),
    ("router", "cert", "add"), ("router", "cert", "ls"), ("router", "cert", "rm"),
    ("router", "disable"), ("router", "enable"), ("router", "inspect"),
    ("service", "create"), ("service", "inspect"), ("service", "logs"), ("service", "ls"),
    ("service", "ps"), ("service", "rm"), ("service", "scale"), ("service", "update"),
    ("store", "rm"),
]  # fmt: skip
# Left out, each for a reason of its own:
SKIPPED = {
    ("cluster", "init"): "starts an etcd member that outlives the command, on fixed ports",
    ("cluster", "join"): "asks a manager over the network (random addresses: long timeouts)",
    ("controller", "run"): "runs until SIGTERM and programs the kernel (needs root)",
    ("exec",): "replaces the test process (os.execvp) with the command",
    ("diff",): "reads the kernel of a node (needs root)",
    ("doctor",): "probes the kernel's features (needs root)",
}
# `service logs --follow` prints until interrupted. The top-level --state-dir and --store are
# not fuzzed either: a random store URL would create files anywhere on this machine.
SKIPPED_OPTIONS = {("service", "logs"): {"follow"}}
# Options that would make a command wait (no controller runs here): each command that has one
# is always given the value that returns at once, and that option is not fuzzed. The waiting
# paths run against a real controller in tests/kernel/test_operating.py.
RETURN_AT_ONCE = {
    "detach": ["--detach"],  # service create/update/scale/rm wait for the tasks otherwise
    "timeout": [],  # only bounds that wait
    "until": ["--until", "1970-01-01T00:00:00Z"],  # events follow otherwise
    "wait_for": [],  # controller health --wait asks again until then
}
EXAMPLES = int(os.environ.get("MESHCTL_FUZZ_EXAMPLES", "1500"))

# Values near what the commands expect, and the ones that broke them before (#14).
INTERESTING = [
    "web", "api", "db", "new", "front", "back", "ingress", "web.1", "web.2", "node1",
    "0", "1", "2", "-1", "3", "65535", "65536", "4194304", "9" * 30,
    "10.70.0.0/24", "10.71.0.0/29", "127.0.0.0/8", "0.0.0.0/0", "169.254.0.0/16",
    "8000:80", "8001:81/udp", "mode=host,8002:80", "traffic=local,8003:80", "²:80",
    "8080/healthz", "²/x", "5s", "0s", "1m30s", "9" * 400 + "h",
    "A=1", "A\n=1", "k=v", "=", "web=3", "web=--5", "web=²", "api=100000",
    "/proc/self/ns/net", "/proc/1/ns/net", "/run/netns/x", "1.1.1.1", "1.1.1.1:99999",
    "", " ", "\n", "web\n", "²", "٣", "--5", "-", "--", "\x00", "a\x00b", "\udcff",
    "network", "service", "task", "port", "ipam", "node", "container",
]  # fmt: skip
NEAR = st.sampled_from(INTERESTING)
VALUES = st.one_of(
    NEAR,
    NEAR,
    NEAR,
    st.text(max_size=12),
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
)


def leaf_commands(group: click.Group, path: tuple[str, ...] = ()) -> Iterator[Any]:
    """Every command of the tree that is not a group, with its path."""
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            yield from leaf_commands(command, (*path, name))
        else:
            yield (*path, name), command


LEAVES = dict(leaf_commands(main))
COMMANDS = [(path, LEAVES[path]) for path in FUZZED if path in LEAVES]


def shaped(param: click.Parameter) -> st.SearchStrategy[str]:
    """Values for a parameter: where its metavar shows a shape (K=V, PUBLISHED:TARGET,
    PORT/PATH), also random values put together in that shape."""
    metavar = param.metavar or ""
    separators = [sep for sep in "=:/" if sep in metavar]
    if not separators:
        return VALUES
    pairs = st.tuples(st.sampled_from(separators), VALUES, VALUES).map(lambda t: t[1] + t[0] + t[2])
    return st.one_of(pairs, pairs, VALUES)


def option_tokens(option: click.Option) -> st.SearchStrategy[list[str]]:
    """One to three uses (one if not repeatable) of an option, with values of its kind."""
    flag = option.opts[0]
    if option.is_flag:
        return st.just([flag])
    values = shaped(option)
    if option.type.name == "integer":
        small = st.integers(min_value=-3, max_value=70_000).map(str)
        values = st.one_of(small, small, VALUES)
    if isinstance(option.type, click.Choice):
        choices = st.sampled_from(list(option.type.choices))
        values = st.one_of(choices, choices, choices, VALUES)
    uses = st.lists(values, min_size=1, max_size=3 if option.multiple else 1)
    return uses.map(lambda vs: [token for v in vs for token in (flag, v)])


@st.composite
def invocations(draw: st.DrawFn) -> list[str]:
    """A command with its required options and up to three others, then its arguments."""
    path, command = draw(st.sampled_from(COMMANDS))
    skipped = SKIPPED_OPTIONS.get(path, set()) | set(RETURN_AT_ONCE)
    options = [p for p in command.params if isinstance(p, click.Option) and p.name not in skipped]
    at_once = [
        t for p in command.params if p.name in RETURN_AT_ONCE for t in RETURN_AT_ONCE[p.name]
    ]
    chosen = [o for o in options if o.required]
    optional = [o for o in options if not o.required]
    if optional:
        chosen += draw(st.lists(st.sampled_from(optional), max_size=3, unique_by=id))
    argv = [*path, *at_once]
    for option in chosen:
        argv += draw(option_tokens(option))
    positional: list[str] = []
    for param in command.params:
        if isinstance(param, click.Argument):
            count = (0, 3) if param.nargs == -1 else (1, 1)
            positional += draw(st.lists(shaped(param), min_size=count[0], max_size=count[1]))
    # After `--` every token is positional, so values that start with '-' stay values.
    return [*argv, "--", *positional]


def snapshot(state_dir: Path) -> tuple[int, list[tuple[Any, ...]]]:
    """The store's revision and every record, read straight from the file."""
    db = sqlite3.connect(state_dir / "state.db")
    try:
        revision = db.execute("SELECT value FROM meta WHERE key = 'revision'").fetchone()[0]
        records = db.execute("SELECT * FROM kv ORDER BY kind, name").fetchall()
    finally:
        db.close()
    return revision, records


@pytest.fixture(scope="module")
def seed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A state dir with something in it for the commands to read, update and remove."""
    state = tmp_path_factory.mktemp("seed")
    runner = CliRunner()
    for args in (
        ["network", "create", "front", "--subnet", "10.70.0.0/24"],
        ["network", "create", "back", "--subnet", "10.71.0.0/29", "--label", "k=v"],
        ["service", "create", "--name", "web", "--replicas", "2", "--network", "front:www",
         "--publish", "8000:80", "--health-http", "80/healthz", "-d", "--", "sleep", "1"],
        ["service", "create", "--name", "api", "--network", "back", "--publish",
         "mode=host,9000:90", "-d", "--", "true"],
    ):  # fmt: skip
        result = runner.invoke(main, ["--state-dir", str(state), *args])
        assert result.exit_code == 0, (args, result.output, result.exception)
    return state


def test_every_command_is_fuzzed() -> None:
    """Every leaf command of the tree is fuzzed or skipped on purpose, not both, and every
    listed one exists."""
    assert not set(FUZZED) & set(SKIPPED)
    assert sorted(LEAVES) == sorted([*FUZZED, *SKIPPED])


def test_random_arguments_never_give_a_traceback_and_a_refusal_changes_nothing(
    seed: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    work = tmp_path_factory.mktemp("fuzz") / "state"
    runner = CliRunner()

    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(invocations())
    def check(argv: list[str]) -> None:
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(seed, work)
        before = snapshot(work)
        result = runner.invoke(main, argv, env={"MESHCTL_STATE_DIR": str(work)})
        output = result.stdout + result.stderr
        assert result.exit_code in (0, 1, 2), (argv, output, result.exception)
        assert result.exception is None or isinstance(result.exception, SystemExit), (
            argv,
            result.exception,
        )
        assert "Traceback" not in output, (argv, output)
        if result.exit_code != 0:
            assert snapshot(work) == before, (argv, output)
            assert result.stderr.strip(), (argv, "a refusal says why")

    check()
