"""A manager's etcd member (#26): its command line, its process, and the cluster's users, roles and
members, administered through etcd's JSON gateway.

Client and peer traffic are both TLS with client certificates from the cluster CA. The gateway
refuses a client certificate whose subject has a CommonName (etcd PR #10392), so node
certificates have an empty subject and etcd users log in with a password over mutual TLS.

The member runs as a task process does (meshctl.runtime): in a session of its own, so it outlives
the controller, named by pid and start time in a file of its directory, adopted by the next
controller. etcd_argv() and the parsers are pure; the process and the HTTP calls are the edges.
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import requests

from meshctl import runtime
from meshctl.cluster.pki import PEER_NAME
from meshctl.model import MeshctlError
from meshctl.runtime.process import PROCESS_FILE
from meshctl.store.etcd import DEFAULT_PREFIX

ETCD = shutil.which("etcd") or "/usr/bin/etcd"
CLUSTER_TOKEN = "meshctl"
# etcd's own defaults (docs "Tuning": heartbeat about the round-trip time between members,
# election timeout ten times the heartbeat); a LAN's round trip is well under 100 ms. The
# failover goal of #26 is measured against this election timeout.
HEARTBEAT_MS = 100
ELECTION_MS = 1000
BCRYPT_COST = 4
START_TIMEOUT = 30.0
STOP_GRACE = 10.0
REQUEST_TIMEOUT = 5.0
RECONFIG_TIMEOUT = 30.0
# etcd's refusals of a membership change that pass with time: a learner behind the leader, and
# a member connected for less than etcd's 5 s health interval ("unhealthy cluster").
PASSING = ("in sync", "unhealthy cluster")
# etcd's refusals while its members elect a leader, and how long an election may take here.
ELECTING = ("leader changed", "no leader")
ELECTION_WAIT = 10 * ELECTION_MS / 1000

# The roles enable_auth makes unless told others: readwrite on the store's prefix, without its
# "/" (EtcdStore.revision() reads the bare key "/meshctl"). A cluster made by `cluster init`
# passes its own, narrower for workers (meshctl.commands.cluster.ROLE_PERMISSIONS).
ROLE_PREFIXES: Mapping[str, Sequence[str]] = {
    "manager": (DEFAULT_PREFIX,),
    "worker": (DEFAULT_PREFIX,),
}
ROOT = "root"  # etcd's built-in superuser and role: auth enable requires both


class EtcdMemberError(MeshctlError):
    """The etcd member would not start, or etcd refused or did not answer an admin request.
    Its message never holds a password or a token."""


@dataclass(frozen=True)
class TlsFiles:
    """The node's TLS files: the cluster CA, its certificate and its key (paths)."""

    ca: str
    cert: str
    key: str


@dataclass(frozen=True)
class Credentials:
    """An etcd user's name and password (the password never shows in a repr)."""

    name: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class MemberConfig:
    """One node's etcd member.

    data_dir holds etcd's data (data/), its log and the file naming its process; address is the
    IP the member advertises to clients and peers. initial_cluster maps member names to peer URLs
    (default: this member alone); cluster_state is "new" to found a cluster, "existing" to join
    one that added this member (as a learner) first.
    """

    name: str
    data_dir: str
    address: str
    tls: TlsFiles
    client_port: int = 2379
    peer_port: int = 2380
    initial_cluster: Mapping[str, str] = field(default_factory=dict)
    cluster_state: Literal["new", "existing"] = "new"
    cluster_token: str = CLUSTER_TOKEN
    heartbeat_ms: int = HEARTBEAT_MS
    election_ms: int = ELECTION_MS

    def __post_init__(self) -> None:
        if self.cluster_state not in ("new", "existing"):
            raise ValueError(f"invalid cluster_state {self.cluster_state!r}: new or existing")

    @property
    def client_url(self) -> str:
        return f"https://{self.address}:{self.client_port}"

    @property
    def local_url(self) -> str:
        """The client URL on loopback, which this node's own controller uses."""
        return f"https://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"https://{self.address}:{self.peer_port}"

    @property
    def log_path(self) -> str:
        return os.path.join(self.data_dir, "etcd.log")


