"""`router enable/disable` and `router cert add/rm`: the HTTP routing mesh's record and its
certificates; and the `haproxy -c` check of a service's routes before it is stored.

Each command is one store transaction, as meshctl.commands' are: the router record, its VIP on
the ingress network (mode ingress) and its ports' claims (kind `port`, as a service's
published ports are claimed, so the two can never take the same port) go in together.
Certificates are stored under kind `router-cert` by host; every node's controller writes
them into its router's directory, readable by root only (0600).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import ssl
import tempfile
import time
from collections.abc import Mapping
from typing import Any

from meshctl import ipam
from meshctl.commands.network import ensure_ingress_network
from meshctl.commands.read import get_router
from meshctl.commands.service import PORT, ROUTE_FIELDS, refuse_ports_in_use
from meshctl.model import (
    CERTIFICATE,
    INGRESS,
    ROUTER,
    ROUTER_KEY,
    Certificate,
    NetworkAttachment,
    NotFoundError,
    PublishMode,
    Router,
    Service,
    ValidationError,
    from_record,
)
from meshctl.router import haproxy
from meshctl.router.config import RouterFiles, crt_list, render
from meshctl.store import Delete, Op, Put, Store, retry_conflicts
from meshctl.store.changes import Changes, networks_by_name


def refuse_router_ports_in_use(store: Store, wanted: Router) -> None:
    """Refuse ports a process of this host holds that the router would take anew (those it
    has already are its own)."""
    current = get_router(store)
    held = {p.published for p in current.ports()} if current else set()
    refuse_ports_in_use([p for p in wanted.ports() if p.published not in held])


def _port_key(port: int) -> str:
    return f"{port}/tcp"


def enable_router(
    store: Store, http_port: int = 80, https_port: int = 443, mode: PublishMode = "ingress"
) -> Router:
    """Enable the router (or move it to other ports or another publish mode)."""
    Router(http_port, https_port, mode)  # validates before anything is made

    def attempt() -> Router:
        record = store.get(ROUTER, ROUTER_KEY)
        old = from_record(Router, record) if record else None
        new = dataclasses.replace(
            old or Router(created_at=time.time()),
            http_port=http_port,
            https_port=https_port,
            mode=mode,
        )
        changes = Changes(store)
        old_ports = {_port_key(p.published) for p in old.ports()} if old else set()
        new_ports = {_port_key(p.published) for p in new.ports()}
        for key in sorted(new_ports - old_ports):
            claim = store.get(PORT, key)
            if claim is not None:
                holder = claim.value.get("service", "another service")
                raise ValidationError(
                    f"port {key} is published by service {holder}; give the router another "
                    "port with --http-port/--https-port"
                )
            changes.ops.append(Put(PORT, key, {"router": new.id}, expect=0))
        changes.ops += _release_ports(store, old_ports - new_ports)
        ingress = ensure_ingress_network(store)
        owner = ipam.vip_owner(new.id)
        if mode == "ingress":
            vip = new.vip or changes.allocate(ingress, owner, "the router's VIP")
            new = dataclasses.replace(new, vip=vip)
        elif new.vip is not None:
            changes.release(ingress, [owner])
            new = dataclasses.replace(new, vip=None)
        changes.ops.append(
            Put(ROUTER, ROUTER_KEY, new.to_dict(), expect=record.mod_revision if record else 0)
        )
        changes.commit()
        return new

    return retry_conflicts(attempt, "enabling the router")


def _release_ports(store: Store, keys: set[str]) -> list[Op]:
    found = [(key, store.get(PORT, key)) for key in sorted(keys)]
    return [Delete(PORT, key, expect=r.mod_revision) for key, r in found if r is not None]


def disable_router(store: Store) -> Router:
    """Disable the router: its record, VIP, ports and every node's router addresses go; each
    controller then stops its HAProxy and removes its namespace."""

    def attempt() -> Router:
        record = store.get(ROUTER, ROUTER_KEY)
        if record is None:
            raise NotFoundError("the router is not enabled; enable it with: meshctl router enable")
        router = from_record(Router, record)
        changes = Changes(store)
        changes.ops.append(Delete(ROUTER, ROUTER_KEY, expect=record.mod_revision))
        changes.ops += _release_ports(store, {_port_key(p.published) for p in router.ports()})
        for network in networks_by_name(store).values():
            owners = {
                owner
                for owner in changes.ipam(network).allocations.values()
                if owner.startswith(ipam.ROUTER_OWNER_PREFIX) or owner == ipam.vip_owner(router.id)
            }
            if owners:
                changes.release(network, owners)
        changes.commit()
        return router

    return retry_conflicts(attempt, "disabling the router")


# -- certificates ------------------------------------------------------------------------------


def add_certificate(store: Store, host: str, cert_path: str, key_path: str) -> Certificate:
    """Store the certificate the router presents for host (replacing one it had): both files
    PEM, the key the certificate's."""
    Certificate(host, "", "")  # the host is checked before any file is read
    try:
        with open(cert_path) as f:
            cert = f.read()
        with open(key_path) as f:
            key = f.read()
    except (OSError, UnicodeDecodeError, ValueError) as err:  # ValueError: a NUL in a path
        raise ValidationError(f"cannot read the certificate or key: {err}") from None
    certificate = Certificate(host, cert, key, created_at=time.time())
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert_path, key_path)
    except ssl.SSLError as err:
        raise ValidationError(
            f"invalid --cert {cert_path} / --key {key_path}: {err.reason or err}; give a PEM "
            "certificate and the PEM key it was made for"
        ) from None
    store.put(CERTIFICATE, host, certificate.to_dict())
    return certificate


