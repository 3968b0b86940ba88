"""Joining a cluster, as swarm does it: a joining node trusts a manager through the join
token, and the manager admits it with a certificate and store credentials of its own.

The joining node makes its key (it never leaves the node) and a certificate request. It asks a
manager's join endpoint (HTTPS, port 2377) for the cluster CA over a first, unverified
connection, and accepts it only if its digest is the one the token carries: a stranger in
between cannot pose as the cluster. Over a second connection, verified against that CA, it
sends the token, its name, its address and its request. The manager checks the token's secret
against the current one of its role (a rotated token is refused), refuses a name the cluster
knows, signs the request (the identity is the manager's to decide: name and role in the
certificate's SAN) and creates the node's store user, with a fresh password and the role's
permissions. The answer carries the certificate, the CA, the store's endpoints and the
password; the node keeps them 0600 in its state directory (config.py). A manager also gets
what managers share, the CA's key and the store's root password (swarm's managers share the
root CA through Raft), and a seat in the store: it is added as a learner, and is given the
members' peer URLs to start its own member with.
"""

from __future__ import annotations

import dataclasses
import hmac
import http.server
import json
import logging
import os
import secrets
import ssl
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import requests
import urllib3

from meshctl.cluster import config as cluster_config
from meshctl.cluster import pki
from meshctl.cluster.tokens import Token, parse_token
from meshctl.model import MeshctlError

log = logging.getLogger("meshctl.join")

TIMEOUT = 10.0
# A manager's answer to a join may take a while: it adds the node's store user (etcd hashes
# the password with bcrypt) and, for a manager, a member, waiting up to RECONFIG_WAIT (15 s)
# for etcd to allow that. A join given up too early cannot simply be asked again.
ADMIT_TIMEOUT = 120.0
MAX_BODY = 64 * 1024


class JoinRefused(MeshctlError):
    """The manager refused the join; status is the HTTP status it answers with."""

    def __init__(self, message: str, status: int = 403) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Admission:
    """What a node is given when it is admitted. A manager is also given what managers share
    (the CA's key, the store's root password) and its place among the store's members: their
    peer URLs by name, itself included (added as a learner), and its member id."""

    role: str
    cert: bytes
    ca: bytes
    store: tuple[str, ...]
    prefix: str
    password: str
    ca_key: bytes = b""
    root_password: str = ""
    members: dict[str, str] = field(default_factory=dict)
    member_id: int = 0
    cert_days: float = cluster_config.CERT_DAYS


@dataclass(frozen=True)
class StoreSeat:
    """A new manager's seat in the store: its member id, the members' peer URLs by name (its
    own included) and every member's client endpoint (HOST:PORT)."""

    member_id: int
    members: dict[str, str]
    clients: tuple[str, ...]


@dataclass
class Authority:
    """What a manager needs to admit a node: the CA, the store's endpoints, the current token of
    each role (role → token text, or None), a way to tell a known node and to add a store user
    (node, password, role)."""

    ca_cert: bytes
    ca_key: bytes
    store: Callable[[], tuple[str, ...]]  # the members' client endpoints now
    prefix: str
    current_token: Callable[[str], str | None]
    known: Callable[[str], bool]
    add_user: Callable[[str, str, str], None]
    # A manager's extras: the root password, and a seat in the store (node, address).
    root_password: Callable[[], str] = lambda: ""
    add_member: Callable[[str, str], StoreSeat] | None = None
    cert_days: float = cluster_config.CERT_DAYS

    def admit(self, request: dict[str, Any]) -> Admission:
        """Check a join request and admit its node, or raise JoinRefused with one line."""
        try:
            token = parse_token(str(request.get("token", "")))
            node = str(request["node"])
            address = str(request["address"])
            csr = str(request["csr"]).encode()
        except (KeyError, MeshctlError) as err:
            why = f"a join needs a valid token, node, address and csr ({err})"
            raise JoinRefused(why, 400) from None
        if token.ca_digest != pki.ca_digest(self.ca_cert):
            raise JoinRefused("the token is for another cluster (its CA digest differs)")
        if not _same_secret(token, self.current_token(token.role)):
            raise JoinRefused(f"the {token.role} join token is wrong or was rotated")
        if self.known(node):
            raise JoinRefused(
                f"node {node} is in the cluster already: remove it first (meshctl node rm "
                f"{node}), or join with another --node",
                409,
            )
        cert = pki.issue(
            self.ca_cert, self.ca_key, csr, node=node, role=token.role, addresses=[address],
            days=self.cert_days,
        )  # fmt: skip
        password = secrets.token_urlsafe(24)
        self.add_user(node, password, token.role)
        log.info("node %s joined as a %s from %s", node, token.role, address)
        admitted = Admission(token.role, cert, self.ca_cert, self.store(), self.prefix, password)
        if token.role != "manager" or self.add_member is None:
            return admitted
        seat = self.add_member(node, address)
        return dataclasses.replace(
            admitted, store=seat.clients, ca_key=self.ca_key, root_password=self.root_password(),
            members=seat.members, member_id=seat.member_id, cert_days=self.cert_days,
        )  # fmt: skip

    def renew(self, peer_cert: bytes, csr: bytes) -> bytes:
        """A new certificate for a member that presented its current one (verified against the
        CA by TLS): the same node, role and addresses; refused once the node was removed."""
        node, role = pki.identity(peer_cert)
        if not self.known(node):
            raise JoinRefused(f"node {node} was removed from the cluster")
        addresses = pki.ip_addresses(peer_cert)
        return pki.issue(self.ca_cert, self.ca_key, csr, node=node, role=role,
                         addresses=addresses, days=self.cert_days)  # fmt: skip


