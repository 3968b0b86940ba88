"""Sysctl against the fake and the real kernel: values are per namespace."""

from __future__ import annotations

import pytest

from kernel.errors import KernelError, NotFound
from kernel.fake.sysctl import IPVS_DEFAULTS, FakeSysctl
from kernel.fake.world import FakeWorld
from tests.conformance.conftest import KernelUnderTest

FORWARD = "net.ipv4.ip_forward"


def test_a_fresh_namespace_has_the_defaults(kernel: KernelUnderTest) -> None:
    ns = kernel.new_ns("defaults")
    assert kernel.sysctl.get(ns, FORWARD) == "0"
    assert kernel.sysctl.get(ns, "net.ipv4.conf.all.rp_filter") == "0"
    assert kernel.sysctl.get(ns, "net.ipv4.conf.lo.route_localnet") == "0"
    assert kernel.sysctl.get(ns, "net.ipv4.ip_local_port_range") == "32768\t60999"


def test_set_changes_only_the_target_namespace(kernel: KernelUnderTest) -> None:
    ns, other = kernel.new_ns("fwd"), kernel.new_ns("other")
    # The node's value is only read, never written: on the real kernel it is the host's.
    node_before = kernel.sysctl.get(None, FORWARD)
    kernel.sysctl.set(ns, FORWARD, "1")
    assert kernel.sysctl.get(ns, FORWARD) == "1"
    assert kernel.sysctl.get(other, FORWARD) == "0"
    assert kernel.sysctl.get(None, FORWARD) == node_before
    kernel.sysctl.set(ns, FORWARD, "0")
    assert kernel.sysctl.get(ns, FORWARD) == "0"


def test_ip_forward_switches_every_interface(kernel: KernelUnderTest) -> None:
    ns = kernel.new_ns("all")
    kernel.links.ensure_bridge(ns, "meshbr0")
    kernel.sysctl.set(ns, "net.ipv4.conf.all.forwarding", "1")
    assert kernel.sysctl.get(ns, FORWARD) == "1"
    assert kernel.sysctl.get(ns, "net.ipv4.conf.meshbr0.forwarding") == "1"


def test_interface_keys_live_with_the_interface(kernel: KernelUnderTest) -> None:
    ns = kernel.new_ns("perif")
    key = "net.ipv4.conf.meshbr0.route_localnet"
    with pytest.raises(NotFound, match=key):
        kernel.sysctl.get(ns, key)
    kernel.links.ensure_bridge(ns, "meshbr0")
    kernel.sysctl.set(ns, key, "1")
    assert kernel.sysctl.get(ns, key) == "1"
    assert kernel.sysctl.get(ns, "net.ipv4.conf.lo.route_localnet") == "0"
    kernel.links.delete_link(ns, "meshbr0")
    kernel.links.ensure_bridge(ns, "meshbr0")
    assert kernel.sysctl.get(ns, key) == "0"  # a new link starts afresh


def test_unknown_keys_and_bad_values(kernel: KernelUnderTest) -> None:
    ns = kernel.new_ns("bad")
    with pytest.raises(NotFound, match="sysctl net.ipv4.no_such_thing does not exist"):
        kernel.sysctl.get(ns, "net.ipv4.no_such_thing")
    with pytest.raises(NotFound):
        kernel.sysctl.set(ns, "net.ipv4.no_such_thing", "1")
    with pytest.raises(KernelError) as bad:
        kernel.sysctl.set(ns, FORWARD, "yes")
    assert bad.value.code == 22  # EINVAL
    assert kernel.sysctl.get(ns, FORWARD) == "0"


@pytest.mark.parametrize(
    "kernel",
    [pytest.param("fake"), pytest.param("real", marks=[pytest.mark.root, pytest.mark.ipvs])],
    indirect=True,
)
def test_ipvs_keys_exist_only_with_ipvs(kernel: KernelUnderTest) -> None:
    """net.ipv4.vs.* exist exactly where IPVS answers, with a fresh namespace's values: the
    fake's IPVS_DEFAULTS, so the fake's IPVS kernel is this one. The real case runs on the host
    (no IPVS: every key NotFound) and, marked ipvs, in the QEMU lane's kernel (every key there)."""
    ns = kernel.new_ns("vs")
    has_ipvs = kernel.ipvs.available(ns) is None  # the first IPVS request loads its module
    found = {}
    for key in IPVS_DEFAULTS:
        try:
            found[key] = kernel.sysctl.get(ns, key)
        except NotFound:
            continue
    assert found == (IPVS_DEFAULTS if has_ipvs else {}), f"IPVS available: {has_ipvs}"


def test_fake_without_ipvs_has_no_vs_keys() -> None:
    sysctl = FakeSysctl(FakeWorld())
    for key in IPVS_DEFAULTS:
        with pytest.raises(NotFound, match=key):
            sysctl.get(None, key)


def test_fake_with_ipvs_has_its_keys() -> None:
    sysctl = FakeSysctl(FakeWorld(), ipvs=True)
    sysctl.set(None, "net.ipv4.vs.conntrack", "1")
    assert sysctl.get(None, "net.ipv4.vs.conntrack") == "1"
