"""A node's router as HAProxy configuration: pure text from a RouterSpec.

HAProxy runs master-worker: a reload starts a new worker that takes over the listening
sockets from the old one (the master hands them over), while the old worker finishes the
requests and tunnels (websockets) it holds, for at most OLD_WORKER_GRACE.

- `http` on the HTTP port: routes by Host header (case-insensitive, port ignored), sets
  X-Forwarded-For, X-Forwarded-Proto and Forwarded; a host no route matches gets 503 with
  one line naming it.
- `https` on the HTTPS port, TCP: a passthrough route's connections go, by their SNI, to its
  tasks untouched; every other connection goes on through a unix socket (PROXY protocol
  keeps the client's address) to `https-terminated`, which terminates TLS with the
  certificate the SNI names (crt-list) and routes as `http` does.
- A backend per service port, with server slots (s1, s2...; the unused ones empty and
  disabled) that the runtime API fills, drains and empties without a reload
  (meshctl.router.slots); a sticky backend's cookie is derived from the server's address and
  the router's cookie key (HAProxy's dynamic cookies), so it holds on every node and across
  reloads.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

from meshctl.router.spec import Backend, HttpRoute, RouterSpec

MIN_SLOTS = 8
EMPTY_ADDRESS = "0.0.0.0"  # an unused slot's address
NO_ROUTE_BACKEND = "meshctl-no-route"
TERMINATE_BACKEND = "meshctl-terminate"
REJECT_BACKEND = "meshctl-reject"
OLD_WORKER_GRACE = "60s"  # a reloaded-away worker's requests and tunnels end by then
HEADER = "# meshctl router "  # + the spec's fingerprint: what a reload last loaded


@dataclass(frozen=True)
class RouterFiles:
    """Where a node's router keeps its files: all in one directory of the state dir."""

    directory: str

    def _at(self, name: str) -> str:
        return os.path.join(self.directory, name)

    @property
    def config(self) -> str:
        return self._at("haproxy.cfg")

    @property
    def admin_socket(self) -> str:
        return self._at("admin.sock")

    @property
    def master_socket(self) -> str:
        return self._at("master.sock")

    @property
    def tls_socket(self) -> str:
        """Where `https` hands connections to be terminated to `https-terminated`."""
        return self._at("tls.sock")

    @property
    def certificates(self) -> str:
        return self._at("certs")

    @property
    def crt_list(self) -> str:
        return self._at("certs.list")

    @property
    def process(self) -> str:
        """The master's pid and start time, for a restarted controller to adopt it."""
        return self._at("process.json")

    @property
    def log(self) -> str:
        return self._at("log")

    def certificate(self, host: str) -> str:
        """The PEM file (certificate, then key) of the certificate for host."""
        return os.path.join(self.certificates, host.replace("*", "_") + ".pem")


def slot_count(servers: int) -> int:
    """Slots a backend gets at a reload: room to double before the next reload is needed."""
    count = MIN_SLOTS
    while count < 2 * servers:
        count *= 2
    return count


def slot_name(index: int) -> str:
    return f"s{index}"


def fingerprint_of(text: str) -> str | None:
    """The fingerprint a rendered configuration carries in its first line, if any."""
    first = text.partition("\n")[0]
    return first.removeprefix(HEADER) if first.startswith(HEADER) else None


def render(spec: RouterSpec, files: RouterFiles) -> str:
    """haproxy.cfg for spec, its servers in the first slots of their backends."""
    return "\n".join(_lines(spec, files)) + "\n"


def crt_list(spec: RouterSpec, files: RouterFiles) -> str:
    """The crt-list: each certificate with the SNI it is chosen for; the first is the default."""
    return "".join(f"{files.certificate(host)} {host}\n" for host in spec.certificates)


