"""The writes of one command or leader step, committed in one txn with the address claims they
make and release (see meshctl.ipam): a step that lost a race changes nothing and is tried again
on fresh data (store.retry_conflicts).

etcd takes at most MAX_TXN_OPS operations in one txn (its default --max-txn-ops), so a step that
may grow with a service's replicas (making or dropping task records) is cut into several such
changes by its caller, each whole on its own.
"""

from __future__ import annotations

from collections.abc import Iterable

from meshctl import ipam
from meshctl.ipam import IpamState
from meshctl.model import NETWORK, Network, from_record
from meshctl.store import Op, Store

MAX_TXN_OPS = 120  # etcd's default cap is 128


class Changes:
    """The writes of one operation: records to put/delete and the networks' addresses it changed.

    commit() writes them in one txn with the address claims (see meshctl.ipam), so a command
    that lost a race changes nothing and is tried again on fresh data.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self.ops: list[Op] = []
        self._ipam: dict[str, tuple[ipam.StoredIpam, IpamState]] = {}
        self._nodes: int | None = None

    def ipam(self, network: Network) -> IpamState:
        """The network's IPAM state as changed so far."""
        if network.id not in self._ipam:
            stored = ipam.load(self.store, network)
            self._ipam[network.id] = (stored, stored.state)
        return self._ipam[network.id][1]

    def reserve(self, network: Network) -> int:
        """Addresses of the network kept free for the nodes' load balancers."""
        if self._nodes is None:
            self._nodes = ipam.node_count(self.store)
        return ipam.lb_reserve(self.ipam(network), self._nodes)

    def allocate(self, network: Network, owner: str, what: str) -> str:
        state, address = ipam.allocate(self.ipam(network), owner, what, self.reserve(network))
        self._set(network, state)
        return address

    def release(self, network: Network, owners: Iterable[str]) -> None:
        self._set(network, ipam.release(self.ipam(network), owners))

    def _set(self, network: Network, state: IpamState) -> None:
        stored, _ = self._ipam[network.id]
        self._ipam[network.id] = (stored, state)

    def all_ops(self) -> list[Op]:
        """Every write, the address claims' included, as commit() would send them."""
        claims = [
            op for stored, state in self._ipam.values() for op in ipam.commit_ops(stored, state)
        ]
        return [*self.ops, *claims]

    def commit(self) -> None:
        self.store.txn(self.all_ops())


def networks_by_name(store: Store) -> dict[str, Network]:
    return {r.name: from_record(Network, r) for r in store.list(NETWORK)}
