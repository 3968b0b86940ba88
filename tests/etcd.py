"""An etcd server of a test's own: Debian's etcd-server on a free loopback port (or on an
address inside a namespace the test made), its data in a temporary directory, stopped and
removed by close() — also when the test failed. Tests, benches and the cluster harness share it.

With an EtcdTls it serves clients over TLS only and wants a client certificate signed by the
CA (#26); enable_auth() then turns etcd's users on, with a root user this class keeps for its
own requests (health, clear, users and roles).
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
from dataclasses import dataclass
from typing import Any

ETCD = shutil.which("etcd") or "/usr/bin/etcd"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class EtcdTls:
    """Files of a TLS etcd: the CA its clients must be signed by, its own certificate and key
    (which must name its address), and a client certificate for the server's own requests
    (default: its own certificate, which pki makes for both uses)."""

    ca: str
    cert: str
    key: str
    client_cert: str = ""
    client_key: str = ""

    @property
    def client(self) -> tuple[str, str]:
        return (self.client_cert or self.cert, self.client_key or self.key)


class EtcdServer:
    """One etcd member. netns: the namespace to run it in (None: this one); address: where it
    listens (loopback by default); data_dir: an existing directory for its data and log (None:
    a temporary one); tls: TLS with client certificates (None: plain HTTP); extra: more flags
    (like --auth-token-ttl)."""

    def __init__(
        self,
        *,
        address: str = "127.0.0.1",
        client_port: int | None = None,
        peer_port: int | None = None,
        netns: str | None = None,
        name: str = "meshctl-test",
        data_dir: str | None = None,
        tls: EtcdTls | None = None,
        extra: Sequence[str] = (),
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
        self.tls = tls
        self.extra = list(extra)
        self._root_password: str | None = None  # set by enable_auth

    @property
    def endpoint(self) -> str:
        return f"{self.address}:{self.client_port}"

    @property
    def base(self) -> str:
        """The client URL: http:// or https://."""
        return f"{'https' if self.tls else 'http'}://{self.endpoint}"

    def url(self, prefix: str = "") -> str:
        """The --store URL of this server, keys under prefix (default: meshctl's)."""
        return f"{'https' if self.tls else 'etcd'}://{self.endpoint}{prefix}"

    def _argv(self) -> Sequence[str]:
        client = self.base
        peer = f"http://{self.address}:{self.peer_port}"
        argv = [
            ETCD, "--name", self.name, "--data-dir", os.path.join(self.data_dir, "data"),
            "--listen-client-urls", client, "--advertise-client-urls", client,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"{self.name}={peer}",
            "--heartbeat-interval", "50", "--election-timeout", "500",
            "--logger", "zap", "--log-outputs", "stderr",
        ]  # fmt: skip
        if self.tls is not None:
            argv += [
                "--cert-file", self.tls.cert, "--key-file", self.tls.key,
                "--client-cert-auth", "--trusted-ca-file", self.tls.ca,
            ]  # fmt: skip
        argv += self.extra
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
                return requests.get(f"{self.base}/health", timeout=1, **self._tls_args()).ok
            curl_tls = []
            if self.tls is not None:
                cert, key = self.tls.client
                curl_tls = ["--cacert", self.tls.ca, "--cert", cert, "--key", key]
            probe = subprocess.run(
                ["nsenter", f"--net=/run/netns/{self.netns}", "--", "curl", "-sf", *curl_tls,
                 f"{self.base}/health"],
                capture_output=True, timeout=5, check=False,
            )  # fmt: skip
            return probe.returncode == 0
        except (requests.RequestException, subprocess.TimeoutExpired):
            return False

    def clear(self, prefix: str) -> None:
        """Delete every key under prefix: keys a test left under a lease would otherwise
        expire during a later test and move the revision, which etcd shares across prefixes."""
        self.post("/v3/kv/deleterange", {"key": _b64(prefix), "range_end": _prefix_end(prefix)})

    # -- requests of its own, and users ----------------------------------------------------------

    def _tls_args(self) -> dict[str, Any]:
        if self.tls is None:
            return {}
        return {"verify": self.tls.ca, "cert": self.tls.client}

    def post(self, path: str, body: dict[str, Any], *, token: str | None = None) -> Any:
        """POST to the gateway as root once auth is on (or with token); raise on a refusal."""
        import requests

        headers = {}
        if token is None and self._root_password is not None:
            token = self.login("root", self._root_password)
        if token:
            headers["Authorization"] = token
        url = f"{self.base}{path}"
        response = requests.post(url, json=body, headers=headers, timeout=10, **self._tls_args())
        if response.status_code != 200:
            raise RuntimeError(f"etcd {path}: {response.status_code} {response.text.strip()}")
        return response.json()

    def login(self, user: str, password: str) -> str:
        """A token of user (POST /v3/auth/authenticate)."""
        body = {"name": user, "password": password}
        return str(self.post("/v3/auth/authenticate", body, token="")["token"])

    def enable_auth(self, root_password: str) -> None:
        """Turn etcd's users on: a root user with the root role first, as etcd requires."""
        self.post("/v3/auth/user/add", {"name": "root", "password": root_password})
        self.post("/v3/auth/user/grant", {"user": "root", "role": "root"})
        self.post("/v3/auth/enable", {})
        self._root_password = root_password

    def add_user(self, user: str, password: str, prefix: str) -> None:
        """A user with a role of its own name that may read and write keys under prefix."""
        perm = {"permType": "READWRITE", "key": _b64(prefix), "range_end": _prefix_end(prefix)}
        self.post("/v3/auth/user/add", {"name": user, "password": password})
        self.post("/v3/auth/role/add", {"name": user})
        self.post("/v3/auth/role/grant", {"name": user, "perm": perm})
        self.post("/v3/auth/user/grant", {"user": user, "role": user})

    def delete_user(self, user: str) -> None:
        """Remove a user: etcd drops its tokens at once."""
        self.post("/v3/auth/user/delete", {"name": user})

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


def _b64(text: str) -> str:
    import base64

    return base64.b64encode(text.encode()).decode()


def _prefix_end(prefix: str) -> str:
    """The first key after every key that starts with prefix, base64 (etcd's prefix range)."""
    import base64

    raw = prefix.encode()
    return base64.b64encode(raw[:-1] + bytes([raw[-1] + 1])).decode()


class TestCa:
    """A cluster CA of a test's own in directory (meshctl.cluster.pki's), which signs etcd's
    certificate and its clients'. Not a test class, whatever pytest's name rule says."""

    __test__ = False

    def __init__(self, directory: str) -> None:
        from meshctl.cluster import pki

        self.directory = directory
        self._cert, self._key = pki.make_ca()
        self.path = self._write("ca.pem", self._cert)

    def _write(self, name: str, data: bytes) -> str:
        from meshctl.cluster import pki

        path = os.path.join(self.directory, name)
        pki.write_private(path, data)
        return path

    def node(self, name: str, addresses: Sequence[str] = ()) -> tuple[str, str]:
        """A node certificate and key signed by this CA, as files: (cert path, key path)."""
        from meshctl.cluster import pki

        cert, key = pki.make_node_cert(
            self._cert, self._key, node=name, role="manager", addresses=addresses
        )
        return self._write(f"{name}.pem", cert), self._write(f"{name}.key", key)

    def server_tls(self, address: str = "127.0.0.1") -> EtcdTls:
        """The files of an etcd at address that trusts this CA's clients."""
        cert, key = self.node("etcd", [address])
        return EtcdTls(self.path, cert, key)
