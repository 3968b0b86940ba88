"""An etcd server of a test's own: Debian's etcd-server on a free loopback port (or on an
address inside a namespace the test made), its data in a temporary directory, stopped and
removed by close() — also when the test failed. Tests, benches and the cluster harness share it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence

ETCD = shutil.which("etcd") or "/usr/bin/etcd"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EtcdServer:
    """One etcd member. netns: the namespace to run it in (None: this one); address: where it
    listens (loopback by default); data_dir: an existing directory for its data and log (None:
    a temporary one)."""

    def __init__(
        self,
        *,
        address: str = "127.0.0.1",
        client_port: int | None = None,
        peer_port: int | None = None,
        netns: str | None = None,
        name: str = "meshctl-test",
        data_dir: str | None = None,
    ) -> None:
        if not os.path.exists(ETCD):
            raise RuntimeError("etcd is not installed: apt-get install etcd-server")
        self.address = address
        self.client_port = client_port or free_port()
        self.peer_port = peer_port or free_port()
        self.netns = netns
        self.name = name
        # A data dir the caller gives stays the caller's to remove; one made here goes in close().
        self._own_dir = data_dir is None
        self.data_dir = data_dir or tempfile.mkdtemp(prefix="meshctl-etcd-")
        self.log_path = os.path.join(self.data_dir, "etcd.log")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"{self.address}:{self.client_port}"

    def url(self, prefix: str = "") -> str:
        """The --store URL of this server, keys under prefix (default: meshctl's)."""
        return f"etcd://{self.endpoint}{prefix}"

    def _argv(self) -> Sequence[str]:
        client = f"http://{self.address}:{self.client_port}"
        peer = f"http://{self.address}:{self.peer_port}"
        argv = [
            ETCD, "--name", self.name, "--data-dir", os.path.join(self.data_dir, "data"),
            "--listen-client-urls", client, "--advertise-client-urls", client,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"{self.name}={peer}",
            "--heartbeat-interval", "50", "--election-timeout", "500",
            "--logger", "zap", "--log-outputs", "stderr",
        ]  # fmt: skip
        if self.netns is not None:
            argv = ["nsenter", f"--net=/run/netns/{self.netns}", "--", *argv]
        return argv

    def start(self, timeout: float = 20.0) -> EtcdServer:
        """Start etcd and wait until it serves requests."""
        assert self.process is None or self.process.poll() is not None, "already running"
        with open(self.log_path, "ab") as log:
            # Its own session: a terminal's Ctrl-C or hangup does not stop a cluster's store.
            self.process = subprocess.Popen(
                self._argv(), stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"etcd exited at start; its log: {self.log_tail()}")
            if self._healthy():
                return self
            time.sleep(0.1)
        raise RuntimeError(f"etcd did not answer within {timeout}s; its log: {self.log_tail()}")

    def _healthy(self) -> bool:
        import requests

        try:
            if self.netns is None:
                return requests.get(f"http://{self.endpoint}/health", timeout=1).ok
            probe = subprocess.run(
                ["nsenter", f"--net=/run/netns/{self.netns}", "--", "curl", "-sf",
                 f"http://{self.endpoint}/health"],
                capture_output=True, timeout=5, check=False,
            )  # fmt: skip
            return probe.returncode == 0
        except (requests.RequestException, subprocess.TimeoutExpired):
            return False

    def clear(self, prefix: str) -> None:
        """Delete every key under prefix: keys a test left under a lease would otherwise
        expire during a later test and move the revision, which etcd shares across prefixes."""
        import base64

        import requests

        raw = prefix.encode()
        body = {
            "key": base64.b64encode(raw).decode(),
            "range_end": base64.b64encode(raw[:-1] + bytes([raw[-1] + 1])).decode(),
        }
        requests.post(f"http://{self.endpoint}/v3/kv/deleterange", json=body, timeout=10)

    def stop(self) -> None:
        """Stop etcd (its data stays: start() again brings the same store back)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def log_tail(self, lines: int = 20) -> str:
        try:
            with open(self.log_path, errors="replace") as log:
                return "".join(log.readlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def __enter__(self) -> EtcdServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
