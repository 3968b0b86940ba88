"""Operations on desired state: each one validated, then written in one store transaction.

Every write compare-and-swaps on each record it read (service, tasks, the networks involved)
and claims every unique value it takes with a key of its own in the same txn (addresses and the
subnet registry: meshctl.ipam; published ports), so two meshctl commands racing never
half-apply: the loser re-reads and re-validates (store.retry_conflicts). On any error nothing
is written.

Records (kind → name): network → name, ipam → network id, address → `<network-id>/<address>`,
registry → `subnets`, vni → the VNI of an overlay, service → name, task → task id, port →
`PORT/PROTO` (which service publishes it), node → name.

Lifecycle of tasks, with or without a controller running:
- create/scale/update make task records for missing slots: desired `running`, state
  `pending`, node "" (unassigned), addresses allocated on every network of the service.
- A task that must go (scale down, service rm) and that no node has claimed yet never ran:
  its record is deleted and its addresses released at once. A claimed task is marked desired
  `shutdown` (scale) or `removed` (service rm); its controller tears it down, then calls
  forget_task(), which deletes the record and releases its addresses.
- service rm deletes the service record at once, so `service ls` no longer shows it; tasks
  still draining on a node linger (desired `removed`) until their controller forgets them.
- network rm refuses while a service record uses the network, not while such lingering tasks
  hold addresses on it: it deletes the network with its IPAM record and address claims.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterable, Mapping
from typing import Any

from meshctl import ipam
from meshctl.ipam import IpamState
from meshctl.model import (
    CONTAINER,
    INGRESS,
    NETWORK,
    ROUTER,
    ROUTER_KEY,
    SERVICE,
    TASK,
    VNI_FIRST,
    VNI_LAST,
    Container,
    Driver,
    Network,
    NetworkAttachment,
    NotFoundError,
    PublishedPort,
    Router,
    Service,
    Task,
    ValidationError,
    check_name,
    from_record,
)
from meshctl.store import Delete, Put, Store, retry_conflicts
from meshctl.store.changes import Changes, networks_by_name

PORT = "port"
VNI = "vni"  # an overlay network's VXLAN identifier, claimed by a key of its own
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


# -- networks --------------------------------------------------------------------------------


def list_networks(store: Store) -> list[Network]:
    """All networks, sorted by name."""
    return [from_record(Network, r) for r in store.list(NETWORK)]


def get_network(store: Store, name: str) -> Network:
    record = store.get(NETWORK, name)
    if record is None:
        raise NotFoundError(f"network {name} not found; list networks with: meshctl network ls")
    return from_record(Network, record)


def network_ipam(store: Store, network: Network) -> IpamState:
    """The network's address allocations (gateway, VIPs, tasks, load balancers)."""
    return ipam.load(store, network).state


# The routing mesh's network (Docker's `ingress`): every service that publishes a port in
# ingress mode joins it; its load-balancer namespace on each node is swarm's ingress_sbox.
INGRESS_SUBNET_ENV = "MESHCTL_INGRESS_SUBNET"
DEFAULT_INGRESS_SUBNET = "10.255.0.0/16"


def ensure_ingress_network(store: Store) -> Network:
    """The ingress network, made on first use (subnet from MESHCTL_INGRESS_SUBNET)."""
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
    An overlay's VNI is claimed in the same txn (the lowest free one from VNI_FIRST).
    """
    chosen_driver: Driver = driver or ("overlay" if store.distributed else "bridge")
    check_name(name, "network name")
    if name == INGRESS and not _reserved_ok:
        raise ValidationError(
            f"network name {INGRESS} is reserved for the routing mesh (made when a service "
            "publishes a port); choose another name"
        )

    def attempt() -> Network:
        if store.get(NETWORK, name) is not None:
            raise ValidationError(
                f"network {name} already exists; choose another name or remove it first"
            )
        # The registry is read and written back in the txn: two creates racing for one
        # subnet (or overlapping ones) cannot both win.
        registry = ipam.load_registry(store)
        existing = list(registry.entries.values())
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


# -- services --------------------------------------------------------------------------------


def list_services(store: Store) -> list[Service]:
    """All services, sorted by name."""
    return [from_record(Service, r) for r in store.list(SERVICE)]


def get_service(store: Store, name: str) -> Service:
    return _service_record(store, name)[0]


def _service_record(store: Store, name: str) -> tuple[Service, int]:
    """The service and its record's mod_revision, for a compare-and-swap."""
    record = store.get(SERVICE, name)
    if record is None:
        raise NotFoundError(f"service {name} not found; list services with: meshctl service ls")
    return from_record(Service, record), record.mod_revision


