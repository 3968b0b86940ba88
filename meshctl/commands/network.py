"""`network create/rm` and the routing mesh's ingress network: each one store transaction.

A network's subnet and (overlay) VNI are claimed in the txn that stores it: the subnet registry
is read and written back with a compare-and-swap, so two creates racing for one subnet, or for
the last network the limit allows, cannot both win.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping

from meshctl import ipam
from meshctl.commands.limits import check_network_count, network_limit
from meshctl.commands.read import get_network, list_containers, list_services
from meshctl.ipam import IpamState
from meshctl.model import (
    INGRESS,
    NETWORK,
    VNI_FIRST,
    VNI_LAST,
    Driver,
    Network,
    NotFoundError,
    ValidationError,
    check_name,
    from_record,
)
from meshctl.store import Delete, Put, Store, retry_conflicts

VNI = "vni"  # an overlay network's VXLAN identifier, claimed by a key of its own
# The routing mesh's network (Docker's `ingress`): every service that publishes a port in
# ingress mode joins it; its load-balancer namespace on each node is swarm's ingress_sbox.
INGRESS_SUBNET_ENV = "MESHCTL_INGRESS_SUBNET"
DEFAULT_INGRESS_SUBNET = "10.255.0.0/16"


def ensure_ingress_network(store: Store) -> Network:
    """The ingress network, made on first use (subnet from MESHCTL_INGRESS_SUBNET); it does
    not count against $MESHCTL_MAX_NETWORKS."""
    record = store.get(NETWORK, INGRESS)
    if record is not None:
        return from_record(Network, record)
    subnet = os.environ.get(INGRESS_SUBNET_ENV, DEFAULT_INGRESS_SUBNET)
    try:
        return create_network(store, INGRESS, subnet=subnet, labels={"meshctl.ingress": "true"},
                              _reserved_ok=True)  # fmt: skip
    except ValidationError as err:
        if store.get(NETWORK, INGRESS) is not None:  # another command made it meanwhile
            return get_network(store, INGRESS)
        raise ValidationError(
            f"cannot make the ingress network for published ports: {err}; set "
            f"{INGRESS_SUBNET_ENV} to a free subnet"
        ) from None


def create_network(
    store: Store,
    name: str,
    *,
    subnet: str | None = None,
    driver: Driver | None = None,
    internal: bool = False,
    labels: Mapping[str, str] | None = None,
    pool: str | None = None,
    prefix: int | None = None,
    _reserved_ok: bool = False,
) -> Network:
    """Create a network with `subnet`, or the next free /prefix of the pool (see meshctl.ipam).

    driver: `overlay` by default where several hosts share the store (etcd), else `bridge`.
    An overlay's VNI is claimed in the same txn (the lowest free one from VNI_FIRST). At most
    $MESHCTL_MAX_NETWORKS networks exist at once: counted in the subnet registry the txn
    compare-and-swaps, so racing creates cannot pass the limit together.
    """
    chosen_driver: Driver = driver or ("overlay" if store.distributed else "bridge")
    check_name(name, "network name")
    limit = None if _reserved_ok else network_limit()

    def attempt() -> Network:
        # The registry is read and written back in the txn: two creates racing for one
        # subnet (or overlapping ones, or the last one the limit allows) cannot both win.
        registry = ipam.load_registry(store)
        existing = list(registry.entries.values())
        _refuse_new(store, name, len(existing), limit, _reserved_ok)
        if subnet is None:
            chosen = ipam.pick_subnet(*ipam.configured_pool(pool, prefix), existing)
        else:
            chosen = subnet
        vni = _free_vni(store) if chosen_driver == "overlay" else 0
        network = Network(
            name, chosen, chosen_driver, internal, dict(labels or {}), created_at=time.time(),
            vni=vni,
        )  # fmt: skip
        other = ipam.overlapping(network.subnet, existing)
        if other is not None:
            raise ValidationError(
                f"invalid --subnet {network.subnet}: it overlaps network {other.name} "
                f"({other.subnet}); choose a subnet that overlaps no other network"
            )
        vni_claim = [Put(VNI, str(vni), {"network": network.id}, expect=0)] if vni else []
        store.txn(
            [
                Put(NETWORK, name, network.to_dict(), expect=0),
                Put(ipam.KIND, network.id, IpamState.new(network).meta(), expect=0),
                registry.with_network(network),
                *vni_claim,
            ]
        )
        return network

    return retry_conflicts(attempt, f"creating network {name}")


def _refuse_new(store: Store, name: str, count: int, limit: int | None, reserved_ok: bool) -> None:
    """Refuse network `name` past the limit (None: not counted) of `count` networks, with the
    routing mesh's reserved name, or when it exists."""
    if limit is not None:
        check_network_count(name, count, limit)
    if name == INGRESS and not reserved_ok:
        raise ValidationError(
            f"network name {INGRESS} is reserved for the routing mesh (made when a service "
            "publishes a port); choose another name"
        )
    if store.get(NETWORK, name) is not None:
        raise ValidationError(
            f"network {name} already exists; choose another name or remove it first"
        )


def _free_vni(store: Store) -> int:
    """The lowest VNI no network has claimed (a racing create conflicts on its claim key)."""
    taken = {int(r.name) for r in store.list(VNI)}
    vni = VNI_FIRST
    while vni in taken:
        vni += 1
    if vni > VNI_LAST:
        raise ValidationError("every VXLAN network identifier is taken; remove an overlay network")
    return vni


def remove_network(store: Store, name: str) -> Network:
    """Delete a network and its IPAM record; refuse while a service is attached to it."""

    def attempt() -> Network:
        record = store.get(NETWORK, name)
        if record is None:
            raise NotFoundError(f"network {name} not found; list networks with: meshctl network ls")
        network = from_record(Network, record)
        users = [s.name for s in list_services(store) if name in {a.network for a in s.networks}]
        if users:
            raise ValidationError(
                f"network {name} is in use by service {', '.join(users)}; remove the service "
                "or update it to another network first"
            )
        attached = [c.name for c in list_containers(store) if c.network == name]
        if attached:
            raise ValidationError(
                f"network {name} has attached container {', '.join(attached)}; "
                "detach it first with: meshctl container detach NAME"
            )
        ipam_record = store.get(ipam.KIND, network.id)
        ipam_revision = ipam_record.mod_revision if ipam_record else 0
        # Addresses still held by tasks draining off the network go with it.
        claims = [
            Delete(ipam.ADDRESS, r.name, expect=r.mod_revision)
            for r in store.list(ipam.ADDRESS, f"{network.id}/")
        ]
        store.txn(
            [
                Delete(NETWORK, name, expect=record.mod_revision),
                Delete(ipam.KIND, network.id, expect=ipam_revision),
                *claims,
                ipam.load_registry(store).without(network.id),
                *([Delete(VNI, str(network.vni))] if network.vni else []),
            ]
        )
        return network

    return retry_conflicts(attempt, f"removing network {name}")
