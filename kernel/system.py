"""The kernel as one object: every subsystem's verbs, real or fake, behind their protocols.

The controller and the load balancer take a Kernel, so unit tests hand them kernel.fake's and
the daemon hands them the real one; nothing above kernel/ imports a subsystem directly.
"""

from __future__ import annotations

from dataclasses import dataclass

from kernel.conntrack import ConntrackAPI
from kernel.iptables import IptablesAPI
from kernel.ipvs import IpvsAPI
from kernel.links import LinksAPI
from kernel.neighbours import NeighboursAPI
from kernel.netns import NetnsAPI
from kernel.nftables import NftablesAPI
from kernel.sockets import SocketsAPI
from kernel.sysctl import SysctlAPI


@dataclass(frozen=True)
class Kernel:
    netns: NetnsAPI
    links: LinksAPI
    sysctl: SysctlAPI
    iptables: IptablesAPI
    ipvs: IpvsAPI
    conntrack: ConntrackAPI
    sockets: SocketsAPI
    neighbours: NeighboursAPI
    nftables: NftablesAPI


def real_kernel() -> Kernel:
    """The running kernel, through pyroute2, the iptables-legacy tools and nft."""
    from kernel.conntrack import Conntrack
    from kernel.iptables import Iptables
    from kernel.ipvs import Ipvs
    from kernel.links import Links
    from kernel.neighbours import Neighbours
    from kernel.netns import Netns
    from kernel.nftables import Nftables
    from kernel.sockets import Sockets
    from kernel.sysctl import Sysctl

    return Kernel(
        Netns(),
        Links(),
        Sysctl(),
        Iptables(),
        Ipvs(),
        Conntrack(),
        Sockets(),
        Neighbours(),
        Nftables(),
    )


def fake_kernel(ipvs: bool = True) -> Kernel:
    """A fresh in-memory kernel (kernel.fake), one world shared by all its subsystems.

    ipvs=False models a kernel without IPVS, like the build machines'.
    """
    from kernel.fake.conntrack import FakeConntrack
    from kernel.fake.iptables import FakeIptables
    from kernel.fake.ipvs import FakeIpvs
    from kernel.fake.links import FakeLinks
    from kernel.fake.neighbours import FakeNeighbours
    from kernel.fake.nftables import FakeNftables
    from kernel.fake.sockets import FakeSockets
    from kernel.fake.sysctl import FakeSysctl
    from kernel.fake.world import FakeNetns, FakeWorld

    world = FakeWorld()
    return Kernel(
        FakeNetns(world),
        FakeLinks(world),
        FakeSysctl(world, ipvs=ipvs),
        FakeIptables(world),
        FakeIpvs(world, unavailable=None if ipvs else "the kernel has no IPVS"),
        FakeConntrack(world),
        FakeSockets(world),
        FakeNeighbours(world),
        FakeNftables(world),
    )