def remove_certificate(store: Store, host: str) -> None:
    if not store.delete(CERTIFICATE, host):
        raise NotFoundError(f"no certificate for {host}; list them with: meshctl router cert ls")


# -- a route checked by HAProxy ----------------------------------------------------------------


def check_routes_with_haproxy(
    store: Store, service: Service, changes: Mapping[str, Any] | None = None
) -> None:
    """check_with_haproxy for a new service, or for `service` with an update's changes when
    they touch its routes (changes that do not make a valid service are left to
    update_service, which says what is wrong in its order)."""
    if changes is not None:
        if not set(changes) & ROUTE_FIELDS:
            return
        try:
            service = dataclasses.replace(service, **changes)
        except ValidationError:
            return
    check_with_haproxy(store, service)


def check_with_haproxy(store: Store, service: Service) -> None:
    """Refuse a service whose routes would make a configuration HAProxy refuses: the router's
    configuration with the service as it would be stored is checked with `haproxy -c` (where
    HAProxy is installed; every controller checks again before it loads one)."""
    from meshctl.router.desired import router_spec
    from meshctl.view import read_view

    if not service.hostnames or shutil.which(haproxy.HAPROXY) is None:
        return
    view = read_view(store)
    if view.router is None:
        return
    services = {s.id: s for s in view.services.values() if s.name != service.name}
    # The router reaches a service on its first network; a new one may not be stored yet.
    networks = service.networks or (NetworkAttachment(INGRESS),)
    services[service.id] = dataclasses.replace(service, networks=networks)
    spec = router_spec(dataclasses.replace(view, services=services), "")
    assert spec is not None
    with tempfile.TemporaryDirectory(prefix="meshctl-router-check-") as directory:
        files = RouterFiles(directory)
        pems = {
            c.host: f"{c.cert.rstrip()}\n{c.key.rstrip()}\n" for c in view.certificates.values()
        }
        haproxy.write_certificates(files, pems, crt_list(spec, files))
        path = os.path.join(directory, "haproxy.cfg")
        haproxy.write_private(path, render(spec, files))
        try:
            haproxy.check(path)
        except haproxy.RouterError as err:
            raise ValidationError(f"invalid route for service {service.name}: {err}") from None
