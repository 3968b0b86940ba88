"""One bad object never stops the controller from serving the others, and a controller whose
passes fail says so (#14): through the CLI, on a real controller."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from meshctl.naming import task_netns
from meshctl.store import open_store
from tests.kernel.mesh import Mesh, ask, wait_for

# Not in the QEMU lane: a network with no LB address fails before any backend is asked, and a
# failing pass is the iptables tool's; VIPs on IPVS are test_service_discovery's.
pytestmark = pytest.mark.root


def _store(mesh: Mesh) -> str:
    return f"sqlite:///{mesh.state_dir}/state.db"


def test_a_network_without_an_lb_address_is_reported_and_the_others_converge(
    mesh: Mesh,
) -> None:
    """The case that stopped every network: a network with no address left for this node's
    load balancer (its last one taken by a stray claim, as a damaged store could have it)."""
    mesh.cli("network", "create", "full", "--subnet", "10.91.0.0/29")
    mesh.cli("network", "create", "fine", "--subnet", "10.92.0.0/24")
    full = json.loads(mesh.cli("network", "inspect", "full", "--format", "json").stdout)
    with open_store(_store(mesh)) as store:
        for last in range(2, 7):  # every host address but the gateway
            store.put(
                "address", f"{full['id']}/10.91.0.{last}", {"owner": "stray", "network": "full"}
            )
    mesh.cli("service", "create", "--name", "web", "--replicas", "2", "--network", "fine", "-d",
             "--", "socat", "TCP-LISTEN:80,reuseaddr,fork", "SYSTEM:hostname")  # fmt: skip
    mesh.cli("service", "create", "--name", "client", "--network", "fine", "-d", "--",
             "sleep", "3600")  # fmt: skip
    mesh.start_controller()
    mesh.wait_running("web", 2)
    (client,) = mesh.wait_running("client", 1)
    web = json.loads(mesh.cli("service", "inspect", "web", "--format", "json").stdout)
    vip, client_ns = web["networks"][0]["vip"], task_netns(client["id"])
    # The VIP answers once the load balancer has the tasks (a pass after they run).
    wait_for(lambda: ask(client_ns, vip, 80).startswith("web."), 10, "an answer through the VIP")
    nodes = json.loads(mesh.cli("node", "ls", "--format", "json").stdout)
    assert "network full (10.91.0.0/29) has no free address" in nodes[0]["errors"]["full"]
    assert "network full" in mesh.cli("node", "ls").stdout
    diff = mesh.diff()
    assert diff.returncode == 1
    assert "! network full fails on node node1: network full (10.91.0.0/29) has no free" in (
        diff.stdout
    )
    assert "fine" not in diff.stdout  # the other network converged
    assert "has no free address" in Path(mesh.controller_log).read_text()


def test_a_controller_whose_passes_fail_says_degraded_until_they_succeed(
    node_ns: str, tmp_path: Path
) -> None:
    """Every pass fails while the iptables tool refuses: node ls and service ps say why."""
    tools = tmp_path / "bin"
    tools.mkdir()
    broken = tmp_path / "broken"
    wrapper = tools / "iptables-legacy-restore"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'[ -e {broken} ] && {{ echo "iptables-legacy-restore: broken for the test" >&2; '
        "exit 1; }\n"
        'exec /usr/sbin/iptables-legacy-restore "$@"\n'
    )
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    mesh = Mesh(node_ns, str(tmp_path / "state"))
    mesh.env["PATH"] = f"{tools}:{os.environ['PATH']}"
    try:
        mesh.cli("network", "create", "front", "--subnet", "10.93.0.0/24")
        mesh.cli("service", "create", "--name", "web", "--network", "front", "-d", "--",
                 "sleep", "3600")  # fmt: skip
        broken.touch()
        mesh.start_controller()

        def degraded() -> str:
            nodes = json.loads(mesh.cli("node", "ls", "--format", "json").stdout)
            return str(nodes[0]["message"]) if nodes else "(no node yet)"

        message = wait_for(lambda: degraded().startswith("degraded: ") and degraded(), 30,
                           "the node to say it is degraded")  # fmt: skip
        assert "broken for the test" in message
        assert "degraded: " in mesh.cli("node", "ls").stdout

        def web_problem() -> str:
            """The web task's problem once it is placed ("" before), as service ps says it."""
            tasks = json.loads(mesh.cli("service", "ps", "web", "--format", "json").stdout)
            return str(tasks[0]["problem"]) if tasks and tasks[0]["node"] else ""

        # The leader places the task before the failing step of a pass, so it is placed while
        # its node is degraded, and service ps names the node's state as what keeps it back.
        problem = wait_for(
            lambda: web_problem().startswith("node node1 is degraded: ") and web_problem(),
            30,
            "service ps to say node1 is degraded",
        )
        assert "broken for the test" in problem
        broken.unlink()
        wait_for(lambda: degraded() == "", 30, "the degraded message to go")
        mesh.wait_running("web", 1)
    finally:
        mesh.close()