def etcd_argv(config: MemberConfig, etcd: str = ETCD) -> list[str]:
    """etcd's command line for the member: TLS with client certificates on both sides."""
    client_urls = [config.client_url]
    if config.local_url != config.client_url:
        client_urls.append(config.local_url)
    cluster = config.initial_cluster or {config.name: config.peer_url}
    tls = config.tls
    return [
        etcd,
        f"--name={config.name}",
        f"--data-dir={os.path.join(config.data_dir, 'data')}",
        f"--listen-client-urls={','.join(client_urls)}",
        f"--advertise-client-urls={config.client_url}",
        f"--listen-peer-urls={config.peer_url}",
        f"--initial-advertise-peer-urls={config.peer_url}",
        f"--initial-cluster={','.join(f'{name}={url}' for name, url in cluster.items())}",
        f"--initial-cluster-state={config.cluster_state}",
        f"--initial-cluster-token={config.cluster_token}",
        "--client-cert-auth",
        f"--trusted-ca-file={tls.ca}",
        f"--cert-file={tls.cert}",
        f"--key-file={tls.key}",
        "--peer-client-cert-auth",
        f"--peer-cert-allowed-hostname={PEER_NAME}",  # a manager's certificate, no worker's
        f"--peer-trusted-ca-file={tls.ca}",
        f"--peer-cert-file={tls.cert}",
        f"--peer-key-file={tls.key}",
        f"--heartbeat-interval={config.heartbeat_ms}",
        f"--election-timeout={config.election_ms}",
        # bcrypt's least cost: every password is meshctl's own, 24 random bytes, which no
        # slow hash makes harder to guess, while each login (every controller's and CLI's)
        # costs the member a hash: at the default cost, longer than a request's timeout on a
        # slow machine (the multi-VM lane under TCG).
        f"--bcrypt-cost={BCRYPT_COST}",
        # To stderr, which start() sends to the log file: a Go panic lands there too.
        "--logger=zap",
        "--log-outputs=stderr",
    ]


class EtcdMember:
    """The node's etcd member process: started in a session of its own, adopted after a
    controller restart (by pid and start time, as runtime adopts tasks), stopped on demand."""

    def __init__(self, config: MemberConfig, etcd: str = ETCD) -> None:
        self.config = config
        self.etcd = etcd
        self.process: runtime.TaskProcess | None = None

    def adopt(self) -> runtime.TaskProcess | None:
        """The member running now, as this object or its process file knows it (a process
        file written by an earlier controller, or by another object for the same member)."""
        self._forget_ended()
        if self.process is None:
            recorded = runtime.read_process_file(self.config.data_dir)
            self.process = runtime.adopt(*recorded) if recorded is not None else None
            self._forget_ended()
        return self.process

    def _forget_ended(self) -> None:
        """Let go of a member process that has ended (reaping it if it is our child)."""
        if self.process is not None and self.process.exited():
            self.process.exit_code()
            self.process.close()
            self.process = None

    def start(self, timeout: float = START_TIMEOUT) -> runtime.TaskProcess:
        """The running member: adopted if one runs, else started; returns once it is healthy.

        EtcdMemberError (naming the log) if it exits, or stays unhealthy for timeout seconds:
        then it goes on running (a member without quorum is unhealthy until its peers return).
        """
        process = self.adopt() or self._spawn()
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if process.exited():
                raise EtcdMemberError(
                    f"etcd member {self.config.name} exited at start; see {self.config.log_path}"
                )
            if time.monotonic() > deadline:
                raise EtcdMemberError(
                    f"etcd member {self.config.name} is not healthy after {timeout:g}s; "
                    f"see {self.config.log_path}"
                )
            time.sleep(0.1)
        return process

    def _spawn(self) -> runtime.TaskProcess:
        """etcd in a session of its own, its output appended to the log, its pid and start
        time written before anything else can lose it."""
        directory = self.config.data_dir
        os.makedirs(directory, mode=0o700, exist_ok=True)
        os.chmod(directory, 0o700)  # the process file and etcd's data are root's alone
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
        log_fd = os.open(self.config.log_path, flags, 0o600)
        try:
            popen = subprocess.Popen(
                etcd_argv(self.config, self.etcd), stdin=subprocess.DEVNULL, stdout=log_fd,
                stderr=subprocess.STDOUT, cwd="/", start_new_session=True,
            )  # fmt: skip
        except OSError as err:
            raise EtcdMemberError(f"cannot run {self.etcd}: {err.strerror}") from None
        finally:
            os.close(log_fd)
        # Our unreaped child cannot vanish or be replaced before these two calls.
        pidfd = os.pidfd_open(popen.pid)
        start_time = runtime.read_start_time(popen.pid)
        assert start_time is not None, "an unreaped child always has /proc/PID/stat"
        self.process = runtime.TaskProcess(popen.pid, start_time, pidfd, popen)
        runtime.write_process_file(directory, self.process)
        return self.process

    def healthy(self) -> bool:
        """Whether the member answers /health with "true" on loopback, over mutual TLS."""
        return answers(self.config.local_url, self.config.tls)

    def stop(self, grace: float = STOP_GRACE) -> None:
        """End the member (SIGTERM, SIGKILL after grace seconds); its data stays."""
        process = self.adopt()
        if process is not None:
            process.stop(grace)
            process.close()
        self.process = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.config.data_dir, PROCESS_FILE))