def list_tasks(store: Store, service: Service | None = None) -> list[Task]:
    """Tasks (of one service, if given), by service name, slot and age."""
    tasks = [from_record(Task, r) for r in store.list(TASK)]
    if service is not None:
        tasks = [t for t in tasks if t.service_id == service.id]
    return sorted(tasks, key=lambda t: (t.service, t.slot, t.created_at, t.id))


def find_task(store: Store, name_or_id: str) -> Task:
    """A task by name (`web.1`: its newest task in that slot) or by id."""
    record = store.get(TASK, name_or_id)
    if record is not None:
        return from_record(Task, record)
    matches = [t for t in list_tasks(store) if t.name == name_or_id]
    if not matches:
        raise NotFoundError(
            f"no service or task named {name_or_id}; list them with: meshctl service ls"
        )
    return max(matches, key=lambda t: t.created_at)


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
        old, revision = _service_record(store, name)
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
            old, revision = _service_record(store, name)
            new = dataclasses.replace(old, replicas=count, updated_at=time.time())
            _plan_service(changes, old, new, expect=revision)
            result.append(new)
        changes.commit()
        return result

    return retry_conflicts(attempt, "scaling " + ", ".join(replicas))


def remove_service(store: Store, name: str) -> Service:
    """Delete the service record now; tasks go as described in this module's docstring."""

    def attempt() -> Service:
        old, revision = _service_record(store, name)
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


_networks = networks_by_name


def _plan_service(
    changes: Changes, old: Service | None, new: Service | None, expect: int
) -> Service:
    """Add to `changes` every write that takes the service from old to new (None: absent).

    Validates against the rest of the store, allocates/releases VIPs, claims published ports
    and plans tasks; returns the service as stored (with its VIPs).
    """
    store = changes.store
    networks = _networks(store)
    if new is None:
        assert old is not None
        changes.ops.append(Delete(SERVICE, old.name, expect=expect))
        _release_vips(changes, old, keep=set(), networks=networks)
        _claim_ports(changes, old, None)
        return old
    # Checked before _with_ingress, which may create the ingress network: a refused
    # command leaves no ingress network behind.
    networks = _networks(store)
    for attachment in new.networks:
        if attachment.network not in networks and attachment.network != INGRESS:
            raise NotFoundError(
                f"network {attachment.network} not found; create it with: "
                f"meshctl network create {attachment.network}"
            )
    _check_ports_free(store, new)
    _check_routes(store, new)
    new = _with_ingress(store, new)
    networks = _networks(store)
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


# -- logs and tasks --------------------------------------------------------------------------


def task_log_path(state_dir: str, task: Task) -> str:
    """Where the runtime writes a task's output: <state-dir>/tasks/<task-id>/log."""
    return os.path.join(state_dir, "tasks", task.id, "log")


# -- containers ------------------------------------------------------------------------------


def attach_container(
    store: Store, name: str, netns: str, network: str, node: str, start_time: int | None = None
) -> Container:
    """Store a foreign namespace's attachment with its address; the node's controller wires it.

    start_time: for netns /proc/PID/ns/net, that process's start time (see Container)."""
    if not os.path.exists(netns):
        raise NotFoundError(f"network namespace {netns} does not exist; is the process running?")

    def attempt() -> Container:
        net = get_network(store, network)
        if store.get(CONTAINER, name) is not None:
            raise ValidationError(f"container {name} is attached already; detach it first")
        changes = Changes(store)
        container = Container(
            name, netns, net.name, node, created_at=time.time(), start_time=start_time
        )
        address = changes.allocate(net, ipam.container_owner(container.id), f"container {name}")
        container = dataclasses.replace(container, address=address)
        changes.ops.append(Put(CONTAINER, name, container.to_dict(), expect=0))
        changes.commit()
        return container

    return retry_conflicts(attempt, f"attaching container {name}")


def detach_container(store: Store, name: str) -> Container:
    """Forget an attachment and free its address; the controller removes its veth."""

    def attempt() -> Container:
        record = store.get(CONTAINER, name)
        if record is None:
            raise NotFoundError(f"container {name} is not attached; see meshctl container ls")
        container = from_record(Container, record)
        changes = Changes(store)
        drop_container(changes, container, record.mod_revision, _networks(store))
        changes.commit()
        return container

    return retry_conflicts(attempt, f"detaching container {name}")


def drop_container(
    changes: Changes, container: Container, revision: int, networks: Mapping[str, Network]
) -> None:
    """Delete an attachment's record, releasing its address (into `changes`)."""
    changes.ops.append(Delete(CONTAINER, container.name, expect=revision))
    if container.network in networks:
        changes.release(networks[container.network], [ipam.container_owner(container.id)])


def list_containers(store: Store) -> list[Container]:
    return [from_record(Container, r) for r in store.list(CONTAINER)]
