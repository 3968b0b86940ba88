"""The load-balancer backend protocol: what a backend renders for a network's services, how it
observes and applies that in the network's LB namespace, and which sysctls it needs.

A backend's objects are its own business (iptables tables, IPVS services, an nftables table);
the rest of meshctl.lb handles the LB namespace, its leg and addresses, UDP flows and the change
tracker, the same for every backend (kube-proxy's proxiers share its ServiceChangeTracker so).
The registry of backends, in the order `auto` prefers them, is meshctl.lb.backends.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

from kernel.netns import Namespace
from kernel.system import Kernel
from meshctl.lb.spec import LbSpec, VirtualIp
from meshctl.sysctls import Setting


class ObjectsChange(Protocol):
    """A backend's change to one LB namespace: made by `LbBackend.change`, applied by its apply."""

    @property
    def empty(self) -> bool: ...

    def lines(self, where: str) -> Iterator[str]:
        """One `meshctl diff` line per difference (`+`, `-`, `~`), for the namespace `where`."""
        ...


class LbBackend(Protocol):
    """One way of balancing an LB namespace's VIPs over their backends.

    Its objects split in two: those of single services (rendered from `services`), and those the
    VIPs share (rendered from `shared`, depending on each VIP's address, service id and whether
    it has an active backend, and nothing else). The change tracker renders the services that
    changed and, if that changed, the shared part, and diffs them: a change costs that service.
    """

    @property
    def name(self) -> str: ...

    @property
    def parallel(self) -> bool:
        """Whether apply hands its work to another process (a tool parsing its input), so the
        leg, sysctls and addresses can be made meanwhile; else they are made first."""
        ...

    @property
    def needs(self) -> tuple[str, ...]:
        """The kernel features it runs on, as kernel.features names its checks (`meshctl
        doctor` reads those checks for it)."""
        ...

    @property
    def settings(self) -> tuple[Setting, ...]:
        """The sysctls it needs in an LB namespace beyond every LB namespace's (meshctl.sysctls)."""
        ...

    def sysctls(self) -> dict[str, str]:
        """What every LB namespace holds with this backend: meshctl.sysctls.LB and its own."""
        ...

    def available(self, kernel: Kernel, ns: Namespace = None) -> str | None:
        """None if the kernel can run this backend, else why not (one line)."""
        ...

    def render(self, services: LbSpec, shared: LbSpec | None) -> Any:
        """The objects of services' VIPs, and the shared objects of `shared` (none if None)."""
        ...

    def observe(self, kernel: Kernel, ns: str) -> Any:
        """What this backend owns in the LB namespace ns, in the shape render makes."""
        ...

    def change(self, desired: Any, held: Any) -> ObjectsChange:
        """Pure: the smallest change from held to desired (both of render's shape)."""
        ...

    def apply(self, kernel: Kernel, ns: str, change: Any) -> None:
        """Make one change; a change the kernel refuses leaves the namespace's objects as they
        were."""
        ...

    def clear(self, kernel: Kernel, ns: str) -> None:
        """Remove everything this backend owns in ns (the node moved to another backend)."""
        ...


def shared_part(vip: VirtualIp) -> tuple[str, str, bool]:
    """What a VIP contributes to the objects the VIPs share (see LbBackend)."""
    return (vip.vip, vip.service_id, bool(vip.active))
