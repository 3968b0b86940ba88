"""The conformance fixture: one `kernel` per test, the fake and the real one, same verbs.

Every conformance test takes `kernel` and runs twice, so the fake cannot drift from the truth.
Every subsystem is imported outright: one that fails to import fails the tests, never skips them.
The fake models a kernel with IPVS (FakeIpvs answers), so its sysctl has net.ipv4.vs.* too.
Real-kernel tests never act in the node's namespace (ns=None): they make theirs with new_ns().
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.conftest import NetnsFactory


@dataclass
class KernelUnderTest:
    """One kernel, fake or real, with each subsystem's implementation of its protocol."""

    name: str  # "fake" or "real"
    netns: Any  # kernel.netns.Netns or kernel.fake.world.FakeNetns
    links: Any  # kernel.links.LinksAPI
    neighbours: Any  # kernel.neighbours.NeighboursAPI
    sysctl: Any  # kernel.sysctl.SysctlAPI
    iptables: Any  # kernel.iptables.IptablesAPI
    ipvs: Any  # kernel.ipvs.IpvsAPI
    nftables: Any  # kernel.nftables.NftablesAPI
    conntrack: Any  # kernel.conntrack.ConntrackAPI
    system: Any  # kernel.system.Kernel over these same subsystems, for what takes a whole kernel
    world: Any | None  # kernel.fake.world.FakeWorld for the fake, None for the real kernel
    new_ns: Callable[[str], str]  # a fresh namespace in this kernel, removed after the test

    @property
    def is_fake(self) -> bool:
        return self.world is not None


def _fake_kernel() -> KernelUnderTest:
    from kernel.fake.world import FakeNetns
    from kernel.system import fake_kernel

    system = fake_kernel()  # one world: the model of a kernel with IPVS
    fake_netns = system.netns
    assert isinstance(fake_netns, FakeNetns)
    world = fake_netns.world
    counter = iter(range(1_000_000))

    def new_ns(tag: str) -> str:
        name = f"fake-{tag}{next(counter)}"
        fake_netns.create(name)
        return name

    return _under_test("fake", system, world, new_ns)


def _real_kernel(netns_factory: NetnsFactory) -> KernelUnderTest:
    from kernel.system import real_kernel

    system = real_kernel()
    return _under_test("real", system, None, netns_factory)


def _under_test(name: str, system: Any, world: Any | None, new_ns: Callable[[str], str]
                ) -> KernelUnderTest:  # fmt: skip
    """The kernel under test over one kernel.system.Kernel's subsystems."""
    return KernelUnderTest(
        name=name, netns=system.netns, links=system.links, neighbours=system.neighbours,
        sysctl=system.sysctl, iptables=system.iptables, ipvs=system.ipvs,
        nftables=system.nftables, conntrack=system.conntrack, system=system, world=world,
        new_ns=new_ns,
    )  # fmt: skip


@pytest.fixture(params=["fake", pytest.param("real", marks=pytest.mark.root)])
def kernel(
    request: pytest.FixtureRequest, netns_factory: NetnsFactory
) -> Iterator[KernelUnderTest]:
    """The kernel under test: the in-memory fake, then the real one (root only)."""
    if request.param == "fake":
        yield _fake_kernel()
    else:
        yield _real_kernel(netns_factory)
