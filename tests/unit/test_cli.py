"""The CLI as a user runs it: real state dir, exit codes, one-line errors, tables and JSON."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result

from meshctl.cli import main
from meshctl.commands import progress
from meshctl.controller.main import JsonFormatter
from meshctl.model import NODE, NODE_STATUS, Certificate, Container, Node, NodeStatus
from meshctl.store import open_store
from tests.unit.leader import settle


@pytest.fixture
def run(tmp_path: Path) -> Any:
    """Run `meshctl --state-dir TMP ARGS...`; check the exit code when `code` is given."""
    runner = CliRunner()

    def invoke(*args: str, code: int | None = 0) -> Result:
        result = runner.invoke(main, ["--state-dir", str(tmp_path), *args])
        if code is not None:
            assert result.exit_code == code, (result.stdout, result.stderr, result.exception)
        return result

    return invoke


@pytest.fixture
def leader(tmp_path: Path) -> Any:
    """What a leader's controller would do to the state dir's store: make the tasks."""

    def step() -> None:
        with open_store(f"sqlite://{tmp_path}/state.db") as store:
            settle(store)

    return step


@pytest.fixture(autouse=True)
def _no_controller(monkeypatch: pytest.MonkeyPatch) -> None:
    """A `controller run` whose options pass must not start a controller here: it would
    program this test process's namespace (the host's)."""
    import meshctl.controller.main

    def refuse(*args: Any, **kwargs: Any) -> int:
        raise AssertionError("a unit test reached run_controller")

    monkeypatch.setattr(meshctl.controller.main, "run_controller", refuse)


def one_line_error(result: Result, message: str) -> None:
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert message in result.stderr


def all_commands(group: click.Group, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = [path]
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            found += all_commands(command, (*path, name))
        else:
            found.append((*path, name))
    return found


@pytest.mark.parametrize("command", all_commands(main), ids=" ".join)
def test_every_command_has_help_with_an_example(run: Any, command: tuple[str, ...]) -> None:
    result = run(*command, "--help")
    assert "Usage: " in result.stdout
    assert "\n  Example" in result.stdout and "    meshctl " in result.stdout


def test_create_stores_the_spec_and_ps_lists_pending_tasks(run: Any, leader: Any) -> None:
    run("network", "create", "front", "--subnet", "10.40.0.0/24")
    result = run(
        "service", "create", "--name", "web", "--replicas", "2", "--network", "front:www",
        "--publish", "8000:80", "--", "python3", "-m", "http.server", "80",
    )  # fmt: skip
    service_id = result.stdout.strip()
    assert len(service_id) == 12
    assert "no controller is running: tasks stay pending" in result.stderr
    assert json.loads(run("service", "ps", "web", "--format", "json").stdout) == []
    leader()
    tasks = json.loads(run("service", "ps", "web", "--format", "json").stdout)
    assert [(t["name"], t["state"], t["node"], t["health"]) for t in tasks] == [
        ("web.1", "pending", "", "none"),
        ("web.2", "pending", "", "none"),
    ]
    # Publishing through the routing mesh joins the service to the ingress network too.
    assert [t["addresses"] for t in tasks] == [
        {"front": "10.40.0.3", "ingress": "10.255.0.3"},
        {"front": "10.40.0.4", "ingress": "10.255.0.4"},
    ]
    table = run("service", "ps", "web").stdout.splitlines()
    assert table[0].split() == [
        "ID", "NAME", "NODE", "DESIRED", "STATE", "CURRENT", "STATE", "HEALTH", "ERROR", "ADDRESSES"
    ]  # fmt: skip
    name, node, desired, state, age, ago, *rest = table[1].split()[1:]
    assert (name, node, desired, state, ago) == ("web.1", "-", "running", "pending", "ago")
    assert age.endswith("s")
    assert rest == ["none", "-", "front=10.40.0.3,ingress=10.255.0.3"]
    inspect = json.loads(run("service", "inspect", "web", "--format", "json").stdout)
    assert inspect["id"] == service_id
    assert inspect["command"] == ["python3", "-m", "http.server", "80"]
    assert inspect["networks"] == [
        {"network": "front", "aliases": ["www"], "vip": "10.40.0.2"},
        {"network": "ingress", "aliases": [], "vip": "10.255.0.2"},
    ]
    listing = run("service", "ls").stdout.splitlines()
    assert listing[0].split() == ["ID", "NAME", "MODE", "REPLICAS", "PORTS"]
    assert listing[1].split() == [service_id, "web", "replicated", "0/2", "*:8000->80/tcp"]


def test_service_options_reach_the_stored_spec(run: Any) -> None:
    run("network", "create", "front", "--subnet", "10.41.0.0/24")
    run(
        "service", "create", "--name", "api", "--endpoint-mode", "dnsrr", "--network", "front",
        "--publish", "mode=host,53:5353/udp", "--health-http", "8080/healthz",
        "--health-interval", "1m30s", "--health-retries", "5", "--restart-condition",
        "on-failure", "--restart-delay", "500ms", "--stop-grace-period", "2s", "--env", "A=1=2",
        "--hostname", "api.example.com", "--detach", "--", "sleep", "infinity",
    )  # fmt: skip
    spec = json.loads(run("service", "inspect", "api", "--format", "json").stdout)
    assert spec["endpoint_mode"] == "dnsrr"
    assert spec["ports"] == [
        {"published": 53, "target": 5353, "protocol": "udp", "mode": "host", "traffic": "cluster"}
    ]
    assert spec["health"]["kind"] == "http"
    assert (spec["health"]["port"], spec["health"]["path"]) == (8080, "/healthz")
    assert (spec["health"]["interval"], spec["health"]["retries"]) == (90.0, 5)
    assert spec["restart"] == {"condition": "on-failure", "delay": 0.5, "max_attempts": 0}
    assert spec["stop_grace_period"] == 2.0
    assert spec["env"] == {"A": "1=2"}
    assert spec["hostnames"] == ["api.example.com"]
    pretty = run("service", "inspect", "api").stdout
    assert "Health check:      http 8080/healthz every 1m30s" in pretty


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--name", "Web"], "invalid service name 'Web'"),
        (["--name", "web", "--replicas", "-1"], "invalid --replicas -1"),
        (["--name", "web", "--publish", "0:80"], "invalid published port 0"),
        (["--name", "web", "--publish", "80:80", "--publish", "80:81"], "published twice"),
        (["--name", "web", "--network", "nope"], "network nope not found; create it with"),
        (["--name", "web", "--health-interval", "5"], "invalid --health-interval '5'"),
        (["--name", "web", "--env", "NOVALUE"], "invalid --env 'NOVALUE': write KEY=VALUE"),
        (
            ["--name", "web", "--endpoint-mode", "dnsrr", "--publish", "80:80"],
            "endpoint mode dnsrr has no VIP",
        ),
    ],
)
def test_invalid_input_is_one_line_on_stderr_and_stores_nothing(
    run: Any, tmp_path: Path, args: list[str], message: str
) -> None:
    one_line_error(run("service", "create", *args, "--", "true", code=None), message)
    assert run("service", "ls", "--format", "json").stdout.strip() == "[]"


def test_usage_errors_exit_2(run: Any) -> None:
    assert "missing COMMAND" in run("service", "create", "--name", "web", code=2).stderr
    assert "Invalid value" in run("service", "create", "--endpoint-mode", "x", code=2).stderr
    run("service", "scale", "web", code=2)
    both = run("service", "create", "--name", "w", "--health-cmd", "true", "--health-tcp", "80",
               "--", "true", code=2)  # fmt: skip
    assert "give only one of --health-cmd" in both.stderr
    assert "need a check" in run("service", "create", "--name", "w", "--health-retries", "2",
                                 "--", "true", code=2).stderr  # fmt: skip


def test_a_full_network_fails_cleanly(run: Any) -> None:
    run("network", "create", "tiny", "--subnet", "10.50.0.0/29")
    result = run("service", "create", "--name", "web", "--replicas", "6", "--network", "tiny",
                 "--", "true", code=None)  # fmt: skip
    one_line_error(result, "network tiny (10.50.0.0/29) has no free address for task web.4")
    assert run("service", "ls", "--format", "json").stdout.strip() == "[]"
    network = json.loads(run("network", "inspect", "tiny", "--format", "json").stdout)
    assert network["allocations"] == []


def test_network_commands(run: Any) -> None:
    network_id = run("network", "create", "front", "--internal", "--label", "team=a").stdout.strip()
    run("network", "create", "back")
    one_line_error(
        run("network", "create", "over", "--subnet", "10.10.0.0/16", code=None),
        "it overlaps network",
    )
    listing = json.loads(run("network", "ls", "--format", "json").stdout)
    assert [(n["name"], n["subnet"], n["internal"]) for n in listing] == [
        ("back", "10.10.1.0/24", False),
        ("front", "10.10.0.0/24", True),
    ]
    front = json.loads(run("network", "inspect", "front", "--format", "json").stdout)
    assert front["id"] == network_id
    assert (front["gateway"], front["labels"]) == ("10.10.0.1", {"team": "a"})
    assert run("network", "ls").stdout.startswith("NETWORK ID     NAME    DRIVER   SUBNET")
    run("service", "create", "--name", "web", "--network", "front", "-d", "--", "true")
    one_line_error(run("network", "rm", "front", code=None), "in use by service web")
    run("service", "rm", "web")
    assert run("network", "rm", "front").stdout == "front\n"
    one_line_error(run("network", "inspect", "front", code=None), "network front not found")


def test_scale_update_and_rm(run: Any, leader: Any) -> None:
    run("service", "create", "--name", "web", "--", "true")
    run("service", "create", "--name", "api", "--", "true")
    assert run("service", "scale", "web=3", "api=0").stdout == "web scaled to 3\napi scaled to 0\n"
    one_line_error(run("service", "scale", "web=1", "nope=2", code=None), "service nope not found")
    leader()
    assert len(json.loads(run("service", "ps", "web", "--format", "json").stdout)) == 3
    run("service", "update", "web", "--replicas", "1", "--env", "A=b", "--", "sleep", "5")
    spec = json.loads(run("service", "inspect", "web", "--format", "json").stdout)
    assert (spec["version"], spec["replicas"], spec["env"], spec["command"]) == (
        2, 1, {"A": "b"}, ["sleep", "5"]
    )  # fmt: skip
    run("service", "update", "web", "--health-tcp", "80")
    run("service", "update", "web", "--health-retries", "7")
    health = json.loads(run("service", "inspect", "web", "--format", "json").stdout)["health"]
    assert (health["kind"], health["port"], health["retries"]) == ("tcp", 80, 7)
    assert "nothing to update" in run("service", "update", "web", code=2).stderr
    assert run("service", "rm", "web").stdout == "web\n"
    names = [s["name"] for s in json.loads(run("service", "ls", "--format", "json").stdout)]
    assert names == ["api"]
    one_line_error(run("service", "ps", "web", code=None), "service web not found")


def test_logs_prefix_task_names_and_tail(run: Any, tmp_path: Path, leader: Any) -> None:
    run("service", "create", "--name", "web", "--replicas", "3", "--", "true")
    leader()
    tasks = json.loads(run("service", "ps", "web", "--format", "json").stdout)
    for task, text in zip(tasks, ["a\nb\nc\n", "x\npartial", None], strict=True):
        if text is not None:  # web.3 has written nothing yet: it prints nothing
            log = tmp_path / "tasks" / task["id"] / "log"
            log.parent.mkdir(parents=True)
            log.write_text(text)
    out = run("service", "logs", "web").stdout
    assert out == "web.1 | a\nweb.1 | b\nweb.1 | c\nweb.2 | x\n"
    assert run("service", "logs", "web", "--tail", "1").stdout == "web.1 | c\nweb.2 | x\n"
    assert run("service", "logs", "web.1", "--tail", "2").stdout == "b\nc\n"
    assert run("service", "logs", tasks[1]["id"]).stdout == "x\n"
    one_line_error(run("service", "logs", "nope", code=None), "no service or task named nope")


def test_without_detach_it_waits_for_a_live_controller(
    run: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with open_store(f"sqlite://{tmp_path}/state.db") as store:
        live = store.grant_lease(60)  # what a running controller keeps: its status, leased
        store.put(NODE, "node1", Node("node1").to_dict())
        store.put(NODE_STATUS, "node1", NodeStatus("node1").to_dict(), lease=live)
    monkeypatch.setattr(progress, "POLL_INTERVAL", 0.05)
    started = time.monotonic()
    create = ("service", "create", "--name", "web", "--replicas", "2", "--timeout", "0.3s")
    result = run(*create, "--", "true", code=1)
    assert time.monotonic() - started >= 0.3
    assert "web: 0/2 running" in result.stderr
    assert "web.1: new: no task made yet (is a leader running?)" in result.stderr
    assert result.stderr.endswith(
        "Error: web did not converge within 0.3s; see: meshctl service ps web\n"
    )
    detached = run("service", "create", "--name", "api", "-d", "--", "true")
    assert detached.stderr == ""


def test_store_errors_are_one_line(run: Any) -> None:
    one_line_error(run("--store", "etcd://x", "service", "ls", code=None), "cannot be reached")


def test_doctor_is_registered_and_loaded_only_when_run() -> None:
    assert "doctor" in main.commands
    assert "--format" in CliRunner().invoke(main, ["doctor", "--help"]).stdout


def test_node_rm_forgets_a_down_node_and_every_address_it_held(run: Any, tmp_path: Path) -> None:
    from meshctl import ipam
    from meshctl.commands.container import attach_container
    from meshctl.model import NETWORK, Network, from_record

    run("network", "create", "front")
    with open_store(f"sqlite://{tmp_path}/state.db") as store:
        store.put(NODE, "node1", Node("node1").to_dict())
        store.put(NODE_STATUS, "node1", NodeStatus("node1").to_dict(), lease=store.grant_lease(60))
        store.put(NODE, "node2", Node("node2").to_dict())  # down: no status under a lease
        front = from_record(Network, store.get(NETWORK, "front"))
        for node in ("node1", "node2"):
            ipam.allocate_lb_address(store, front, node)
            ipam.allocate_node_address(store, front, ipam.router_owner(node), f"router {node}")
        attach_container(store, "legacy", "/proc/self/ns/net", "front", "node2")

    def owners() -> set[str]:
        with open_store(f"sqlite://{tmp_path}/state.db") as store:
            return {str(r.value["owner"]) for r in store.list(ipam.ADDRESS)}

    held = owners()
    assert {"lb:node1", "lb:node2", "router:node1", "router:node2"} <= held
    one_line_error(run("node", "rm", "node1", code=1), "node node1 is not down")
    one_line_error(run("node", "rm", "ghost", code=1), "node ghost not found")
    assert owners() == held  # a refused rm changed nothing

    assert run("node", "rm", "node2").stdout == "node2\n"
    names = [n["name"] for n in json.loads(run("node", "ls", "--format", "json").stdout)]
    assert names == ["node1"]
    assert json.loads(run("container", "ls", "--format", "json").stdout) == []
    gone = {"lb:node2", "router:node2"} | {o for o in held if o.startswith("container:")}
    assert owners() == held - gone


def test_json_keys_are_the_documented_ones(run: Any, tmp_path: Path, leader: Any) -> None:
    """docs/cli-json.md is the contract: its examples have exactly the keys meshctl prints."""
    doc = (Path(__file__).parents[2] / "docs" / "cli-json.md").read_text()
    examples = [json.loads(block.split("```")[0]) for block in doc.split("```json\n")[1:]]
    network, services, service, tasks, nodes, containers, event, router, certificates = examples
    run("network", "create", "front", "--label", "team=web")
    run("service", "create", "--name", "web", "--network", "front:www", "--publish", "8000:80",
        "--health-http", "8080/healthz", "-d", "--", "true")  # fmt: skip
    leader()

    def printed(*args: str) -> Any:
        return json.loads(run(*args, "--format", "json").stdout)

    assert printed("network", "inspect", "front").keys() == network.keys()
    assert printed("network", "ls")[0].keys() == network.keys()
    assert printed("service", "ls")[0].keys() == services[0].keys()
    shown = printed("service", "inspect", "web")
    assert shown.keys() == service.keys()
    assert shown["health"].keys() == service["health"].keys()
    assert shown["networks"][0].keys() == service["networks"][0].keys()
    assert printed("service", "ps", "web")[0].keys() == tasks[0].keys()
    with open_store(f"sqlite://{tmp_path}/state.db") as store:  # attach needs a live namespace
        store.put(
            "container", "legacy", Container("legacy", "/run/netns/x", "front", "n1").to_dict()
        )
    assert printed("container", "ls")[0].keys() == containers[0].keys()
    with open_store(f"sqlite://{tmp_path}/state.db") as store:
        store.put(NODE, "node1", Node("node1", "10.99.0.11").to_dict())
        live = store.grant_lease(60)
        store.put(NODE_STATUS, "node1", NodeStatus("node1").to_dict(), lease=live)
        store.put(NODE, "node2", Node("node2").to_dict())
    shown_nodes = printed("node", "ls")
    assert [n.keys() for n in shown_nodes] == [nodes[0].keys()] * 2
    assert [n["state"] for n in shown_nodes] == ["ready", "down"]
    assert printed("node", "inspect", "node2").keys() == nodes[0].keys()
    from meshctl.events import MeshEvent

    assert MeshEvent(1, 1.0, "task", "failed", "web.1").to_dict().keys() == event.keys()
    run("service", "update", "web", "--hostname", "a.example.com", "-d")
    run("router", "enable")
    shown_router = printed("router", "inspect")
    assert shown_router.keys() == router.keys()
    assert shown_router["routes"][0].keys() == router["routes"][0].keys()
    with open_store(f"sqlite://{tmp_path}/state.db") as store:
        store.put("router-cert", "a.example.com", Certificate("a.example.com", "c", "k").to_dict())
    assert printed("router", "cert", "ls")[0].keys() == certificates[0].keys()


def _one_line(result: Any) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return str(lines[0])


def test_container_attach_refuses_bad_input_and_stores_nothing(run: Any, tmp_path: Path) -> None:
    run("network", "create", "front", "--subnet", "10.44.0.0/24")
    usage = run("container", "attach", "--name", "c", "--network", "front", code=2)
    assert "exactly one of --pid PID or --netns PATH" in usage.stderr
    missing = run("container", "attach", "--netns", str(tmp_path / "nope"), "--name", "c",
                  "--network", "front", "--node", "n1", code=1)  # fmt: skip
    assert "does not exist" in _one_line(missing)
    elsewhere = tmp_path / "ns"  # stands for another runtime's namespace: it exists
    elsewhere.touch()
    unknown = run("container", "attach", "--netns", str(elsewhere), "--name", "c",
                  "--network", "back", "--node", "n1", code=1)  # fmt: skip
    assert "network back not found" in _one_line(unknown)
    nodeless = run("container", "attach", "--netns", str(elsewhere), "--name", "c",
                   "--network", "front", code=1)  # fmt: skip
    assert "--node NAME" in _one_line(nodeless)
    assert json.loads(run("container", "ls", "--format", "json").stdout) == []
    assert "front" in run("network", "rm", "front").stdout  # no attachment held it


def test_diff_and_controller_refuse_bad_input_in_one_line(run: Any) -> None:
    assert "no controller has run as node" in _one_line(run("diff", "--node", "ghost", code=1))
    bad = run("controller", "run", "--node", "Bad_Name", code=1)
    assert "invalid --node" in _one_line(bad)
    period = run("controller", "run", "--resync-period", "soon", code=1)
    assert "--resync-period" in _one_line(period)
    assert "exec" in run("exec", "--help").stdout and run("exec", "web.1", code=2)


def test_the_routing_mesh_network_is_made_joined_and_left_as_ports_change(run: Any) -> None:
    run("network", "create", "front", "--subnet", "10.45.0.0/24")
    reserved = run("network", "create", "ingress", code=1)
    assert "reserved for the routing mesh" in _one_line(reserved)
    refused = run("service", "create", "--name", "x", "--network", "ingress", "-d", "--", "true",
                  code=1)  # fmt: skip
    assert "publish a port" in _one_line(refused)
    run("service", "create", "--name", "web", "--network", "front", "--publish", "8000:80",
        "-d", "--", "true")  # fmt: skip

    def networks() -> list[str]:
        spec = json.loads(run("service", "inspect", "web", "--format", "json").stdout)
        return [a["network"] for a in spec["networks"]]

    assert networks() == ["front", "ingress"]
    assert "ingress" in run("network", "ls").stdout
    run("service", "update", "web", "--replicas", "2", "-d")
    assert networks() == ["front", "ingress"]  # kept, with the same VIP
    run("service", "update", "web", "--publish", "mode=host,8000:80", "-d")
    assert networks() == ["front"]  # host mode does not go through the mesh
    refused = run("service", "update", "web", "--network", "ingress", "-d", code=1)
    assert "publish a port" in _one_line(refused)


def test_a_published_port_in_use_here_is_refused_at_create(run: Any) -> None:
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        run("network", "create", "front", "--subnet", "10.46.0.0/24")
        refused = run("service", "create", "--name", "web", "--network", "front",
                      "--publish", f"{port}:80", "-d", "--", "true", code=1)  # fmt: skip
        assert f"published port {port}/tcp is already in use" in _one_line(refused)
        assert json.loads(run("service", "ls", "--format", "json").stdout) == []
        run("service", "create", "--name", "web", "--network", "front",
            "--publish", f"{port}:80/udp", "-d", "--", "true")  # fmt: skip


# -- hardening (#14) --------------------------------------------------------------------------


def stored(tmp_path: Path) -> list[tuple[str, str, Any, int]]:
    """Every record of the store, with its revision: to show a refusal changed nothing."""
    if not (tmp_path / "state.db").exists():
        return []
    kinds = ["network", "ipam", "service", "task", "port", "node", "container"]
    with open_store(f"sqlite://{tmp_path}/state.db") as store:
        return [(r.kind, r.name, r.value, r.mod_revision) for k in kinds for r in store.list(k)]


def refused(result: Result, message: str, code: int = 1) -> None:
    """A one-line refusal (click's usage errors add a usage line and a hint) with no traceback."""
    assert result.exit_code == code, (result.stdout, result.stderr, result.exception)
    assert "Traceback" not in result.stdout + result.stderr
    assert message in result.stderr, result.stderr
    if code == 1:
        assert result.stderr.count("\n") == 1, result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["network", "create", "web\n"], "invalid network name 'web\\n'"),
        (["network", "create", "n", "--label", "team\n=a"], "invalid --label key"),
        (["service", "create", "--name", "web\n", "--", "true"], "invalid service name"),
        (["service", "create", "--name", "web", "--env", "A\n=1", "--", "true"], "--env key"),
        (["service", "create", "--name", "web", "--hostname", "a.com\n", "--", "true"],
         "invalid --hostname"),
        (["service", "create", "--name", "web", "--network", "front:www\n", "--", "true"],
         "invalid alias"),
        (["container", "attach", "--netns", "/run/netns/x", "--name", "c\n", "--network",
          "front", "--node", "n1"], "invalid container name"),
        (["container", "attach", "--netns", "/run/netns/x", "--name", "c", "--network",
          "front", "--node", "n1\n"], "invalid --node"),
        (["controller", "run", "--node", "node1\n"], "invalid --node"),
    ],
)  # fmt: skip
def test_names_with_a_trailing_newline_are_refused(
    run: Any, tmp_path: Path, args: list[str], message: str
) -> None:
    run("network", "create", "front", "--subnet", "10.47.0.0/24")
    before = stored(tmp_path)
    refused(run(*args, code=None), message)
    assert stored(tmp_path) == before
    assert "\n" not in "".join(n for _, n, _, _ in stored(tmp_path))


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["service", "scale", "api=--5"], 2, "write NAME=REPLICAS"),
        (["service", "scale", "api=²"], 2, "write NAME=REPLICAS"),
        (["service", "scale", "api=٣"], 2, "write NAME=REPLICAS"),
        (["service", "scale", "api=" + "9" * 5000], 2, "write NAME=REPLICAS"),
        (["service", "update", "api", "--publish", "²:80"], 1, "write PUBLISHED:TARGET"),
        (["service", "update", "api", "--health-http", "²/x"], 1, "write PORT/PATH"),
        (["service", "update", "api", "--replicas", "٣"], 2, "not a whole number in digits"),
        (["service", "update", "api", "--replicas", "+3"], 2, "not a whole number in digits"),
        (["service", "update", "api", "--health-tcp", "²"], 2, "not a whole number in digits"),
        (["service", "logs", "api", "--tail", "٣"], 2, "not a whole number in digits"),
        (["container", "attach", "--pid", "٣", "--name", "c", "--network", "front"], 2,
         "not a whole number in digits"),
        (["container", "attach", "--pid", "0", "--name", "c", "--network", "front"], 2,
         "0 is below 1"),
        (["service", "update", "api", "--health-interval", "9" * 400 + "h"], 1, "too long"),
    ],
)  # fmt: skip
def test_numbers_are_read_as_ascii_decimal_with_no_traceback(
    run: Any, tmp_path: Path, args: list[str], code: int, message: str
) -> None:
    run("network", "create", "front", "--subnet", "10.48.0.0/24")
    run("service", "create", "--name", "api", "-d", "--", "true")
    before = stored(tmp_path)
    refused(run(*args, code=None), message, code)
    assert stored(tmp_path) == before


