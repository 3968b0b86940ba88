"""kernel.neighbours in memory: permanent neighbour and FDB entries, kept with the links they are
on (kernel.fake.links.NsLinks), so they go with their link as in the kernel."""

from __future__ import annotations

from collections.abc import Iterable

from kernel.fake.links import NsLinks, links_in
from kernel.fake.world import FakeWorld
from kernel.links import missing_link
from kernel.neighbours import (
    FdbEntry,
    Neighbour,
    checked_fdb,
    checked_neighbour,
    fdb_order,
    neighbour_order,
    not_vxlan,
)
from kernel.netns import Namespace


class FakeNeighbours:
    """kernel.neighbours.NeighboursAPI in memory."""

    def __init__(self, world: FakeWorld) -> None:
        self.world = world

    def ensure_neighbour(self, ns: Namespace, neighbour: Neighbour) -> None:
        self.ensure_neighbours(ns, [neighbour])

    def delete_neighbour(self, ns: Namespace, neighbour: Neighbour) -> None:
        self.delete_neighbours(ns, [neighbour])

    def ensure_neighbours(self, ns: Namespace, neighbours: Iterable[Neighbour]) -> None:
        wanted = [checked_neighbour(n) for n in neighbours]
        state = self._require(ns, {n.ifname for n in wanted}, vxlan=False)
        for n in wanted:
            state.neighbours[(n.ifname, n.address)] = n

    def delete_neighbours(self, ns: Namespace, neighbours: Iterable[Neighbour]) -> None:
        unwanted = [checked_neighbour(n) for n in neighbours]
        state = links_in(self.world, ns)
        for n in unwanted:
            state.neighbours.pop((n.ifname, n.address), None)

    def list_neighbours(self, ns: Namespace, ifname: str | None = None) -> list[Neighbour]:
        found = links_in(self.world, ns).neighbours.values()
        return sorted((n for n in found if ifname in (None, n.ifname)), key=neighbour_order)

    def ensure_fdb(self, ns: Namespace, entry: FdbEntry) -> None:
        self.ensure_fdb_entries(ns, [entry])

    def delete_fdb(self, ns: Namespace, entry: FdbEntry) -> None:
        self.delete_fdb_entries(ns, [entry])

    def ensure_fdb_entries(self, ns: Namespace, entries: Iterable[FdbEntry]) -> None:
        wanted = [checked_fdb(e) for e in entries]
        state = self._require(ns, {e.ifname for e in wanted}, vxlan=True)
        for e in wanted:
            state.fdb[(e.ifname, e.mac)] = e  # replaces another dst

    def delete_fdb_entries(self, ns: Namespace, entries: Iterable[FdbEntry]) -> None:
        unwanted = [checked_fdb(e) for e in entries]
        state = links_in(self.world, ns)
        for e in unwanted:
            if state.fdb.get((e.ifname, e.mac)) == e:  # one to another dst stays
                del state.fdb[(e.ifname, e.mac)]

    def list_fdb(self, ns: Namespace, ifname: str) -> list[FdbEntry]:
        found = links_in(self.world, ns).fdb.values()
        return sorted((e for e in found if e.ifname == ifname), key=fdb_order)

    def _require(self, ns: Namespace, names: set[str], *, vxlan: bool) -> NsLinks:
        """The namespace's state once every link named is there (and a vxlan, if asked)."""
        state = links_in(self.world, ns)
        for name in sorted(names):
            link = state.links.get(name)
            if link is None:
                raise missing_link(ns, name)
            if vxlan and link.kind != "vxlan":
                raise not_vxlan(ns, name, link.kind)
        return state
