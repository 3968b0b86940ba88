"""`meshctl diff` and `controller run` plan with the same reconcilers, built by one factory.

A node drifts while its controller is stopped (a bridge loses its address, a task its leg,
the load balancer a VIP); then `meshctl diff`'s lines must be exactly the describe() of what
the reconcilers a controller builds for that node plan next, and the restarted controller
repairs all of it.
"""

from __future__ import annotations

import json

import pytest

from kernel import netns
from kernel.system import real_kernel
from meshctl import naming
from meshctl.controller.daemon import Controller
from meshctl.controller.diff import describe_plans, diff_context
from meshctl.model import NODE, Node, from_record
from meshctl.store import open_store
from meshctl.view import read_view
from tests.kernel.mesh import LB_BACKEND, Mesh

# Not in the QEMU lane: its drift (a bridge's address, a task's leg, a VIP's address in the LB
# namespace) and the plan lines it compares are the same whatever the LB backend; drift of the
# backend's own objects (an IPVS service) is test_service_discovery's drift test's.
pytestmark = pytest.mark.root


def _controllers_next_plan(mesh: Mesh) -> list[str]:
    """In the node: a controller for it, as `controller run` builds one (it joins, then gives
    the node back), and the lines of what its reconcilers plan from a full observe, with what
    the stopped controller left (its tasks' DNS ports)."""
    store = open_store(f"sqlite:///{mesh.state_dir}/state.db")
    try:
        record = store.get(NODE, mesh.node_name)
        assert record is not None
        node = from_record(Node, record)
        controller = Controller(
            store, real_kernel(), Node(mesh.node_name, address=node.address), mesh.state_dir,
            lb_backend=LB_BACKEND,
        )  # fmt: skip
        store.revoke_lease(controller.membership.lease)  # its status goes: the node is free
        view = read_view(store)
        return describe_plans(controller.parts, view, diff_context(view, node, mesh.state_dir))
    finally:
        store.close()


def test_diff_prints_what_the_controllers_next_plan_changes(mesh: Mesh) -> None:
    mesh.cli("network", "create", "front", "--subnet", "10.58.0.0/24")
    mesh.cli("service", "create", "--name", "web", "--network", "front", "--replicas", "2",
             "--detach", "--", "sleep", "infinity")  # fmt: skip
    mesh.start_controller()
    web1, _ = sorted(mesh.wait_running("web", 2), key=lambda t: t["slot"])
    mesh.wait_converged()
    mesh.stop_controller()

    network = json.loads(mesh.cli("network", "inspect", "front", "--format", "json").stdout)
    service = json.loads(mesh.cli("service", "inspect", "web", "--format", "json").stdout)
    node_id = mesh.node_id()
    assert node_id is not None
    bridge = naming.bridge(network["id"])
    lb_ns = naming.lb_netns(node_id, network["id"])
    (vip,) = [n["vip"] for n in service["networks"] if n["network"] == "front"]
    drift = [
        ["ip", "addr", "flush", "dev", bridge],
        ["ip", "link", "del", naming.task_veth(web1["id"], 0)],
        ["ip", "netns", "exec", lb_ns, "ip", "addr", "del", f"{vip}/32", "dev", "eth0"],
    ]
    for argv in drift:
        done = mesh.in_node(*argv)
        assert done.returncode == 0, done.stderr

    shown = mesh.diff()
    assert shown.returncode == 1, shown.stderr
    lines = shown.stdout.splitlines()
    assert any(line.startswith(f"~ bridge {bridge} ") for line in lines), lines
    assert f"~ task namespace {naming.task_netns(web1['id'])} (1 legs)" in lines, lines
    assert f"+ {lb_ns}: address {vip}/32" in lines, lines
    assert lines == netns.run_in(mesh.node_ns, _controllers_next_plan, mesh)

    mesh.start_controller()
    mesh.wait_converged(what="the restarted controller to repair the drift")
