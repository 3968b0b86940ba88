"""The lane's own proof that the kernel balances: real IPVS TCP services between namespaces.

Services are programmed through kernel.ipvs, and Debian's ipvsadm checks that the kernel holds
exactly what kernel.ipvs believes it programmed (its snapshot).
"""

from __future__ import annotations

import subprocess
from collections import Counter
from dataclasses import dataclass

import pytest

from kernel import netns
from kernel.ipvs import Destination, Ipvs, VirtualService
from tests.conftest import tcp_read
from tests.vm.conftest import BACKEND_PORT, VIP, VIP_PORT, IpvsWorld

pytestmark = [pytest.mark.root, pytest.mark.ipvs]

# ipvsadm's names for the forwarding methods.
IPVSADM_FORWARD = {"masq": "Masq", "local": "Local", "tunnel": "Tunnel", "route": "Route"}


@dataclass(frozen=True)
class IpvsadmService:
    """One virtual service as `ipvsadm -Ln` shows it: what a user would read."""

    service: str  # "TCP 10.98.0.100:80"
    scheduler: str
    persistent: int  # seconds, 0 when not persistent
    dests: frozenset[tuple[str, str, int]]  # (address:port, forward method, weight)


def ipvsadm(ns: str) -> list[IpvsadmService]:
    """Parse `ipvsadm -Ln` run inside ns."""
    out = subprocess.run(
        ["ip", "netns", "exec", ns, "ipvsadm", "-Ln"], capture_output=True, text=True, check=True
    ).stdout
    found: list[IpvsadmService] = []
    for line in out.splitlines():
        fields = line.split()
        if fields[:1] in (["TCP"], ["UDP"], ["FWM"]):
            persistent = (
                int(fields[fields.index("persistent") + 1]) if "persistent" in fields else 0
            )
            svc = IpvsadmService(f"{fields[0]} {fields[1]}", fields[2], persistent, frozenset())
            found.append(svc)
        elif fields[:1] == ["->"] and fields[1] != "RemoteAddress:Port":
            last = found[-1]
            dest = (fields[1], fields[2], int(fields[3]))
            found[-1] = IpvsadmService(
                last.service, last.scheduler, last.persistent, last.dests | {dest}
            )
    return found


def as_ipvsadm_shows(snapshot: dict[VirtualService, list[Destination]]) -> list[IpvsadmService]:
    """kernel.ipvs's snapshot in ipvsadm's terms, to compare the two views."""
    return [
        IpvsadmService(
            service=f"{svc.protocol.upper()} {svc.address}:{svc.port}",
            scheduler=svc.scheduler,
            persistent=svc.timeout,
            dests=frozenset(
                (f"{d.address}:{d.port}", IPVSADM_FORWARD[d.forward], d.weight) for d in dests
            ),
        )
        for svc, dests in snapshot.items()
    ]


def program(lb: str, svc: VirtualService, weights: dict[str, int]) -> None:
    """Ensure svc with one masquerade destination per backend address, at its weight."""
    ipvs = Ipvs()
    ipvs.ensure_service(lb, svc)
    for addr, weight in weights.items():
        ipvs.ensure_destination(lb, svc, Destination(addr, BACKEND_PORT, weight=weight))


def test_ipvs_round_robin_balances_tcp_between_two_namespaces(ipvs_world: IpvsWorld) -> None:
    svc = VirtualService(VIP, VIP_PORT, scheduler="rr")
    program(ipvs_world.lb, svc, {b.addr: 1 for b in ipvs_world.backends})

    answers = [netns.run_in(ipvs_world.client, tcp_read, VIP, VIP_PORT) for _ in range(6)]

    assert Counter(answers) == {"backend1": 3, "backend2": 3}, answers


def test_weight_zero_drains_a_backend(ipvs_world: IpvsWorld) -> None:
    first, second = ipvs_world.backends
    svc = VirtualService(VIP, VIP_PORT, scheduler="wrr")
    # Weight 0 is how meshctl drains a task: no new connections reach it.
    program(ipvs_world.lb, svc, {first.addr: 1, second.addr: 0})

    answers = {netns.run_in(ipvs_world.client, tcp_read, VIP, VIP_PORT) for _ in range(4)}

    assert answers == {first.name}


def test_ipvsadm_shows_what_kernel_ipvs_programmed(ipvs_world: IpvsWorld) -> None:
    first, second = ipvs_world.backends
    web = VirtualService(VIP, VIP_PORT, scheduler="wrr")
    dns = VirtualService(VIP, 53, protocol="udp", scheduler="sh", timeout=300)
    program(ipvs_world.lb, web, {first.addr: 1, second.addr: 3})
    program(ipvs_world.lb, dns, {first.addr: 2})

    believed = Ipvs().snapshot(ipvs_world.lb)

    # kernel.ipvs reads back what it was asked for, and ipvsadm shows the same.
    assert believed == {
        web: [Destination(first.addr, BACKEND_PORT, 1), Destination(second.addr, BACKEND_PORT, 3)],
        dns: [Destination(first.addr, BACKEND_PORT, 2)],
    }
    shown = ipvsadm(ipvs_world.lb)
    assert sorted(shown, key=repr) == sorted(as_ipvsadm_shows(believed), key=repr)
    assert {s.service for s in shown} == {f"TCP {VIP}:{VIP_PORT}", f"UDP {VIP}:53"}
    # IPVS tables are per namespace: the client's is empty.
    assert ipvsadm(ipvs_world.client) == []
