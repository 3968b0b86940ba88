"""The controller's HTTP endpoints on one address (`--metrics-addr`, default 127.0.0.1:9323 as
dockerd's metrics address): /metrics for Prometheus, /healthz and /readyz as kube-proxy's.

The server runs in threads of its own, bound in the namespace the controller starts in (its
node), so a scrape never waits behind a pass: it reads counters and the liveness only.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST

from meshctl.controller.liveness import Liveness
from meshctl.controller.metrics import Metrics
from meshctl.model import MeshctlError, ValidationError

DEFAULT_ADDRESS = "127.0.0.1:9323"
ASK_INTERVAL = 0.5  # seconds between two questions of ask_health


def parse_address(text: str) -> tuple[str, int]:
    """HOST:PORT, [IPV6]:PORT or :PORT (every address) as (host, port); port 0: any free one."""
    host, colon, port = text.rpartition(":")
    problem = not colon or not (port.isascii() and port.isdigit()) or int(port) > 65535
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not problem and host:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            problem = True
    if problem:
        raise ValidationError(
            f"invalid --metrics-addr {text!r}: give IP:PORT like 127.0.0.1:9323, [::1]:9323 or "
            ":9323 (every address), or '' for no endpoint"
        )
    return host, int(port)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host: str, port: int, metrics: Metrics, liveness: Liveness) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.metrics = metrics
        self.liveness = liveness
        super().__init__((host or "0.0.0.0", port), _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, self.server.metrics.exposition(), CONTENT_TYPE_LATEST)
        elif path in ("/healthz", "/readyz"):
            liveness = self.server.liveness
            ok, why = liveness.health() if path == "/healthz" else liveness.ready()
            self._send(200 if ok else 503, (why or "ok").encode() + b"\n")
        else:
            self._send(404, b"not found: try /metrics, /healthz or /readyz\n")

    def _send(self, code: int, body: bytes, kind: str = "text/plain; charset=utf-8") -> None:
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base's name
        """Quiet: a scrape every few seconds is no news for the controller's log."""


class Endpoints:
    """Serves the endpoints from start() until stop()."""

    def __init__(self, address: str, metrics: Metrics, liveness: Liveness) -> None:
        self.host, self.port = parse_address(address)
        self.metrics = metrics
        self.liveness = liveness
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        try:
            self._server = _Server(self.host, self.port, self.metrics, self.liveness)
        except OSError as err:
            where = f"[{self.host}]" if ":" in self.host else self.host
            raise MeshctlError(
                f"cannot serve metrics on {where}:{self.port}: {err.strerror or err}; give "
                "another --metrics-addr, or --metrics-addr '' for none"
            ) from None
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="endpoints", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


def ask_health(address: str, ready: bool, wait: float) -> str:
    """Ask the controller serving on address whether it is healthy (/healthz) or ready
    (/readyz), again until wait seconds passed: its answer when it says so, else MeshctlError
    with the reason (`meshctl controller health`)."""
    host, port = parse_address(address)
    host = f"[{host}]" if ":" in host else host or "127.0.0.1"
    url = f"http://{host}:{port}/{'readyz' if ready else 'healthz'}"
    deadline = time.monotonic() + wait
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return str(response.read().decode().strip())
        except urllib.error.HTTPError as err:
            why = err.read().decode().strip() or f"HTTP {err.code}"
        except OSError as err:
            why = f"no controller answers on {url}: {getattr(err, 'reason', err)}"
        if time.monotonic() >= deadline:
            raise MeshctlError(f"{'not ready' if ready else 'unhealthy'}: {why}")
        time.sleep(ASK_INTERVAL)