def answers(client_url: str, tls: TlsFiles, timeout: float = REQUEST_TIMEOUT) -> bool:
    """Whether the member at client_url answers /health with "true" (it is in a quorum)."""
    try:
        answer = requests.get(f"{client_url}/health", timeout=timeout, **_tls(tls))
        return answer.ok and answer.json().get("health") == "true"
    except (requests.RequestException, ValueError):
        return False


def wait_answers(client_url: str, tls: TlsFiles, timeout: float = RECONFIG_TIMEOUT) -> None:
    """Wait until the member at client_url is healthy again: after the leader was removed, the
    others elect a new one, and etcd refuses requests meanwhile ("leader changed")."""
    deadline = time.monotonic() + timeout
    while not answers(client_url, tls):
        if time.monotonic() > deadline:
            raise EtcdMemberError(f"etcd at {client_url} is not healthy after {timeout:g}s")
        time.sleep(0.2)


# -- administration through the gateway --------------------------------------------------------


@dataclass(frozen=True)
class Member:
    """One member as etcd lists it; name is empty until an added member has started."""

    id: int
    name: str
    peer_urls: tuple[str, ...]
    client_urls: tuple[str, ...]
    learner: bool


def parse_members(answer: Mapping[str, Any]) -> list[Member]:
    """The members of a /v3/cluster/member/* answer (IDs come as decimal strings)."""
    return [
        Member(
            id=int(item["ID"]),
            name=item.get("name", ""),
            peer_urls=tuple(item.get("peerURLs", ())),
            client_urls=tuple(item.get("clientURLs", ())),
            learner=bool(item.get("isLearner", False)),
        )
        for item in answer.get("members", ())
    ]


def prefix_permission(prefix: str, perm: str = "READWRITE") -> dict[str, str]:
    """An etcd permission on every key that starts with prefix (the range [prefix, prefix+1))."""
    raw = prefix.encode()
    return {
        "permType": perm,
        "key": _b64(raw),
        "range_end": _b64(raw[:-1] + bytes([raw[-1] + 1])),
    }


def key_permission(key: str, perm: str = "READWRITE") -> dict[str, str]:
    """An etcd permission on one key."""
    return {"permType": perm, "key": _b64(key.encode())}


def authenticate(endpoint: str, tls: TlsFiles, credentials: Credentials) -> str:
    """A token for the user (etcd's simple token: it lapses after 5 idle minutes)."""
    body = {"name": credentials.name, "password": credentials.password}
    answer = _post(endpoint, tls, None, "/v3/auth/authenticate", body)
    return str(answer["token"])


def enable_auth(
    endpoint: str,
    tls: TlsFiles,
    root_password: str,
    roles: Mapping[str, Sequence[str | Mapping[str, str]]] = ROLE_PREFIXES,
) -> None:
    """Create root (with the root role) and each role with its permissions (a key prefix:
    readwrite on it; or a permission from prefix_permission/key_permission), then turn etcd's
    auth on. It can run again (with the same root password): on a bootstrap cut
    short, each step already done is passed over; once auth is on, root grants the roles again."""
    try:
        token: str | None = authenticate(endpoint, tls, Credentials(ROOT, root_password))
    except EtcdMemberError as err:
        if "not enabled" not in str(err):
            raise
        token = None  # auth is still off: every request is allowed
    root = {"name": ROOT, "password": root_password}
    _post_unless(endpoint, tls, token, "/v3/auth/user/add", root)
    _post(endpoint, tls, token, "/v3/auth/user/grant", {"user": ROOT, "role": ROOT})
    for role, perms in roles.items():
        _add_role(endpoint, tls, token, role, perms)
    _post(endpoint, tls, token, "/v3/auth/enable", {})


