"""Attached namespaces on a real kernel: a PID that no longer names the attached process is
never wired (#14), and the node's own namespace is refused."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from meshctl.runtime import read_start_time
from meshctl.store import open_store
from tests.kernel.mesh import Mesh, wait_for

# Not in the QEMU lane: attaching wires a veth to the bridge, the same whatever the LB backend.
pytestmark = pytest.mark.root


def test_a_pid_that_names_another_process_now_is_never_wired(mesh: Mesh) -> None:
    mesh.cli("network", "create", "front", "--subnet", "10.59.0.0/24")
    # This test's own process shares the CLI's namespace (the host's): refused. Tried before
    # the controller runs, so a regression cannot wire a leg into the host.
    own = mesh.cli("container", "attach", "--pid", str(os.getpid()), "--name", "own",
                   "--network", "front", "--node", mesh.node_name, check=False)  # fmt: skip
    if own.returncode == 0:
        mesh.cli("container", "detach", "own")
    assert own.returncode == 1 and "meshctl's own network namespace" in own.stderr
    mesh.start_controller()
    wait_for(mesh.node_id, 15, "the node's record")
    holder = subprocess.Popen(["unshare", "--net", "sleep", "300"])
    try:
        wait_for(
            lambda: os.readlink(f"/proc/{holder.pid}/ns/net") != os.readlink("/proc/self/ns/net"),
            5,
            "unshare",
        )
        ns = f"/proc/{holder.pid}/ns/net"
        out = mesh.cli("container", "attach", "--pid", str(holder.pid), "--name", "legacy",
                       "--network", "front", "--format", "json").stdout  # fmt: skip
        attached = json.loads(out)
        assert attached["start_time"] == read_start_time(holder.pid)

        def wired() -> bool:
            links = subprocess.run(["nsenter", f"--net={ns}", "ip", "-4", "-o", "addr"],
                                   capture_output=True, text=True).stdout  # fmt: skip
            node = mesh.in_node("ip", "-o", "link").stdout
            return attached["address"] in links and "meshc" in node

        wait_for(wired, 15, "the attached leg")
        # As if the process had ended and its PID been given to a later one: the recorded start
        # time no longer matches. The leg goes, and nothing is wired there again.
        with open_store(f"sqlite://{mesh.state_dir}/state.db") as store:
            record = store.get("container", "legacy")
            assert record is not None
            stale = {**record.value, "start_time": attached["start_time"] + 1}
            store.put("container", "legacy", stale, expect=record.mod_revision)
        wait_for(lambda: not wired(), 15, "the leg removed")
        mesh.cli("container", "detach", "legacy")
    finally:
        holder.kill()
        holder.wait()
