"""What a node remembers of its cluster, in its state directory, so that no command after
`cluster init` or `cluster join` needs --store:

    <state dir>/cluster/cluster.json   this node's name, role and address; the store's endpoints
    <state dir>/cluster/ca.crt         the cluster CA's certificate
    <state dir>/cluster/node.crt       this node's certificate, node.key its key (0600)
    <state dir>/cluster/password       this node's store password (0600)
    <state dir>/cluster/ca.key         managers only: the CA's key (0600), to sign joining nodes
    <state dir>/cluster/root-password  managers only: the store's root password (0600)
    <state dir>/cluster/etcd/          managers only: the node's etcd member

The directory is 0700. Files are written whole (pki.write_private), so a crash never leaves
half a key.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

from meshctl.model import MeshctlError

CLUSTER_DIR = "cluster"
CONFIG_FILE = "cluster.json"
JOIN_PORT = 2377  # swarm's: where managers take joining nodes
CLIENT_PORT = 2379
PEER_PORT = 2380
ROLES = ("manager", "worker")
CERT_DAYS = 90.0  # swarm's default certificate expiry


@dataclass(frozen=True)
class ClusterConfig:
    """This node in its cluster. store: the etcd client endpoints (HOST:PORT), managers' first."""

    node: str
    role: str
    address: str
    store: tuple[str, ...] = ()
    prefix: str = "/meshctl"
    join_port: int = JOIN_PORT
    managers: tuple[str, ...] = field(default=())  # the managers' addresses, for joins
    cert_days: float = CERT_DAYS  # how long the certificates a manager signs are valid

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise MeshctlError(f"role {self.role!r}: a node is a manager or a worker")


@dataclass(frozen=True)
class ClusterPaths:
    """The files of a node's cluster membership under one state directory."""

    state_dir: str

    @property
    def dir(self) -> str:
        return os.path.join(self.state_dir, CLUSTER_DIR)

    def file(self, name: str) -> str:
        return os.path.join(self.dir, name)

    @property
    def config(self) -> str:
        return self.file(CONFIG_FILE)

    @property
    def ca_cert(self) -> str:
        return self.file("ca.crt")

    @property
    def ca_key(self) -> str:
        return self.file("ca.key")

    @property
    def cert(self) -> str:
        return self.file("node.crt")

    @property
    def key(self) -> str:
        return self.file("node.key")

    @property
    def password(self) -> str:
        return self.file("password")

    @property
    def root_password(self) -> str:
        return self.file("root-password")

    @property
    def etcd_dir(self) -> str:
        return self.file("etcd")

    def make_dir(self) -> None:
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        os.chmod(self.dir, 0o700)


def load(state_dir: str) -> ClusterConfig | None:
    """This node's cluster, or None if it is in none (a single node on SQLite, or --store)."""
    try:
        with open(ClusterPaths(state_dir).config) as f:
            raw = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise MeshctlError(f"{ClusterPaths(state_dir).config}: unreadable ({err})") from None
    for key in ("store", "managers"):
        raw[key] = tuple(raw.get(key, ()))
    return ClusterConfig(**raw)


def save(state_dir: str, config: ClusterConfig) -> None:
    paths = ClusterPaths(state_dir)
    paths.make_dir()
    temp = paths.config + ".new"
    with open(temp, "w") as f:
        json.dump(asdict(config), f, indent=2)
        f.write("\n")
    os.replace(temp, paths.config)


def read_secret(path: str) -> str:
    with open(path) as f:
        return f.read().strip()
