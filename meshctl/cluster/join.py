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

A member that presents its current certificate (verified against the CA) may also renew it
(/v1/renew), take a manager's seat once the store made it a manager (/v1/promote, after `node
promote`), or leave as a worker (/v1/leave). Its role is always the store's (its etcd user's
roles, which only root changes), never what its certificate says.
"""

from __future__ import annotations

import dataclasses
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
from meshctl.cluster.tokens import check_ca, parse_token, same_secret
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
    # A member's role as the store has it (its etcd user's; None once removed), and how a
    # manager retires a worker that leaves (its user and role, then its record).
    role_of: Callable[[str], str | None] = lambda node: None
    retire: Callable[[str], None] | None = None

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
        if not same_secret(token, self.current_token(token.role)):
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
        return self._seated(admitted, node, address)

    def _seated(self, admitted: Admission, node: str, address: str) -> Admission:
        """A manager's admission: what managers share, and a seat in the store (a learner)."""
        assert self.add_member is not None
        seat = self.add_member(node, address)
        return dataclasses.replace(
            admitted, store=seat.clients, ca_key=self.ca_key, root_password=self.root_password(),
            members=seat.members, member_id=seat.member_id, cert_days=self.cert_days,
        )  # fmt: skip

    def _member_role(self, peer_cert: bytes) -> tuple[str, str]:
        """The (node, role) of a member that presented its certificate (verified against the
        CA by TLS): the role the store gives it now, whatever the certificate says."""
        node, _ = pki.identity(peer_cert)
        role = self.role_of(node)
        if role is None or not self.known(node):
            raise JoinRefused(f"node {node} was removed from the cluster")
        return node, role

    def renew(self, peer_cert: bytes, csr: bytes) -> bytes:
        """A new certificate for a member: the same node and addresses, its role now (a node
        promoted or demoted since gets its new one); refused once the node was removed."""
        node, role = self._member_role(peer_cert)
        addresses = pki.ip_addresses(peer_cert)
        return pki.issue(self.ca_cert, self.ca_key, csr, node=node, role=role,
                         addresses=addresses, days=self.cert_days)  # fmt: skip

    def seat(self, peer_cert: bytes, csr: bytes) -> Admission:
        """A promoted worker's manager admission: a manager's certificate, what managers share
        and a seat in the store. Refused unless the store made it a manager (`node promote`)."""
        node, role = self._member_role(peer_cert)
        if role != "manager" or self.add_member is None:
            raise JoinRefused(f"node {node} is not a manager: meshctl node promote {node} first")
        addresses = pki.ip_addresses(peer_cert)
        cert = pki.issue(self.ca_cert, self.ca_key, csr, node=node, role=role,
                         addresses=addresses, days=self.cert_days)  # fmt: skip
        log.info("node %s takes its seat among the managers", node)
        admitted = Admission(role, cert, self.ca_cert, self.store(), self.prefix, "")
        return self._seated(admitted, node, addresses[0])

    def leave(self, peer_cert: bytes) -> dict[str, Any]:
        """A worker leaves: its user and role go, then its record (the answer: nothing more).
        A manager is demoted first."""
        node, role = self._member_role(peer_cert)
        if self.retire is None:
            raise JoinRefused("this endpoint retires no node", 404)
        if role == "manager":
            raise JoinRefused(
                f"node {node} is a manager: demote it first (meshctl node demote {node}), or "
                "leave with --force",
                409,
            )
        self.retire(node)
        log.info("node %s left the cluster", node)
        return {}


# -- the manager's endpoint ---------------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    server: JoinServer

    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        if self.path == "/v1/ca":
            self._send(200, self.server.authority.ca_cert, "application/x-pem-file")
        else:
            self._send(404, b"not found\n", "text/plain")

    def do_POST(self) -> None:  # noqa: N802
        authority = self.server.authority
        handlers: dict[str, Callable[[bytes, dict[str, Any]], dict[str, Any]]] = {
            "/v1/renew": lambda peer, body: {"cert": authority.renew(peer, _csr(body)).decode()},
            "/v1/promote": lambda peer, body: admission_body(authority.seat(peer, _csr(body))),
            "/v1/leave": lambda peer, body: authority.leave(peer),
        }
        if self.path in handlers:
            self._answer(lambda body: handlers[self.path](self._peer(), body))
        elif self.path == "/v1/join":
            self._answer(lambda body: admission_body(authority.admit(body)))
        else:
            self._send(404, b"not found\n", "text/plain")

    def _peer(self) -> bytes:
        """The certificate the member presented (TLS verified it against the CA), PEM."""
        peer = self.connection.getpeercert(binary_form=True)
        if not peer:
            raise JoinRefused("this request needs the node's current certificate", 401)
        return ssl.DER_cert_to_PEM_cert(peer).encode()

    def _answer(self, handle: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        """Read a small JSON body, handle it, and answer JSON: 200, or the refusal in one line."""
        try:
            length = int(self.headers.get("Content-Length", "0"))
            if not 0 < length <= MAX_BODY:
                raise JoinRefused("a request here is a small JSON body", 400)
            body = json.loads(self.rfile.read(length))
            if not isinstance(body, dict):
                raise JoinRefused("a request here is a JSON object", 400)
            answer = handle(body)
        except JoinRefused as err:
            self._send(err.status, json.dumps({"error": str(err)}).encode(), "application/json")
            return
        except (KeyError, ValueError, MeshctlError) as err:
            self._send(400, json.dumps({"error": str(err)}).encode(), "application/json")
            return
        self._send(200, json.dumps(answer).encode(), "application/json")

    def _send(self, status: int, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's name
        return  # requests carry secrets: nothing of them goes to the log


def _csr(body: dict[str, Any]) -> bytes:
    return str(body["csr"]).encode()


def admission_body(admitted: Admission) -> dict[str, Any]:
    """An admission as the join endpoint sends it (admission_of reads it back)."""
    body = dataclasses.asdict(admitted)
    for name in ("cert", "ca", "ca_key"):
        body[name] = body[name].decode()
    body["store"] = list(admitted.store)
    return body


def admission_of(answer: dict[str, Any]) -> Admission:
    """The admission in a join endpoint's answer."""
    return Admission(
        answer["role"], answer["cert"].encode(), answer["ca"].encode(),
        tuple(answer["store"]), answer["prefix"], answer["password"],
        answer.get("ca_key", "").encode(), answer.get("root_password", ""),
        dict(answer.get("members", {})), int(answer.get("member_id", 0)),
        float(answer.get("cert_days", cluster_config.CERT_DAYS)),
    )  # fmt: skip


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
    check_ca(token, pki.ca_digest(ca), host)
    key = pki.make_key()
    request = {"token": token_text, "node": node, "address": address,
               "csr": pki.make_csr(key, node).decode()}  # fmt: skip
    with tempfile.NamedTemporaryFile(suffix=".crt") as ca_file:
        ca_file.write(ca)
        ca_file.flush()
        answer = _post(f"{base}/v1/join", request, ca_file.name)
    admitted = admission_of(answer)
    paths.make_dir()
    pki.write_public(paths.ca_cert, admitted.ca)
    pki.write_public(paths.cert, admitted.cert)
    pki.write_private(paths.key, key)
    pki.write_private(paths.password, admitted.password.encode())
    if admitted.role == "manager":
        keep_managers_secrets(paths, admitted)
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


def keep_managers_secrets(paths: cluster_config.ClusterPaths, admitted: Admission) -> None:
    """Keep what managers share (the CA key, the store's root password), 0600."""
    pki.write_private(paths.ca_key, admitted.ca_key)
    pki.write_private(paths.root_password, admitted.root_password.encode())


def renew_through(manager: str, paths: cluster_config.ClusterPaths) -> bytes:
    """A new certificate for this node's key, signed by the manager at manager (HOST:PORT),
    which knows the node by its current certificate and gives it its role now."""
    answer = _ask_as_member(manager, paths, "/v1/renew", "renew the certificate")
    return str(answer["cert"]).encode()


def seat_through(manager: str, paths: cluster_config.ClusterPaths) -> Admission:
    """This promoted node's manager admission from the manager at manager (HOST:PORT): a
    manager's certificate for its key, what managers share, and its seat in the store."""
    return admission_of(_ask_as_member(manager, paths, "/v1/promote", "take a manager's seat"))


def leave_through(manager: str, paths: cluster_config.ClusterPaths) -> None:
    """Ask the manager at manager (HOST:PORT) to retire this worker: its user, then its record."""
    _ask_as_member(manager, paths, "/v1/leave", "leave the cluster", csr=False)


def _ask_as_member(
    manager: str, paths: cluster_config.ClusterPaths, path: str, what: str, csr: bool = True
) -> dict[str, Any]:
    """POST to a manager's endpoint with this node's certificate (and a request for a new one
    for its key, if csr); the JSON answer, or MeshctlError in one line."""
    with open(paths.key, "rb") as f:
        key = f.read()
    with open(paths.cert, "rb") as f:
        node, _ = pki.identity(f.read())
    body = {"csr": pki.make_csr(key, node).decode()} if csr else {"node": node}
    try:
        reply = requests.post(
            f"https://{manager}{path}", json=body, verify=paths.ca_cert,
            cert=(paths.cert, paths.key), timeout=TIMEOUT,
        )  # fmt: skip
    except requests.RequestException as err:
        raise MeshctlError(f"cannot {what} through {manager}: {err}") from None
    try:
        answer: dict[str, Any] = reply.json()
    except ValueError:
        answer = {}
    if reply.status_code != 200:
        why = answer.get("error", reply.reason)
        raise MeshctlError(f"{manager} refused to {what}: {why}")
    return answer


def remove_membership(state_dir: str) -> None:
    """Forget the cluster on this node (after `cluster leave` or a failed join)."""
    paths = cluster_config.ClusterPaths(state_dir)
    for name in ("cluster.json", "node.crt", "node.key", "password", "ca.crt", "ca.key",
                 "root-password"):  # fmt: skip
        try:
            os.unlink(paths.file(name))
        except FileNotFoundError:
            continue