def test_reserved_ranges_are_refused_from_every_source(
    run: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    refused(run("network", "create", "lo", "--subnet", "127.0.0.0/24", code=None),
            "overlaps 127.0.0.0/8 (loopback addresses)")  # fmt: skip
    refused(run("network", "create", "all", "--subnet", "0.0.0.0/0", code=None), "overlaps")
    monkeypatch.setenv("MESHCTL_ADDRESS_POOL", "169.254.0.0/16")
    refused(run("network", "create", "front", code=None), "link-local")
    monkeypatch.delenv("MESHCTL_ADDRESS_POOL")
    run("network", "create", "front")
    monkeypatch.setenv("MESHCTL_INGRESS_SUBNET", "224.1.0.0/16")
    before = stored(tmp_path)
    result = run("service", "create", "--name", "web", "--publish", "8000:80", "-d", "--",
                 "true", code=None)  # fmt: skip
    refused(result, "set MESHCTL_INGRESS_SUBNET to a free subnet")
    assert "multicast" in result.stderr
    assert stored(tmp_path) == before


def test_replicas_have_a_configurable_limit_checked_before_anything_is_built(
    run: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run("network", "create", "front", "--subnet", "10.49.0.0/16")
    started = time.monotonic()
    result = run("service", "create", "--name", "web", "--replicas", "100000", "--network",
                 "front", "--", "true", code=None)  # fmt: skip
    assert time.monotonic() - started < 2
    refused(result, "at most 1,000 per service; use fewer, or raise $MESHCTL_MAX_REPLICAS")
    assert "MESHCTL_MAX_REPLICAS" in run("service", "create", "--help").stdout
    monkeypatch.setenv("MESHCTL_MAX_REPLICAS", "3")
    run("service", "create", "--name", "web", "--replicas", "3", "-d", "--", "true")
    before = stored(tmp_path)
    refused(run("service", "scale", "web=4", code=None), "at most 3 per service")
    refused(run("service", "update", "web", "--replicas", "4", code=None), "at most 3")
    assert stored(tmp_path) == before
    monkeypatch.setenv("MESHCTL_MAX_REPLICAS", "lots")
    refused(run("service", "scale", "web=1", code=None), "invalid $MESHCTL_MAX_REPLICAS 'lots'")
    monkeypatch.setenv("MESHCTL_MAX_REPLICAS", "2000000")
    refused(run("service", "scale", "web=1", code=None), "from 1 to 1,000,000")
    assert stored(tmp_path) == before


def test_networks_have_limits_per_service_and_in_all(
    run: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    names = [f"n{i}" for i in range(17)]
    for name in names:
        run("network", "create", name)
    attach = [arg for name in names for arg in ("--network", name)]
    refused(run("service", "create", "--name", "web", *attach, "-d", "--", "true", code=None),
            "on 17 networks, at most 16")  # fmt: skip
    result = run("service", "create", "--name", "web", *attach[2:], "--publish", "80:80",
                 "-d", "--", "true", code=None)  # fmt: skip
    refused(result, "at most 16 are possible (a routing-mesh port adds the ingress network)")
    run("service", "create", "--name", "web", *attach[2:], "-d", "--", "true")
    monkeypatch.setenv("MESHCTL_MAX_NETWORKS", "17")
    before = stored(tmp_path)
    refused(
        run("network", "create", "one-more", code=None),
        "17 networks exist, the limit is 17; remove one, or raise $MESHCTL_MAX_NETWORKS",
    )
    assert stored(tmp_path) == before


def test_service_names_leave_room_for_the_slot_in_a_hostname(run: Any) -> None:
    refused(run("service", "create", "--name", "a" * 57, "--", "true", code=None),
            "use at most 56")  # fmt: skip
    run("service", "create", "--name", "a" * 56, "-d", "--", "true")


def test_host_mode_without_a_network_is_refused(run: Any, tmp_path: Path) -> None:
    for publish in ("mode=host,8000:80", "traffic=local,8000:80"):
        result = run("service", "create", "--name", "web", "--publish", publish, "-d", "--",
                     "true", code=None)  # fmt: skip
        refused(result, "add --network NAME")
    assert stored(tmp_path) == []


def test_container_attach_refuses_the_nodes_own_namespace_and_bad_pids(
    run: Any, tmp_path: Path
) -> None:
    import os

    run("network", "create", "front", "--subnet", "10.43.0.0/24")
    before = stored(tmp_path)
    link = tmp_path / "looks-foreign"
    link.symlink_to("/proc/self/ns/net")
    for args in (["--netns", "/proc/self/ns/net"], ["--netns", str(link)],
                 ["--pid", str(os.getpid())]):  # fmt: skip
        result = run("container", "attach", *args, "--name", "c", "--network", "front",
                     "--node", "n1", code=None)  # fmt: skip
        refused(result, "own network namespace; attaching it would put a mesh leg into the node")
    refused(run("container", "attach", "--netns", "/x", "--name", "c", "--network", "front",
                "--node", "Bad_Node", code=None), "invalid --node 'Bad_Node'")  # fmt: skip
    gone = run("container", "attach", "--pid", "4194304", "--name", "c", "--network", "front",
               "--node", "n1", code=None)  # fmt: skip
    refused(gone, "process 4194304 is not running")
    assert stored(tmp_path) == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--upstream-dns", "dns.example"], "invalid --upstream-dns"),
        (["--upstream-dns", "1.1.1.1:99999"], "invalid --upstream-dns"),
        (["--upstream-dns", "1.1.1.1:٥٣"], "invalid --upstream-dns"),
        (["--node", "Bad_Name"], "invalid --node"),
        (["--resync-period", "soon"], "--resync-period"),
        (["--resync-period", "0"], "use a duration above 0"),
        (["--metrics-addr", "localhost:9323"], "invalid --metrics-addr 'localhost:9323'"),
        (["--metrics-addr", "9323"], "invalid --metrics-addr"),
        (["--events-window", "0s"], "invalid --events-window"),
    ],
)
def test_controller_options_are_checked_before_the_store_is_touched(
    run: Any, tmp_path: Path, args: list[str], message: str
) -> None:
    refused(run("controller", "run", "--node", "node1", *args, code=None), message)
    assert not (tmp_path / "state.db").exists()


def test_a_corrupt_store_file_is_one_line_naming_it(run: Any, tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    db.write_bytes(bytes(range(256)) * 32)
    for args in (["service", "ls"], ["network", "create", "front"], ["container", "ls"]):
        refused(run(*args, code=None), f"store {db} is corrupt (file is not a database); "
                "move it aside and recreate the state, or restore a backup")  # fmt: skip


@pytest.mark.parametrize(
    ("value", "detail"),
    [
        ("{", "not JSON"),
        ('{"name": "web"}', "missing field 'command'"),
        ('{"name": "web", "command": ["true"], "id": "x", "replicas": "many"}', "invalid literal"),
        ("[1, 2]", "a JSON object was expected"),
        ("[" * 100_000, "not JSON"),
    ],
)
def test_a_corrupt_record_is_named_with_how_to_remove_it(
    run: Any, tmp_path: Path, value: str, detail: str
) -> None:
    import sqlite3

    run("service", "create", "--name", "web", "-d", "--", "true")
    run("service", "create", "--name", "api", "-d", "--", "true")
    db = sqlite3.connect(tmp_path / "state.db")
    with db:
        db.execute("UPDATE kv SET value = ? WHERE kind = 'service' AND name = 'web'", (value,))
    db.close()
    for args in (["service", "ls"], ["service", "inspect", "web"], ["service", "ps", "web"]):
        result = run(*args, code=None)
        refused(result, "service web: stored record is invalid (")
        assert detail in result.stderr
        assert result.stderr.rstrip().endswith("remove it with: meshctl store rm service web")
    assert run("service", "inspect", "api", "--format", "json").stdout  # the others still read
    assert run("store", "rm", "service", "web").stdout == "service web\n"
    assert [s["name"] for s in json.loads(run("service", "ls", "--format", "json").stdout)] == [
        "api"
    ]
    refused(run("store", "rm", "service", "web", code=None), "there is no record service web")


def test_logs_read_the_rotated_files_oldest_first(run: Any, tmp_path: Path, leader: Any) -> None:
    from meshctl import runtime

    run("service", "create", "--name", "web", "--", "true")
    leader()
    (task,) = json.loads(run("service", "ps", "web", "--format", "json").stdout)
    log = tmp_path / "tasks" / task["id"] / "log"
    log.parent.mkdir(parents=True)
    log.write_text("1\n2\n3\n")
    assert runtime.rotate_log(str(log), 4, 3)
    with open(log, "a") as f:
        f.write("4\n5\n6\n")
    assert runtime.rotate_log(str(log), 4, 3)
    with open(log, "a") as f:
        f.write("7\n8")  # a partial line waits for its end
    assert sorted(p.name for p in log.parent.iterdir()) == ["log", "log.1", "log.2"]
    assert run("service", "logs", "web").stdout == "".join(f"web.1 | {i}\n" for i in range(1, 8))
    assert run("service", "logs", "web.1", "--tail", "3").stdout == "5\n6\n7\n"


def test_logs_since_and_timestamps_follow_the_controllers_notes(
    run: Any, tmp_path: Path, leader: Any
) -> None:
    import os

    run("service", "create", "--name", "web", "--", "true")
    leader()
    (task,) = json.loads(run("service", "ps", "web", "--format", "json").stdout)
    log = tmp_path / "tasks" / task["id"] / "log"
    log.parent.mkdir(parents=True)
    log.write_text("old\nnew\nnewest\n")
    (tmp_path / "tasks" / task["id"] / "log.times").write_text("4 1000.5\n8 2000.25\n")
    os.utime(log, (3000.0, 3000.0))  # after the last note: the file's own time
    stamped = run("service", "logs", "web", "--timestamps").stdout.splitlines()
    assert stamped == [
        "1970-01-01T00:16:40.500000000Z web.1 | old",
        "1970-01-01T00:33:20.250000000Z web.1 | new",
        "1970-01-01T00:50:00.000000000Z web.1 | newest",
    ]
    assert run("service", "logs", "web.1", "--since", "1500").stdout == "new\nnewest\n"
    since = run("service", "logs", "web.1", "--since", "1970-01-01T00:40:00Z", "--tail", "5")
    assert since.stdout == "newest\n"
    one_line_error(run("service", "logs", "web", "--since", "soon", code=None), "invalid --since")


def test_controller_logs_as_json_lines() -> None:
    record = logging.LogRecord("meshctl.controller", logging.WARNING, "x", 1, "a %s", ("b",), None)
    record.created, record.msecs = 0.0, 0.0
    line = json.loads(JsonFormatter().format(record))
    assert line == {
        "time": "1970-01-01T00:00:00.000Z",
        "level": "warning",
        "logger": "meshctl.controller",
        "msg": "a b",
    }


def test_controller_health_says_why_when_no_controller_answers(run: Any) -> None:
    result = run("controller", "health", "--metrics-addr", "127.0.0.1:1", code=None)
    one_line_error(result, "unhealthy: no controller answers on http://127.0.0.1:1/healthz")


def test_a_bad_field_is_told_as_the_flag_that_set_it(run: Any, tmp_path: Path) -> None:
    """The model names fields (health.retries, labels); each command says its own flag."""
    refused(run("service", "create", "--name", "web", "--health-cmd", "true",
                "--health-retries", "-1", "--", "true", code=None),
            "invalid --health-retries -1: use a whole number, 0 or more")  # fmt: skip
    refused(run("network", "create", "front", "--label", "bad key=x", code=None),
            "invalid --label key 'bad key'")  # fmt: skip
    with open_store(f"sqlite://{tmp_path}/state.db") as store:
        store.put(NODE, "node1", Node("node1").to_dict())
    refused(run("node", "update", "node1", "--label-add", "bad key=x", code=None),
            "invalid --label-add key 'bad key'")  # fmt: skip
