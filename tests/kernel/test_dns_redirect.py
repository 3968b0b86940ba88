"""127.0.0.11 inside a task, through a whole controller: where nftables runs, a stateless port
rewrite (no conntrack entry per query) that leaves the task's own server on :53 working; else
the nat redirect."""

from __future__ import annotations

import json

import pytest

from kernel.nftables import Nftables
from tests.conftest import scaled
from tests.kernel.mesh import Mesh

# In the QEMU lane too: the task DNS redirect is the other half of the node's Dataplane, chosen
# beside the LB backend (meshctl.controller.dataplane).
pytestmark = [pytest.mark.root, pytest.mark.ipvs]

# The task's own DNS-port server: answers any datagram to port 53 with "own".
OWN_SERVER = ["socat", "UDP-RECVFROM:53,fork", "SYSTEM:echo own"]


def conntrack_count(mesh: Mesh, task_id: str) -> int:
    out = mesh.in_task(task_id, "cat", "/proc/sys/net/netfilter/nf_conntrack_count").stdout
    return int(out.strip() or 0)


def test_queries_through_127_0_0_11_cost_no_conntrack_entry_and_the_tasks_own_53_works(
    mesh: Mesh,
) -> None:
    if Nftables().available(None) is not None:
        pytest.skip("no nftables here: tasks use the nat redirect")
    mesh.cli("network", "create", "front", "--subnet", "10.73.0.0/24")
    mesh.cli("service", "create", "--name", "web", "--network", "front", "--detach",
             "--", *OWN_SERVER)  # fmt: skip
    mesh.start_controller()
    (task,) = mesh.wait_running("web", 1)
    mesh.wait_converged()
    vip = json.loads(mesh.cli("service", "inspect", "web", "--format", "json").stdout)["networks"][
        0
    ]["vip"]

    assert mesh.dig(task, "web") == [vip]  # through 127.0.0.11:53, as resolv.conf says
    before = conntrack_count(mesh, task["id"])
    for _ in range(5):
        assert mesh.dig(task, "web") == [vip]
    assert mesh.dig(task, "+tcp", "@127.0.0.11", "web") == [vip]
    assert conntrack_count(mesh, task["id"]) == before  # no entry per query, UDP or TCP
    # The task's own server on :53 answers what is not sent to 127.0.0.11.
    # socat -t: how long it waits for the answer once its input ended (0.5 s by default, less
    # than a forked answer can take on a loaded machine).
    wait = f"-t{scaled(5):g} -T{scaled(5):g}"
    own = mesh.in_task(task["id"], "sh", "-c", f"echo x | socat {wait} - UDP:127.0.0.1:53")
    assert own.stdout.strip() == "own"
    # Its rewrite is the task's own nftables table, and no nat rule is left for DNS.
    listed = mesh.in_task(task["id"], "nft", "list", "table", "ip", "meshctl").stdout
    assert "notrack" in listed and "dport set" in listed
    nat = mesh.in_task(task["id"], "iptables-legacy-save", "-t", "nat").stdout
    assert "MESH-DNS" not in nat
