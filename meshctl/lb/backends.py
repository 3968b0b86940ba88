"""The load-balancer backends, in the order `--lb-backend auto` prefers them
(meshctl.controller.dataplane chooses among them).

Adding a backend: its module under meshctl/lb/, the kernel module it drives, the kernel.features
check of what it needs, and one line here.
"""

from __future__ import annotations

from meshctl.lb.backend import LbBackend
from meshctl.lb.iptables import IptablesBackend
from meshctl.lb.ipvs import IpvsBackend
from meshctl.lb.nftables import NftablesBackend

BACKENDS: tuple[LbBackend, ...] = (IpvsBackend(), NftablesBackend(), IptablesBackend())
NAMES: tuple[str, ...] = tuple(b.name for b in BACKENDS)


def backend_named(name: str) -> LbBackend:
    """The backend of that name (ValueError naming the choices if there is none)."""
    for backend in BACKENDS:
        if backend.name == name:
            return backend
    raise ValueError(f"load-balancer backend {name!r}: use auto, {', '.join(NAMES)}")
