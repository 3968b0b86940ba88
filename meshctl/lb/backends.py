"""The load-balancer backends, in the order `--lb-backend auto` prefers them, and the choice.

Adding a backend: its module under meshctl/lb/, the kernel module it drives, its check in
meshctl doctor, and one line here.
"""

from __future__ import annotations

from kernel.errors import Unsupported
from kernel.netns import Namespace
from kernel.system import Kernel
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


def choose_backend(kernel: Kernel, wanted: str, ns: Namespace = None) -> LbBackend:
    """The backend to run: "auto" picks the first the kernel can run (IPVS where it has it,
    else nftables, else iptables); a named one must be available."""
    if wanted == "auto":
        return next(b for b in BACKENDS if b.available(kernel, ns) is None)
    backend = backend_named(wanted)
    reason = backend.available(kernel, ns)
    if reason is not None:
        others = ", ".join(n for n in NAMES if n != wanted)
        raise Unsupported(f"load-balancer backend {wanted}: {reason}; choose {others} or auto")
    return backend
