"""kernel.ipvs against the fake and the real kernel: services, destinations, and real balancing.

The real-kernel cases need IPVS and are marked `ipvs`: where the kernel lacks it (as on the
development hosts) they skip with the reason `Ipvs.available()` gives, and the QEMU lane
(tests/vm/run) runs them in a kernel that has it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from kernel import netns
from kernel.errors import KernelError, NotFound
from kernel.ipvs import NO_IPVS, Destination, Ipvs, IpvsAPI, IpvsChange, VirtualService
from tests.conftest import NetnsFactory, scaled

# The conformance kernel fixture, with only its real-kernel case marked as needing IPVS so the
# fake runs everywhere and the QEMU lane (-m ipvs) picks the real one.
both = pytest.mark.parametrize(
    "kernel",
    [pytest.param("fake"), pytest.param("real", marks=[pytest.mark.root, pytest.mark.ipvs])],
    indirect=True,
)

WEB = VirtualService("10.10.0.2", 80, "tcp")


@pytest.fixture
def ns(kernel: Any) -> str:
    """A fresh namespace with loopback up: IPVS takes only destinations routable from it."""
    name: str = kernel.new_ns("ipvs")
    if kernel.world is None:  # the real kernel
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    return name


@pytest.fixture
def ipvs(kernel: Any, ns: str) -> IpvsAPI:
    """The backend under test; the real one skips, saying why, where the kernel has no IPVS."""
    backend: IpvsAPI = kernel.ipvs
    reason = backend.available(ns)
    if reason is not None:
        pytest.skip(f"IPVS unavailable: {reason}")
    return backend


@both
def test_service_lifecycle(ipvs: IpvsAPI, ns: str) -> None:
    assert ipvs.list_services(ns) == []
    ipvs.ensure_service(ns, WEB)
    ipvs.ensure_service(ns, WEB)
    assert ipvs.list_services(ns) == [WEB]

    # Same key, another scheduler: the service is edited, not duplicated.
    wrr = VirtualService("10.10.0.2", 80, "tcp", scheduler="wrr")
    ipvs.ensure_service(ns, wrr)
    assert ipvs.list_services(ns) == [wrr]

    ipvs.delete_service(ns, wrr)
    assert ipvs.list_services(ns) == []
    ipvs.delete_service(ns, wrr)  # already gone: nothing to do


@both
def test_every_kind_of_service_reads_back_equal(ipvs: IpvsAPI, ns: str) -> None:
    services = [
        WEB,
        VirtualService("10.10.0.2", 53, "udp"),
        VirtualService("10.10.0.3", 443, "tcp", scheduler="sh", timeout=300),
        VirtualService(fwmark=0x4001, scheduler="wrr"),
        VirtualService("fd00:10::2", 80, "tcp"),
    ]
    for svc in services:
        ipvs.ensure_service(ns, svc)
    assert sorted(ipvs.list_services(ns), key=repr) == sorted(services, key=repr)
    # Persistence shows as the persistent flag; a fwmark service has no address or port.
    assert services[2].flags == 1 and services[3].key == 0x4001 and services[3].address is None


@both
def test_destinations_lifecycle_and_snapshot(ipvs: IpvsAPI, ns: str) -> None:
    ipvs.ensure_service(ns, WEB)
    one, two = Destination("10.10.1.2", 8080), Destination("10.10.1.3", 8080, weight=2)
    ipvs.ensure_destination(ns, WEB, two)
    ipvs.ensure_destination(ns, WEB, one)
    ipvs.ensure_destination(ns, WEB, one)
    assert ipvs.list_destinations(ns, WEB) == [one, two]

    drained = Destination("10.10.1.2", 8080, weight=0)
    ipvs.ensure_destination(ns, WEB, drained)
    assert ipvs.list_destinations(ns, WEB) == [drained, two]

    dns = VirtualService("10.10.0.2", 53, "udp")
    ipvs.ensure_service(ns, dns)
    assert ipvs.snapshot(ns) == {WEB: [drained, two], dns: []}

    ipvs.delete_destination(ns, WEB, drained)
    ipvs.delete_destination(ns, WEB, drained)  # already gone
    ipvs.delete_destination(ns, dns, two)  # never there
    assert ipvs.list_destinations(ns, WEB) == [two]
    ipvs.delete_service(ns, WEB)
    assert ipvs.snapshot(ns) == {dns: []}

    v6, dest6 = VirtualService("fd00:10::2", 80, "tcp"), Destination("fd00:11::2", 8080)
    ipvs.ensure_service(ns, v6)
    ipvs.ensure_destination(ns, v6, dest6)
    assert ipvs.list_destinations(ns, v6) == [dest6]


@both
def test_a_batch_applies_in_order_and_again_changes_nothing(ipvs: IpvsAPI, ns: str) -> None:
    mark = VirtualService(fwmark=0x4D000002)
    one, two = Destination("10.10.1.2", 0), Destination("10.10.1.3", 0)
    build = IpvsChange(
        ensure_services=(WEB, mark),
        ensure_destinations=((WEB, one), (mark, one), (mark, two)),
    )
    ipvs.apply(ns, build)
    ipvs.apply(ns, build)
    assert ipvs.snapshot(ns) == {WEB: [one], mark: [one, two]}

    drained = Destination("10.10.1.3", 0, weight=0)
    ipvs.apply(
        ns,
        IpvsChange(
            ensure_destinations=((mark, drained),),
            delete_destinations=((mark, one), (WEB, two)),  # the second was never there
            delete_services=(WEB,),
        ),
    )
    assert ipvs.snapshot(ns) == {mark: [drained]}
    with pytest.raises(NotFound):  # a destination of a missing service, as the single verb
        ipvs.apply(ns, IpvsChange(ensure_destinations=((WEB, one),)))


def backends(count: int, port: int = 8080) -> list[Destination]:
    """count destinations in 10.10.2.0/23, in the order listings give (by address text)."""
    made = [Destination(f"10.10.{2 + i // 250}.{i % 250 + 1}", port) for i in range(count)]
    return sorted(made, key=lambda dest: dest.key)


@both
def test_a_batch_larger_than_a_write(ipvs: IpvsAPI, ns: str) -> None:
    """30 services x 10 destinations: more requests than one write holds (BATCH_SIZE), with
    entries there before (edited to what is asked) and deletes of entries never there."""
    services = [VirtualService(f"10.10.0.{i + 2}", 80) for i in range(30)]
    dests = {svc: backends(10 * (i + 1))[10 * i :] for i, svc in enumerate(services)}
    ipvs.ensure_service(ns, VirtualService("10.10.0.2", 80, scheduler="wrr"))
    ipvs.ensure_destination(ns, services[0], Destination(dests[services[0]][3].address, 8080, 5))
    ipvs.ensure_service(ns, services[17])
    ipvs.ensure_destination(ns, services[17], dests[services[17]][9])
    build = IpvsChange(
        ensure_services=tuple(services),
        ensure_destinations=tuple((svc, dest) for svc in services for dest in dests[svc]),
    )
    ipvs.apply(ns, build)
    assert ipvs.snapshot(ns) == dests
    ipvs.apply(ns, build)  # all there: changes nothing
    assert ipvs.snapshot(ns) == dests

    # Half the destinations of every service, 40 never there, 20 services, 5 never there.
    never = [VirtualService(f"10.10.1.{i}", 443) for i in range(5)]
    ipvs.apply(
        ns,
        IpvsChange(
            delete_destinations=(
                *((svc, dest) for svc in services for dest in dests[svc][::2]),
                *((svc, dest) for svc in services[:4] for dest in backends(10, port=9)),
            ),
            delete_services=(*services[10:], *never),
        ),
    )
    assert ipvs.snapshot(ns) == {svc: dests[svc][1::2] for svc in services[:10]}


@pytest.mark.parametrize(
    "kernel", [pytest.param("real", marks=[pytest.mark.root, pytest.mark.ipvs])], indirect=True
)
def test_a_failure_deep_in_a_batch_names_its_destination(ipvs: IpvsAPI, ns: str) -> None:
    """The kernel refuses a multicast destination, the 281st of 300: the error names it and
    says what to do, and the destinations before it are made."""
    dests = backends(300)
    dests[280] = Destination("224.0.0.1", 8080)
    with pytest.raises(KernelError, match=r"IPVS destination \('224.0.0.1', 8080\).*unicast"):
        ipvs.apply(
            ns,
            IpvsChange(ensure_services=(WEB,), ensure_destinations=tuple((WEB, d) for d in dests)),
        )
    assert set(dests[:280]) <= set(ipvs.list_destinations(ns, WEB))


@both
def test_destination_of_a_missing_service(ipvs: IpvsAPI, ns: str) -> None:
    dest = Destination("10.10.1.2", 8080)
    with pytest.raises(NotFound):
        ipvs.ensure_destination(ns, WEB, dest)
    assert ipvs.list_destinations(ns, WEB) == []
    ipvs.delete_destination(ns, WEB, dest)  # nothing to delete: no error
    assert ipvs.list_services(ns) == []


@both
def test_namespaces_are_separate(kernel: Any, ipvs: IpvsAPI, ns: str) -> None:
    other = kernel.new_ns("ipvs")
    ipvs.ensure_service(ns, WEB)
    assert ipvs.list_services(other) == []
    ipvs.delete_service(other, WEB)
    assert ipvs.list_services(ns) == [WEB]


@both
def test_missing_namespace_is_not_found(ipvs: IpvsAPI) -> None:
    with pytest.raises(NotFound):
        ipvs.list_services("meshctl-no-such-ns")


def test_invalid_records_are_refused() -> None:
    with pytest.raises(ValueError, match="address and a port"):
        VirtualService("10.0.0.1", 0, "tcp")
    with pytest.raises(ValueError, match="protocol"):
        VirtualService("10.0.0.1", 80, "sctp")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="forward"):
        Destination("10.0.0.1", 80, forward="bridge")  # type: ignore[arg-type]


# ---- real kernel only ------------------------------------------------------------------


@pytest.mark.root
def test_available_names_what_the_kernel_lacks(node_ns: str) -> None:
    """Runs on every host: IPVS present means None, absent means the one-line reason."""
    expected = None if os.path.exists("/sys/module/ip_vs") else NO_IPVS
    assert Ipvs().available(node_ns) == expected


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True)


def link(
    left: str, left_dev: str, left_addr: str, right: str, right_dev: str, right_addr: str
) -> None:
    """A veth between two test namespaces, made inside them, addressed /24 and up."""
    ip(
        "-n",
        left,
        "link",
        "add",
        left_dev,
        "type",
        "veth",
        "peer",
        "name",
        right_dev,
        "netns",
        right,
    )
    for ns, dev, addr in ((left, left_dev, left_addr), (right, right_dev, right_addr)):
        ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
        ip("-n", ns, "link", "set", dev, "up")
        ip("-n", ns, "link", "set", "lo", "up")


def fetch(host: str, port: int) -> str:
    with socket.create_connection((host, port), timeout=scaled(3)) as conn:
        chunks = []
        while data := conn.recv(100):
            chunks.append(data)
    return b"".join(chunks).decode().strip()


@pytest.fixture
def lb_world(netns_factory: NetnsFactory) -> Iterator[tuple[str, str]]:
    """client ─ lb ─ b1, b2: classic LVS-NAT, each backend answering its name on :8080.

    Backends route back through lb, which forwards and un-NATs the replies.
    """
    client, lb, b1, b2 = (netns_factory(tag) for tag in ("cli", "lb", "b1", "b2"))
    link(client, "mtc0", "10.77.3.2", lb, "mtl0", "10.77.3.1")
    link(lb, "mtl1", "10.77.1.1", b1, "mtb0", "10.77.1.2")
    link(lb, "mtl2", "10.77.2.1", b2, "mtb0", "10.77.2.2")
    ip("-n", client, "route", "add", "default", "via", "10.77.3.1")
    ip("-n", b1, "route", "add", "default", "via", "10.77.1.1")
    ip("-n", b2, "route", "add", "default", "via", "10.77.2.1")
    subprocess.run(
        ["ip", "netns", "exec", lb, "sysctl", "-qw", "net.ipv4.ip_forward=1"], check=True
    )
    servers = [
        subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                ns,
                "socat",
                "TCP-LISTEN:8080,fork,reuseaddr",
                f"SYSTEM:echo {ns}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for ns in (b1, b2)
    ]
    try:
        for ns in (b1, b2):
            deadline = time.monotonic() + scaled(5)
            while True:
                try:
                    assert netns.run_in(ns, fetch, "127.0.0.1", 8080) == ns
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        yield client, lb
    finally:
        for proc in servers:
            proc.kill()
            proc.wait()


@pytest.mark.root
@pytest.mark.ipvs
def test_round_robin_over_two_masquerade_destinations(
    node_ns: str, lb_world: tuple[str, str]
) -> None:
    real = Ipvs()
    reason = real.available(node_ns)
    if reason is not None:
        pytest.skip(f"IPVS unavailable: {reason}")
    client, lb = lb_world
    vip = VirtualService("10.77.3.1", 80, "tcp")
    real.ensure_service(lb, vip)
    for backend in ("10.77.1.2", "10.77.2.2"):
        real.ensure_destination(lb, vip, Destination(backend, 8080))
    answers = [netns.run_in(client, fetch, "10.77.3.1", 80) for _ in range(20)]
    counts = Counter(answers)
    assert sorted(counts.values()) == [10, 10] and len(counts) == 2, counts
    # Round robin alternates, connection by connection.
    assert all(a != b for a, b in zip(answers, answers[1:], strict=False)), answers