def _same_secret(token: Token, current: str | None) -> bool:
    if current is None:
        return False
    try:
        stored = parse_token(current)
    except MeshctlError:
        return False
    return stored.role == token.role and hmac.compare_digest(stored.secret, token.secret)


# -- the manager's endpoint ---------------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    server: JoinServer

    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        if self.path == "/v1/ca":
            self._send(200, self.server.authority.ca_cert, "application/x-pem-file")
        else:
            self._send(404, b"not found\n", "text/plain")

    def do_POST(self) -> None:  # noqa: N802
        if self.path == "/v1/renew":
            self._renew()
            return
        if self.path != "/v1/join":
            self._send(404, b"not found\n", "text/plain")
            return
        try:
            length = int(self.headers.get("Content-Length", "0"))
            if not 0 < length <= MAX_BODY:
                raise JoinRefused("a join request is a small JSON body", 400)
            admitted = self.server.authority.admit(json.loads(self.rfile.read(length)))
        except JoinRefused as err:
            self._send(err.status, json.dumps({"error": str(err)}).encode(), "application/json")
            return
        except (ValueError, MeshctlError) as err:
            self._send(400, json.dumps({"error": str(err)}).encode(), "application/json")
            return
        body = {
            "role": admitted.role,
            "cert": admitted.cert.decode(),
            "ca": admitted.ca.decode(),
            "store": list(admitted.store),
            "prefix": admitted.prefix,
            "password": admitted.password,
            "ca_key": admitted.ca_key.decode(),
            "root_password": admitted.root_password,
            "members": admitted.members,
            "member_id": admitted.member_id,
            "cert_days": admitted.cert_days,
        }
        self._send(200, json.dumps(body).encode(), "application/json")

    def _renew(self) -> None:
        peer = self.connection.getpeercert(binary_form=True)
        try:
            if not peer:
                raise JoinRefused("renewing needs the node's current certificate", 401)
            length = int(self.headers.get("Content-Length", "0"))
            if not 0 < length <= MAX_BODY:
                raise JoinRefused("a renewal is a small JSON body", 400)
            csr = str(json.loads(self.rfile.read(length))["csr"]).encode()
            cert = self.server.authority.renew(ssl.DER_cert_to_PEM_cert(peer).encode(), csr)
        except JoinRefused as err:
            self._send(err.status, json.dumps({"error": str(err)}).encode(), "application/json")
            return
        except (KeyError, ValueError, MeshctlError) as err:
            self._send(400, json.dumps({"error": str(err)}).encode(), "application/json")
            return
        self._send(200, json.dumps({"cert": cert.decode()}).encode(), "application/json")

    def _send(self, status: int, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's name
        return  # requests carry secrets: nothing of them goes to the log


class JoinServer(http.server.ThreadingHTTPServer):
    """The join endpoint of a manager, over TLS with the manager's certificate."""

    daemon_threads = True

    def __init__(
        self, address: tuple[str, int], authority: Authority, cert: str, key: str, ca: str = ""
    ):
        super().__init__(address, _Handler)
        self.authority = authority
        self.cert, self.key = cert, key
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.context.load_cert_chain(cert, key)
        if ca:  # a member renewing presents its certificate; a joining node has none yet
            self.context.verify_mode = ssl.CERT_OPTIONAL
            self.context.load_verify_locations(ca)
        self.socket = self.context.wrap_socket(self.socket, server_side=True)
        self._thread: threading.Thread | None = None

    def reload(self) -> None:
        """Serve the manager's renewed certificate to the next connections."""
        self.context.load_cert_chain(self.cert, self.key)

    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve_forever, name="join", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


# -- the joining node ---------------------------------------------------------------------------


def join(manager: str, token_text: str, node: str, address: str, state_dir: str) -> Admission:
    """Join the cluster through manager (HOST or HOST:PORT): verify it by the token, get admitted,
    and keep what was given in the state directory. MeshctlError with one line on any refusal."""
    token = parse_token(token_text)
    paths = cluster_config.ClusterPaths(state_dir)
    if cluster_config.load(state_dir) is not None:
        raise MeshctlError(f"this node is in a cluster already ({paths.config}): leave it first")
    host, _, port = manager.partition(":")
    base = f"https://{host}:{port or cluster_config.JOIN_PORT}"
    ca = _fetch_ca(base)
    if pki.ca_digest(ca) != token.ca_digest:
        raise MeshctlError(
            f"the cluster CA {host} presents is not the one the token names: a wrong address, "
            "a token of another cluster, or someone in between"
        )
    key = pki.make_key()
    request = {"token": token_text, "node": node, "address": address,
               "csr": pki.make_csr(key, node).decode()}  # fmt: skip
    with tempfile.NamedTemporaryFile(suffix=".crt") as ca_file:
        ca_file.write(ca)
        ca_file.flush()
        answer = _post(f"{base}/v1/join", request, ca_file.name)
    admitted = Admission(
        answer["role"], answer["cert"].encode(), answer["ca"].encode(),
        tuple(answer["store"]), answer["prefix"], answer["password"],
        answer.get("ca_key", "").encode(), answer.get("root_password", ""),
        dict(answer.get("members", {})), int(answer.get("member_id", 0)),
        float(answer.get("cert_days", cluster_config.CERT_DAYS)),
    )  # fmt: skip
    paths.make_dir()
    pki.write_public(paths.ca_cert, admitted.ca)
    pki.write_public(paths.cert, admitted.cert)
    pki.write_private(paths.key, key)
    pki.write_private(paths.password, admitted.password.encode())
    if admitted.role == "manager":
        pki.write_private(paths.ca_key, admitted.ca_key)
        pki.write_private(paths.root_password, admitted.root_password.encode())
    store = admitted.store
    if admitted.role == "manager":  # its own member first: it answers when others are away
        own = f"{address}:{cluster_config.CLIENT_PORT}"
        store = (own, *(e for e in store if e != own))
    cluster_config.save(
        state_dir,
        cluster_config.ClusterConfig(
            node,
            admitted.role,
            address,
            store,
            admitted.prefix,
            managers=(host,),
            cert_days=admitted.cert_days,
        ),  # fmt: skip
    )
    return admitted


def _fetch_ca(base: str) -> bytes:
    """The CA a manager presents, over TLS left unverified: the caller checks its digest."""
    with urllib3.warnings.catch_warnings():
        urllib3.warnings.simplefilter("ignore", urllib3.exceptions.InsecureRequestWarning)
        try:
            reply = requests.get(f"{base}/v1/ca", verify=False, timeout=TIMEOUT)  # noqa: S501
        except requests.RequestException as err:
            raise MeshctlError(f"cannot reach the manager's join endpoint {base}: {err}") from None
    if reply.status_code != 200:
        raise MeshctlError(f"{base} is no meshctl manager (HTTP {reply.status_code})")
    return reply.content


def _post(url: str, body: dict[str, Any], ca_file: str) -> dict[str, Any]:
    try:
        reply = requests.post(url, json=body, verify=ca_file, timeout=(TIMEOUT, ADMIT_TIMEOUT))
    except requests.exceptions.SSLError:
        raise MeshctlError(f"{url}: the manager's certificate does not match its address") from None
    except requests.RequestException as err:
        raise MeshctlError(f"cannot reach {url}: {err}") from None
    try:
        answer: dict[str, Any] = reply.json()
    except ValueError:
        answer = {}
    if reply.status_code != 200:
        raise MeshctlError(f"the manager refused the join: {answer.get('error', reply.reason)}")
    return answer


def renew_through(manager: str, paths: cluster_config.ClusterPaths) -> bytes:
    """A new certificate for this node's key, signed by the manager at manager (HOST:PORT),
    which knows the node by its current certificate."""
    with open(paths.key, "rb") as f:
        key = f.read()
    with open(paths.cert, "rb") as f:
        node, _ = pki.identity(f.read())
    try:
        reply = requests.post(
            f"https://{manager}/v1/renew", json={"csr": pki.make_csr(key, node).decode()},
            verify=paths.ca_cert, cert=(paths.cert, paths.key), timeout=TIMEOUT,
        )  # fmt: skip
    except requests.RequestException as err:
        raise MeshctlError(f"cannot renew the certificate through {manager}: {err}") from None
    try:
        answer: dict[str, Any] = reply.json()
    except ValueError:
        answer = {}
    if reply.status_code != 200:
        why = answer.get("error", reply.reason)
        raise MeshctlError(f"{manager} refused to renew the certificate: {why}")
    return str(answer["cert"]).encode()


def remove_membership(state_dir: str) -> None:
    """Forget the cluster on this node (after `cluster leave` or a failed join)."""
    paths = cluster_config.ClusterPaths(state_dir)
    for name in ("cluster.json", "node.crt", "node.key", "password", "ca.crt", "ca.key",
                 "root-password"):  # fmt: skip
        try:
            os.unlink(paths.file(name))
        except FileNotFoundError:
            continue
