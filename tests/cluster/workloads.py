"""What the cluster tests run and ask, through the CLI of a node of the harness."""

from __future__ import annotations

import json
from typing import Any

from tests.cluster.harness import Cluster
from tests.kernel.mesh import wait_for

# An HTTP server answering with the task's hostname (its name): a real one, so a client never
# sees a reset from a server that closed before reading the request.
HTTP_SERVER = """
import http.server, socket
class Name(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = socket.gethostname().encode() + b"\\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("", 80), Name).serve_forever()
"""
HTTP = ["python3", "-c", HTTP_SERVER]


def nodes(cluster: Cluster, node: str = "node1") -> dict[str, dict[str, Any]]:
    shown = json.loads(cluster.cli("node", "ls", "--format", "json", node=node).stdout)
    return {n["name"]: n for n in shown}


def live(cluster: Cluster, service: str, node: str = "node1") -> list[dict[str, Any]]:
    """The tasks that should run and do."""
    return [
        t
        for t in cluster.ps(service, node=node)
        if t["desired_state"] == "running" and t["state"] == "running"
    ]


def wait_live(cluster: Cluster, service: str, count: int, timeout: float = 30) -> list[Any]:
    def probe() -> list[dict[str, Any]] | None:
        tasks = live(cluster, service)
        return tasks if len(tasks) == count else None

    return wait_for(probe, timeout, f"{count} running tasks of {service}")  # type: ignore[no-any-return]


def web(cluster: Cluster, replicas: int, *options: str, name: str = "web") -> None:
    cluster.cli("network", "create", "front", check=False)
    cluster.cli("service", "create", "--name", name, "--replicas", str(replicas),
                "--network", "front", "-d", *options, "--", *HTTP)  # fmt: skip