def _lines(spec: RouterSpec, files: RouterFiles) -> Iterator[str]:
    yield f"{HEADER}{spec.fingerprint()}"
    yield "# Written by meshctl's controller from its store; edits here are overwritten."
    yield "global"
    yield "    master-worker"
    yield f"    stats socket {files.admin_socket} mode 600 level admin expose-fd listeners"
    yield f"    hard-stop-after {OLD_WORKER_GRACE}"
    yield ""
    yield "defaults"
    yield "    mode http"
    yield "    timeout connect 5s"
    yield "    timeout client 60s"
    yield "    timeout server 60s"
    yield "    timeout http-request 10s"
    yield "    timeout tunnel 1h"
    yield "    retries 3"
    yield "    option redispatch 1"
    yield ""
    yield "frontend http"
    yield f"    bind :{spec.http_port}"
    yield from _http_frontend(spec, "http")
    yield ""
    yield "frontend https"
    yield "    mode tcp"
    yield f"    bind :{spec.https_port}"
    yield "    tcp-request inspect-delay 5s"
    yield "    tcp-request content accept if { req.ssl_hello_type 1 }"
    for sni in spec.sni_routes:
        yield f"    use_backend {sni.backend} if {{ req.ssl_sni,lower {_host_match(sni.host)} }}"
    yield f"    default_backend {TERMINATE_BACKEND if spec.certificates else REJECT_BACKEND}"
    yield ""
    if spec.certificates:
        yield "frontend https-terminated"
        yield f"    bind unix@{files.tls_socket} accept-proxy ssl crt-list {files.crt_list}"
        yield from _http_frontend(spec, "https")
        yield ""
        yield f"backend {TERMINATE_BACKEND}"
        yield "    mode tcp"
        yield f"    server terminate unix@{files.tls_socket} send-proxy-v2"
        yield ""
    yield f"backend {REJECT_BACKEND}"
    yield "    mode tcp"
    yield "    tcp-request content reject"
    yield ""
    yield f"backend {NO_ROUTE_BACKEND}"
    yield (
        "    http-request return status 503 content-type text/plain "
        'lf-string "no route for host %[var(txn.host)]\\n"'
    )
    for backend in spec.backends:
        yield ""
        yield from _backend(backend, spec.cookie_key)


def _http_frontend(spec: RouterSpec, proto: str) -> Iterator[str]:
    yield "    option forwardfor"
    yield "    http-request set-var(txn.host) req.hdr(host),field(1,:),lower"
    yield f"    http-request set-header X-Forwarded-Proto {proto}"
    yield f"    http-request add-header Forwarded for=%[src];proto={proto}"
    for route in spec.routes:
        yield f"    use_backend {route.backend} if {_route_condition(route)}"
    yield f"    default_backend {NO_ROUTE_BACKEND}"


def _host_match(host: str) -> str:
    """A sample's match against a route host: equal, or (for `*.NAME`) ending in `.NAME`."""
    return f"-m end {host[1:]}" if host.startswith("*.") else f"-m str {host}"


def _route_condition(route: HttpRoute) -> str:
    """HAProxy's condition for a route: the host, and the path `/api` itself or below it."""
    host = f"{{ var(txn.host) {_host_match(route.host)} }}"
    if route.path == "/":
        return host
    if route.path.endswith("/"):
        return f"{host} {{ path_beg {route.path} }}"
    return f"{host} {{ path {route.path} }} || {host} {{ path_beg {route.path}/ }}"


def _backend(backend: Backend, cookie_key: str) -> Iterator[str]:
    yield f"backend {backend.name}"
    yield f"    mode {backend.mode}"
    yield "    balance roundrobin"
    if backend.mode == "http":
        # A request that found its server gone is tried on another, if it is safe to repeat.
        yield "    retry-on conn-failure empty-response"
        yield "    http-request disable-l7-retry unless METH_GET"
    if backend.sticky:
        yield f"    cookie meshctl-{backend.service} insert indirect nocache dynamic"
        yield f"    dynamic-cookie-key {cookie_key}"
    servers = list(backend.servers)
    for index in range(1, slot_count(len(servers)) + 1):
        if index <= len(servers):
            server = servers[index - 1]
            state = "" if server.ready else " disabled"
            yield f"    server {slot_name(index)} {server.address}:{backend.port}{state}"
        else:
            yield f"    server {slot_name(index)} {EMPTY_ADDRESS}:{backend.port} disabled"