def _add_role(
    endpoint: str, tls: TlsFiles, token: str | None, role: str,
    perms: Sequence[str | Mapping[str, str]],
) -> None:  # fmt: skip
    _post_unless(endpoint, tls, token, "/v3/auth/role/add", {"name": role})
    for perm in perms:
        grant = prefix_permission(perm) if isinstance(perm, str) else dict(perm)
        _post(endpoint, tls, token, "/v3/auth/role/grant", {"name": role, "perm": grant})


def add_role(
    endpoint: str, tls: TlsFiles, root: Credentials, role: str,
    perms: Sequence[str | Mapping[str, str]],
) -> None:  # fmt: skip
    """A role with these permissions (as enable_auth takes them); one that exists gains them."""
    _add_role(endpoint, tls, authenticate(endpoint, tls, root), role, perms)


def remove_role(endpoint: str, tls: TlsFiles, root: Credentials, role: str) -> None:
    """Delete a role; one already gone is fine."""
    token = authenticate(endpoint, tls, root)
    _post_unless(endpoint, tls, token, "/v3/auth/role/delete", {"role": role}, "not found")


def add_user(
    endpoint: str, tls: TlsFiles, root: Credentials, name: str, password: str,
    role: str | Sequence[str],
) -> None:  # fmt: skip
    """A user for a node, with its role (or roles)."""
    token = authenticate(endpoint, tls, root)
    _post(endpoint, tls, token, "/v3/auth/user/add", {"name": name, "password": password})
    for each in [role] if isinstance(role, str) else role:
        _post(endpoint, tls, token, "/v3/auth/user/grant", {"user": name, "role": each})


def user_roles(endpoint: str, tls: TlsFiles, auth: Credentials, name: str) -> tuple[str, ...]:
    """The roles of user name, asked as auth: root may ask of anyone, a user of itself (etcd
    lets it). EtcdMemberError if etcd refuses, "user name not found" once the user is gone."""
    token = authenticate(endpoint, tls, auth)
    answer = _post(endpoint, tls, token, "/v3/auth/user/get", {"name": name})
    return tuple(answer.get("roles", ()))


def grant_role(endpoint: str, tls: TlsFiles, root: Credentials, name: str, role: str) -> None:
    """Give user name a role it may already have."""
    token = authenticate(endpoint, tls, root)
    _post(endpoint, tls, token, "/v3/auth/user/grant", {"user": name, "role": role})


def revoke_role(endpoint: str, tls: TlsFiles, root: Credentials, name: str, role: str) -> None:
    """Take a role from user name; one it does not have is fine."""
    token = authenticate(endpoint, tls, root)
    body = {"name": name, "role": role}
    _post_unless(endpoint, tls, token, "/v3/auth/user/revoke", body, "not granted")


def remove_user(endpoint: str, tls: TlsFiles, root: Credentials, name: str) -> None:
    """Delete a node's user: its password and its tokens stop working at once. A user that is
    already gone is fine."""
    token = authenticate(endpoint, tls, root)
    _post_unless(endpoint, tls, token, "/v3/auth/user/delete", {"name": name}, "not found")


def members(endpoint: str, tls: TlsFiles, auth: Credentials) -> list[Member]:
    """The cluster's members, learners included."""
    token = authenticate(endpoint, tls, auth)
    return parse_members(_post(endpoint, tls, token, "/v3/cluster/member/list", {}))


def add_learner(endpoint: str, tls: TlsFiles, auth: Credentials, peer_url: str) -> int:
    """Add a member as a learner (it gets the log but does not vote); its ID. Start it then
    with cluster_state "existing" and promote() it once it has caught up. A member that already
    has peer_url (an add whose joiner stopped short) is returned as it is: etcd names a member
    when it first starts, so the peer URL is what identifies it here."""
    token = authenticate(endpoint, tls, auth)
    listed = parse_members(_post(endpoint, tls, token, "/v3/cluster/member/list", {}))
    for member in listed:
        if peer_url in member.peer_urls:
            return member.id
    body = {"peerURLs": [peer_url], "isLearner": True}
    answer = _post(endpoint, tls, token, "/v3/cluster/member/add", body)
    return int(answer["member"]["ID"])


