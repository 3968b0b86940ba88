"""Server changes through HAProxy's runtime API, without a reload: pure planning.

A backend has a fixed number of server slots (meshctl.router.config). A server that stays
keeps its slot; one that goes is put in maintenance (no new requests; those in flight finish)
and its slot becomes free; one that comes takes a free slot (`set server ... addr`). New and
re-enabled servers go first and drained ones last, so a backend never passes through a moment
with none. When the new servers do not fit in the free slots, only a reload (which sizes the
slots again) can take them: plan_servers says so by returning None.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from meshctl.router.config import EMPTY_ADDRESS
from meshctl.router.spec import Backend, RouterSpec


@dataclass(frozen=True)
class Slot:
    """A server slot as HAProxy shows it (`show servers state`)."""

    name: str
    address: str
    port: int
    ready: bool  # taking new requests (not in maintenance)

    @property
    def empty(self) -> bool:
        return self.address == EMPTY_ADDRESS


def _state(backend: str, slot: str, ready: bool) -> str:
    return f"set server {backend}/{slot} state {'ready' if ready else 'maint'}"


def plan_servers(backend: Backend, slots: Sequence[Slot]) -> list[str] | None:
    """The runtime API commands that give backend's slots its servers; None if they do not
    fit (a reload must size the slots)."""
    wanted = {server.address: server.ready for server in backend.servers}
    held = {s.address: s for s in slots if s.address in wanted and s.port == backend.port}
    free = [s for s in slots if s.address not in wanted or s.port != backend.port]
    new = [address for address in sorted(wanted) if address not in held]
    if len(new) > len(free):
        return None
    first: list[str] = []
    last: list[str] = []
    for address, slot in sorted(held.items()):
        if slot.ready != wanted[address]:
            (first if wanted[address] else last).append(
                _state(backend.name, slot.name, wanted[address])
            )
    # Empty slots first: a slot that held a removed server keeps it, drained, if it can.
    free.sort(key=lambda s: (not s.empty, _index(s.name)))
    for address, slot in zip(new, free, strict=False):
        first.append(f"set server {backend.name}/{slot.name} addr {address} port {backend.port}")
        first.append(_state(backend.name, slot.name, wanted[address]))
    for slot in free[len(new) :]:
        if slot.ready:
            last.append(_state(backend.name, slot.name, False))
    return first + last


def _index(slot: str) -> int:
    digits = slot.lstrip("s")
    return int(digits) if digits.isdigit() else 0


def plan_runtime(
    spec: RouterSpec, running: Mapping[str, Sequence[Slot]], partial: bool = False
) -> list[str] | None:
    """Commands for every backend of spec, given the slots HAProxy runs (by backend); None
    when a reload is needed: a backend is missing or its new servers do not fit. partial:
    what can be done without a reload (while none can be loaded), such backends left out."""
    commands: list[str] = []
    for backend in spec.backends:
        slots = running.get(backend.name)
        planned = plan_servers(backend, slots) if slots is not None else None
        if planned is None and not partial:
            return None
        commands += planned or []
    return commands
