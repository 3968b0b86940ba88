"""What one node's router does, as plain values: its routes, backends and servers.

Built from the cluster view by meshctl.router.desired; rendered into haproxy.cfg by
meshctl.router.config. Each service with routes gets a backend per target port: HTTP
(`web.80`), or TCP for TLS passthrough (`web.443.passthrough`). Routes are kept in the order
HAProxy must try them, first match wins (route_order).
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Literal

from meshctl.model import Route, Service

BackendMode = Literal["http", "tcp"]


@dataclass(frozen=True, order=True)
class Server:
    """A task behind a backend: its address, and whether it takes new requests."""

    address: str
    ready: bool = True


@dataclass(frozen=True)
class Backend:
    """One service port the router sends to; `servers` sorted by address."""

    name: str
    service: str
    port: int
    mode: BackendMode = "http"
    sticky: bool = False
    servers: tuple[Server, ...] = ()


@dataclass(frozen=True)
class HttpRoute:
    """Requests for host (`*.NAME`: any name below NAME) under path go to backend."""

    host: str
    path: str
    backend: str


@dataclass(frozen=True)
class SniRoute:
    """TLS connections whose server name (SNI) is host go, untouched, to backend."""

    host: str
    backend: str


@dataclass(frozen=True)
class RouterSpec:
    """A node's router: its ports, routes in the order they are tried, backends, and the
    hosts it has certificates for (in the order HAProxy lists them: the first is the default
    for a client that names none it knows)."""

    http_port: int
    https_port: int
    cookie_key: str
    routes: tuple[HttpRoute, ...] = ()
    sni_routes: tuple[SniRoute, ...] = ()
    backends: tuple[Backend, ...] = ()
    certificates: tuple[str, ...] = ()
    certificate_digest: str = ""  # changes with any certificate's content

    def without_servers(self) -> RouterSpec:
        """What only a reload changes: everything but the servers."""
        return dataclasses.replace(
            self, backends=tuple(dataclasses.replace(b, servers=()) for b in self.backends)
        )

    def fingerprint(self) -> str:
        """A short digest of without_servers(): equal digests, no reload needed."""
        return hashlib.sha256(repr(self.without_servers()).encode()).hexdigest()[:16]


def backend_name(route: Route, service: Service) -> str:
    suffix = ".passthrough" if route.tls == "passthrough" else ""
    return f"{service.name}.{route.port}{suffix}"


def route_order(host: str, path: str) -> tuple[int, int, str, int, str]:
    """Sort key: exact hosts first, then wildcards by decreasing length; within a host,
    longer paths first."""
    wildcard = host.startswith("*.")
    return (int(wildcard), -len(host) if wildcard else 0, host, -len(path), path)