def promote(
    endpoint: str, tls: TlsFiles, auth: Credentials, member_id: int,
    timeout: float = RECONFIG_TIMEOUT,
) -> None:  # fmt: skip
    """Make a learner a voter, waiting up to timeout seconds for it to catch up with the
    leader (etcd refuses to promote a learner that has not)."""
    token = authenticate(endpoint, tls, auth)
    body = {"ID": str(member_id)}
    _post_patiently(endpoint, tls, token, "/v3/cluster/member/promote", body, timeout)


def remove_member(
    endpoint: str, tls: TlsFiles, auth: Credentials, member_id: int,
    timeout: float = RECONFIG_TIMEOUT,
) -> None:  # fmt: skip
    """Remove a member from the cluster; its etcd then stops by itself. etcd refuses while a
    member has been connected for less than 5 s (its "unhealthy cluster"): that is waited out."""
    token = authenticate(endpoint, tls, auth)
    body = {"ID": str(member_id)}
    _post_patiently(endpoint, tls, token, "/v3/cluster/member/remove", body, timeout)


def _post_patiently(
    endpoint: str,
    tls: TlsFiles,
    token: str | None,
    path: str,
    body: Mapping[str, Any],
    timeout: float,
) -> None:
    """_post, again while etcd refuses for a reason that passes with time (a learner not yet in
    sync, a member connected too recently), for up to timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            _post(endpoint, tls, token, path, body)
            return
        except EtcdMemberError as err:
            if not any(reason in str(err) for reason in PASSING) or time.monotonic() > deadline:
                raise
        time.sleep(0.2)


def _post_unless(
    endpoint: str,
    tls: TlsFiles,
    token: str | None,
    path: str,
    body: Mapping[str, Any],
    done: str = "already exists",
) -> None:
    """_post, where an error whose message holds `done` means the step is already done."""
    try:
        _post(endpoint, tls, token, path, body)
    except EtcdMemberError as err:
        if done not in str(err):
            raise


def _post(
    endpoint: str, tls: TlsFiles, token: str | None, path: str, body: Mapping[str, Any]
) -> dict[str, Any]:
    """One gateway call over mutual TLS, again while the members elect a leader (after a
    leader was removed, or lost); EtcdMemberError with etcd's own one-line reason."""
    deadline = time.monotonic() + ELECTION_WAIT
    while True:
        try:
            return _post_once(endpoint, tls, token, path, body)
        except EtcdMemberError as err:
            if not any(r in str(err) for r in ELECTING) or time.monotonic() > deadline:
                raise
        time.sleep(0.2)


def _post_once(
    endpoint: str, tls: TlsFiles, token: str | None, path: str, body: Mapping[str, Any]
) -> dict[str, Any]:
    """One gateway call over mutual TLS; EtcdMemberError with etcd's own one-line reason.
    Neither the body (which may hold a password) nor the token goes into an error."""
    headers = {"Authorization": token} if token is not None else {}
    try:
        answer = requests.post(
            endpoint + path, json=body, headers=headers, timeout=REQUEST_TIMEOUT, **_tls(tls)
        )
    except requests.RequestException as err:
        raise EtcdMemberError(f"cannot reach etcd at {endpoint}: {_unreachable(err)}") from None
    try:
        result = answer.json()
    except ValueError:
        result = None
    if not answer.ok or not isinstance(result, dict):
        raise EtcdMemberError(f"etcd refused {path}: {_reason(answer.status_code, result)}")
    return result


def _unreachable(err: requests.RequestException) -> str:
    """Why a request got no answer, in words a user acts on (never the request itself)."""
    if isinstance(err, requests.exceptions.SSLError):
        return "TLS failed; check the node's certificate and the cluster CA"
    if isinstance(err, requests.exceptions.Timeout):
        return f"no answer within {REQUEST_TIMEOUT:g}s; is the member running?"
    return "connection refused or closed; is the member running?"


def _reason(status: int, result: object) -> str:
    """etcd's error message from a gateway answer, else the HTTP status."""
    if isinstance(result, dict):
        message = result.get("message") or result.get("error")
        if message:
            return str(message).splitlines()[0]
    return f"HTTP {status}"


def _tls(tls: TlsFiles) -> dict[str, Any]:
    """requests' arguments for mutual TLS with the node's certificate, trusting only the CA."""
    return {"verify": tls.ca, "cert": (tls.cert, tls.key)}


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()
