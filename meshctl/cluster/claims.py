"""The addresses a node claims in the store before it reconciles: a load-balancer address on
every network it takes part in (none on an overlay it has left), and its router's address on
every network the router joins (none on the others). A network that has no address left is
reported, the others go on."""

from __future__ import annotations

from meshctl import ipam
from meshctl.model import MeshctlError
from meshctl.router.sync import ROUTER
from meshctl.store import Store
from meshctl.view import ClusterView


class AddressClaims:
    """The node's LB and router address claims, as one store writer."""

    name = "orchestrate"

    def __init__(self, store: Store, node: str) -> None:
        self.store = store
        self.node = node

    def write(self, view: ClusterView) -> tuple[bool, dict[str, str]]:
        """True if the store changed, and what failed (network name, or "router")."""
        errors: dict[str, str] = {}
        changed = self._lb_addresses(view, errors) | self._router_addresses(view, errors)
        return changed, errors

    def _lb_addresses(self, view: ClusterView, errors: dict[str, str]) -> bool:
        have = view.lb_addresses
        taking_part = view.taking_part(self.node)
        changed = False
        for network in view.networks.values():
            holds = (network.name, self.node) in have
            try:
                if network.name in taking_part and not holds:
                    ipam.allocate_lb_address(self.store, network, self.node)
                    changed = True
                elif network.overlay and network.name not in taking_part and holds:
                    ipam.release_lb_address(self.store, network, self.node)
                    changed = True
            except MeshctlError as err:
                errors[network.name] = str(err)
        return changed

    def _router_addresses(self, view: ClusterView, errors: dict[str, str]) -> bool:
        wanted = view.router_networks()
        have = {net for (net, owner) in view.router_addresses if owner == self.node}
        owner = ipam.router_owner(self.node)
        changed = False
        for name in sorted(wanted ^ have):
            network = view.networks.get(name)
            if network is None:
                continue
            try:
                if name in wanted:
                    ipam.allocate_node_address(
                        self.store, network, owner, f"the router of node {self.node}"
                    )
                else:
                    ipam.release_node_address(self.store, network, owner)
                changed = True
            except MeshctlError as err:
                errors[ROUTER] = f"network {name}: {err}"
        return changed
