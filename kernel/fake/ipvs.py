"""kernel.ipvs in memory: virtual services and destinations per fake namespace.

Behaves as the real one does, checked by tests/conformance/test_ipvs.py: services are keyed as
the kernel keys them, an ensure edits what differs, deletes of missing things are no-ops, adding
a destination to a missing service is NotFound, and listing its destinations finds none.
"""

from __future__ import annotations

from kernel import netns
from kernel.errors import NotFound
from kernel.fake.world import FakeWorld
from kernel.ipvs import (
    Destination,
    IpvsChange,
    VirtualService,
    destination_order,
    service_order,
)

Key = tuple[str, int, str] | int


class _Service:
    """One service and its destinations by (address, port)."""

    def __init__(self, svc: VirtualService) -> None:
        self.svc = svc
        self.destinations: dict[tuple[str, int], Destination] = {}


class FakeIpvs:
    """IpvsAPI over a FakeWorld; `unavailable` makes available() report that reason."""

    def __init__(self, world: FakeWorld, unavailable: str | None = None) -> None:
        self.world = world
        self.unavailable = unavailable

    def _services(self, ns: netns.Namespace) -> dict[Key, _Service]:
        services: dict[Key, _Service] = self.world.require(ns).part("ipvs", dict)
        return services

    def _service(self, ns: netns.Namespace, svc: VirtualService) -> _Service:
        try:
            return self._services(ns)[svc.key]
        except KeyError:
            raise NotFound(f"IPVS service {svc.key} does not exist in netns {ns}") from None

    def available(self, ns: netns.Namespace) -> str | None:
        self.world.require(ns)
        return self.unavailable

    def ensure_service(self, ns: netns.Namespace, svc: VirtualService) -> None:
        services = self._services(ns)
        if svc.key in services:
            services[svc.key].svc = svc
        else:
            services[svc.key] = _Service(svc)

    def delete_service(self, ns: netns.Namespace, svc: VirtualService) -> None:
        self._services(ns).pop(svc.key, None)

    def list_services(self, ns: netns.Namespace) -> list[VirtualService]:
        return sorted((s.svc for s in self._services(ns).values()), key=service_order)

    def ensure_destination(
        self, ns: netns.Namespace, svc: VirtualService, dest: Destination
    ) -> None:
        self._service(ns, svc).destinations[dest.key] = dest

    def delete_destination(
        self, ns: netns.Namespace, svc: VirtualService, dest: Destination
    ) -> None:
        service = self._services(ns).get(svc.key)
        if service is not None:
            service.destinations.pop(dest.key, None)

    def list_destinations(self, ns: netns.Namespace, svc: VirtualService) -> list[Destination]:
        service = self._services(ns).get(svc.key)
        if service is None:
            return []
        return sorted(service.destinations.values(), key=destination_order)

    def snapshot(self, ns: netns.Namespace) -> dict[VirtualService, list[Destination]]:
        return {svc: self.list_destinations(ns, svc) for svc in self.list_services(ns)}

    def apply(self, ns: netns.Namespace, change: IpvsChange) -> None:
        for svc in change.ensure_services:
            self.ensure_service(ns, svc)
        for svc, dest in change.ensure_destinations:
            self.ensure_destination(ns, svc, dest)
        for svc, dest in change.delete_destinations:
            self.delete_destination(ns, svc, dest)
        for svc in change.delete_services:
            self.delete_service(ns, svc)
