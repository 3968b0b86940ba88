"""`service create/update/scale/rm`: a service's spec with its VIPs, published-port claims
and pending tasks, each write one store transaction (see meshctl.commands)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Mapping
from typing import Any

from meshctl import ipam
from meshctl.commands.network import ensure_ingress_network
from meshctl.commands.read import get_service, list_services, list_tasks, service_record
from meshctl.model import (
    INGRESS,
    ROUTER,
    ROUTER_KEY,
    SERVICE,
    MeshctlError,
    Network,
    NetworkAttachment,
    NotFoundError,
    PublishedPort,
    Router,
    Service,
    ValidationError,
    from_record,
)
from meshctl.store import Delete, Put, Store, retry_conflicts
from meshctl.store.changes import Changes, networks_by_name

PORT = "port"
# Service fields `service update` may change; id, version and timestamps are meshctl's.
UPDATABLE = frozenset(
    {
        "command",
        "replicas",
        "env",
        "networks",
        "endpoint_mode",
        "ports",
        "health",
        "restart",
        "stop_grace_period",
        "hostnames",
        "hostname_path",
        "hostname_sticky",
        "hostname_tls",
    }
)
# What only the router reads: changing it re-routes, and no task is replaced for it.
ROUTE_FIELDS = frozenset({"hostnames", "hostname_path", "hostname_sticky", "hostname_tls"})


def refuse_ports_in_use(ports: Iterable[PublishedPort]) -> None:
    """A published port that a process of this host already holds is refused at once (where
    the controller runs elsewhere, it reports the clash on the service's tasks instead)."""
    from kernel.sockets import Sockets

    held = Sockets().bound_ports(None)
    for port in ports:
        if (port.published, port.protocol) in held:
            raise MeshctlError(
                f"published port {port.published}/{port.protocol} is already in use on this host; "
                "free it or publish another port"
            )


def refuse_new_ports_in_use(store: Store, name: str, changes: Mapping[str, Any]) -> None:
    """refuse_ports_in_use for the ports an update of service `name` publishes anew."""
    old = {(p.published, p.protocol) for p in get_service(store, name).ports}
    refuse_ports_in_use(
        [p for p in changes.get("ports", ()) if (p.published, p.protocol) not in old]
    )


def _routed(service: Service) -> bool:
    """Whether the service publishes a port through the routing mesh (ingress, cluster)."""
    return any(p.mode == "ingress" and p.traffic == "cluster" for p in service.ports)


def _with_ingress(store: Store, service: Service) -> Service:
    """The service on the ingress network (last, so its own first network keeps the default
    route) exactly when it publishes through the routing mesh."""
    own = tuple(a for a in service.networks if a.network != INGRESS)
    if not _routed(service):
        return dataclasses.replace(service, networks=own)
    ensure_ingress_network(store)
    kept = next((a for a in service.networks if a.network == INGRESS), NetworkAttachment(INGRESS))
    return dataclasses.replace(service, networks=(*own, kept))


def _refuse_ingress(networks: Iterable[NetworkAttachment]) -> None:
    if any(a.network == INGRESS for a in networks):
        raise ValidationError(
            f"invalid --network {INGRESS}: it is the routing mesh's own network; publish a port "
            "with --publish PUBLISHED:TARGET instead"
        )


def create_service(store: Store, spec: Service) -> Service:
    """Store a new service with its VIPs and its pending tasks, in one transaction."""

    def attempt() -> Service:
        if store.get(SERVICE, spec.name) is not None:
            raise ValidationError(
                f"service {spec.name} already exists; choose another --name, or change it "
                f"with: meshctl service update {spec.name}"
            )
        now = time.time()
        service = dataclasses.replace(spec, version=1, created_at=now, updated_at=now)
        return _write_service(store, None, service, expect=0)

    _refuse_ingress(spec.networks)

    return retry_conflicts(attempt, f"creating service {spec.name}")


def update_service(store: Store, name: str, changes: Mapping[str, Any]) -> Service:
    """Store a new spec with the fields in `changes` replaced: version + 1, unless only its
    routes changed (its tasks then stay as they are)."""
    unknown = set(changes) - UPDATABLE
    if unknown:
        raise ValidationError(f"cannot update {', '.join(sorted(unknown))} of a service")
    _refuse_ingress(changes.get("networks", ()))

    def attempt() -> Service:
        old, revision = service_record(store, name)
        version = old.version + (1 if set(changes) - ROUTE_FIELDS else 0)
        new = dataclasses.replace(old, **changes, version=version, updated_at=time.time())
        return _write_service(store, old, new, expect=revision)

    return retry_conflicts(attempt, f"updating service {name}")


def scale_services(store: Store, replicas: Mapping[str, int]) -> list[Service]:
    """Set the replica count of several services in one transaction (no version bump: running
    tasks are kept as they are)."""

    def attempt() -> list[Service]:
        changes = Changes(store)
        result = []
        for name, count in replicas.items():
            old, revision = service_record(store, name)
            new = dataclasses.replace(old, replicas=count, updated_at=time.time())
            _plan_service(changes, old, new, expect=revision)
            result.append(new)
        changes.commit()
        return result

    return retry_conflicts(attempt, "scaling " + ", ".join(replicas))


def remove_service(store: Store, name: str) -> Service:
    """Delete the service record now; tasks go as described in this module's docstring."""

    def attempt() -> Service:
        old, revision = service_record(store, name)
        changes = Changes(store)
        _plan_service(changes, old, None, expect=revision)
        changes.commit()
        return old

    return retry_conflicts(attempt, f"removing service {name}")


def _write_service(store: Store, old: Service | None, new: Service, expect: int) -> Service:
    changes = Changes(store)
    service = _plan_service(changes, old, new, expect)
    changes.commit()
    return service


def _plan_service(
    changes: Changes, old: Service | None, new: Service | None, expect: int
) -> Service:
    """Add to `changes` every write that takes the service from old to new (None: absent).

    Validates against the rest of the store, allocates/releases VIPs, claims published ports
    and plans tasks; returns the service as stored (with its VIPs).
    """
    store = changes.store
    networks = networks_by_name(store)
    if new is None:
        assert old is not None
        changes.ops.append(Delete(SERVICE, old.name, expect=expect))
        _release_vips(changes, old, keep=set(), networks=networks)
        _claim_ports(changes, old, None)
        return old
    # Checked before _with_ingress, which may create the ingress network: a refused
    # command leaves no ingress network behind.
    networks = networks_by_name(store)
    for attachment in new.networks:
        if attachment.network not in networks and attachment.network != INGRESS:
            raise NotFoundError(
                f"network {attachment.network} not found; create it with: "
                f"meshctl network create {attachment.network}"
            )
    _check_ports_free(store, new)
    _check_routes(store, new)
    new = _with_ingress(store, new)
    networks = networks_by_name(store)
    new = _assign_vips(changes, old, new, networks)
    changes.ops.append(Put(SERVICE, new.name, new.to_dict(), expect=expect))
    _claim_ports(changes, old, new)
    _check_room(changes, old, new, networks)
    return new


def _check_room(
    changes: Changes, old: Service | None, new: Service, networks: dict[str, Network]
) -> None:
    """Refuse up front what the leader could not address: every slot without a task on a
    network of the new spec needs an address there, and a rolling update one more (its new
    task runs beside the old one). Not a claim: the leader claims as it makes the tasks."""
    live = [
        t
        for t in list_tasks(changes.store)
        if t.service_id == new.id and t.desired_state == "running"
    ]
    rolling = old is not None and old.version != new.version and bool(live)
    for attachment in new.networks:
        network = networks[attachment.network]
        having = {t.slot for t in live if attachment.network in t.addresses}
        needed = [slot for slot in range(1, new.replicas + 1) if slot not in having]
        if rolling and not needed:
            needed = [1]
        state = changes.ipam(network)
        reserve = changes.reserve(network)
        for slot in needed:
            what = f"task {new.name}.{slot}"
            state, _ = ipam.allocate(state, f"task:{new.id}.{slot}", what, reserve)


def _assign_vips(
    changes: Changes, old: Service | None, new: Service, networks: dict[str, Network]
) -> Service:
    """new with a VIP on each network in vip mode: kept from old where it had one."""
    old_vips = old.vips() if old else {}
    attachments = []
    for attachment in new.networks:
        vip = None
        if new.endpoint_mode == "vip":
            vip = old_vips.get(attachment.network) or changes.allocate(
                networks[attachment.network],
                ipam.vip_owner(new.id),
                f"the VIP of service {new.name}",
            )
        attachments.append(dataclasses.replace(attachment, vip=vip))
    kept = {a.network for a in attachments if a.vip}
    if old:
        _release_vips(changes, old, keep=kept, networks=networks)
    return dataclasses.replace(new, networks=tuple(attachments))


def _release_vips(
    changes: Changes, old: Service, keep: set[str], networks: dict[str, Network]
) -> None:
    for network in old.vips():
        if network not in keep and network in networks:
            changes.release(networks[network], [ipam.vip_owner(old.id)])


def _port_key(port: PublishedPort) -> str:
    return f"{port.published}/{port.protocol}"


def _check_ports_free(store: Store, new: Service) -> None:
    """Reject a published port/protocol another service already publishes."""
    wanted = {_port_key(p) for p in new.ports}
    router = store.get(ROUTER, ROUTER_KEY)
    if router is not None:
        taken = wanted & {_port_key(p) for p in from_record(Router, router).ports()}
        if taken:
            raise ValidationError(
                f"invalid --publish: port {sorted(taken)[0]} is the HTTP router's; choose "
                "another published port, or move the router with: meshctl router enable "
                "--http-port/--https-port"
            )
    for other in list_services(store):
        if other.id == new.id:
            continue
        clash = wanted & {_port_key(p) for p in other.ports}
        if clash:
            raise ValidationError(
                f"invalid --publish: port {sorted(clash)[0]} is already published by service "
                f"{other.name}; choose another published port"
            )


def _check_routes(store: Store, new: Service) -> None:
    """Refuse a route the router could not take: a service with routes but no network to
    reach its tasks on, or a route another service has (the same host and path; for TLS
    passthrough, the same host)."""
    if not new.hostnames:
        return
    if not new.networks and not any(port.routed for port in new.ports):
        raise ValidationError(
            f"invalid --hostname: service {new.name} is on no network the router could reach "
            "its tasks on; add --network NAME"
        )
    for other in list_services(store):
        if other.id == new.id:
            continue
        theirs = {(r.host, r.tls, r.path if r.tls == "terminate" else "") for r in other.routes()}
        for route in new.routes():
            path = route.path if route.tls == "terminate" else ""
            if (route.host, route.tls, path) in theirs:
                where = f"{route.host}{path if path != '/' else ''}"
                raise ValidationError(
                    f"invalid --hostname {route.host}: service {other.name} already routes "
                    f"{where}{' (TLS passthrough)' if route.tls == 'passthrough' else ''}; "
                    "choose another host or --hostname-path"
                )


def _claim_ports(changes: Changes, old: Service | None, new: Service | None) -> None:
    """Port records make two racing creates of the same published port conflict in the store."""
    before = {_port_key(p) for p in old.ports} if old else set()
    after = {_port_key(p) for p in new.ports} if new else set()
    store = changes.store
    for key in sorted(before - after):
        record = store.get(PORT, key)
        changes.ops.append(Delete(PORT, key, expect=record.mod_revision if record else 0))
    if new is not None:
        claim = {"service": new.name, "service_id": new.id}
        changes.ops.extend(Put(PORT, key, claim, expect=0) for key in sorted(after - before))
