"""The cluster store: the Store protocol on etcd v3, through its JSON gateway (etcd3gw).

Keys are `<prefix>/<kind>/<name>` (prefix default `/meshctl`), values JSON; revisions, create and
mod revisions are etcd's own, so compare-and-swap is a txn comparing mod_revision (0: absent)
and a txn's failure branch reads back the compared keys to say which one moved. Several
endpoints may be given: a request that cannot reach one tries the next. A watch is one
streaming request read by a thread of its own; etcd reports a compacted start revision by
cancelling the watch with `compact_revision`, which etcd3gw drops, so it is read here and
raised as Compacted.

With an EtcdAccess (an https:// store, #26) every request, the watch included, goes over TLS
verified against the cluster CA with this node's client certificate, and carries the token of
an etcd login; a refused token (expired, or dropped by an etcd restart) is renewed once.
"""

from __future__ import annotations

import base64
import builtins
import contextlib
import itertools
import json
import math
import queue
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import requests
from etcd3gw.client import Etcd3Client
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection

from meshctl.store import (
    ClosedOnExit,
    Compacted,
    Conflict,
    Delete,
    Event,
    LeaseExpired,
    Op,
    Put,
    Record,
    Snapshot,
    StoreError,
    Unavailable,
    Value,
)
from meshctl.store.etcd_access import EtcdAccess, TokenRefused, refusal, tls_failure

__all__ = ["EtcdAccess", "EtcdStore", "parse_etcd_url", "unprotected_warning"]

# Keep-alive probes after 2 s of silence, every second, 3 unanswered: a dead peer ends the
# watch's read within about 5 s; unacknowledged data gives up after 5 s as well.
_LIVELY = [
    *HTTPConnection.default_socket_options,
    (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
    (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 2),
    (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 1),
    (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3),
    (socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 5000),
]
DEFAULT_PREFIX = "/meshctl"
DEFAULT_PORT = 2379
PAGE = 1000  # keys per range request when listing
REQUEST_TIMEOUT = 5.0
# A member that does not take the connection within this is down or cut off: the next is
# tried at once (a lost manager must not cost every request its whole timeout).
CONNECT_TIMEOUT = 1.0
SCHEMES = ("etcd://", "http://", "https://")  # https:// is TLS (with an EtcdAccess)
# Answers that say this member cannot serve now: another endpoint may.
_BUSY = (503, 408, 504)
T = TypeVar("T")


def parse_etcd_url(url: str) -> tuple[list[tuple[str, int]], str]:
    """etcd://HOST[:PORT][,HOST[:PORT]...][/PREFIX] → endpoints and the key prefix (also for
    http://, its synonym, and https://, the same over TLS)."""
    rest = next((url.removeprefix(s) for s in SCHEMES if url.startswith(s)), url)
    hosts, slash, path = rest.partition("/")
    prefix = "/" + path.strip("/") if slash and path.strip("/") else DEFAULT_PREFIX
    endpoints = []
    for item in hosts.split(","):
        try:
            parts = urlsplit("//" + item)
            host, port = parts.hostname, parts.port or DEFAULT_PORT
        except ValueError:
            host, port = None, 0
        if not host or not item:
            raise StoreError(
                f"store URL {url!r}: {item!r} is not HOST:PORT; write "
                "etcd://HOST:PORT[,HOST:PORT...] (https:// for TLS), like etcd://10.0.0.1:2379"
            )
        endpoints.append((host, port))
    return endpoints, prefix


def _b64(data: str) -> str:
    return base64.b64encode(data.encode()).decode()


def _unb64(data: str) -> str:
    return base64.b64decode(data).decode()


def _range_end(prefix: str) -> str:
    """The first key after every key that starts with prefix (etcd's prefix range)."""
    raw = prefix.encode()
    return base64.b64encode(raw[:-1] + bytes([raw[-1] + 1])).decode()


def _encode(value: Value) -> str:
    return base64.b64encode(json.dumps(value, sort_keys=True).encode()).decode()


class EtcdStore(ClosedOnExit):
    """The Store protocol on an etcd cluster (3.4 and later: the gateway's /v3/ path)."""

    distributed = True  # the nodes of a cluster share it

    def __init__(
        self,
        endpoints: Sequence[tuple[str, int]],
        prefix: str = DEFAULT_PREFIX,
        *,
        timeout: float = REQUEST_TIMEOUT,
        access: EtcdAccess | None = None,
    ) -> None:
        if not endpoints:
            raise StoreError("an etcd store needs at least one endpoint HOST:PORT")
        self.endpoints = list(endpoints)
        self.prefix = prefix.rstrip("/")
        self.access = access
        self._timeout = timeout
        scheme = "https" if access else "http"
        self._session = requests.Session()
        # The watch is one long read: a peer cut off without a word (a partition) must be
        # noticed by TCP itself, so its connections probe an idle peer and give up quickly.
        self._watching = requests.Session()
        self._watching.mount(f"{scheme}://", _LivelyAdapter())
        for session in (self._session, self._watching):
            session.trust_env = False  # no proxy or CA bundle from the environment
            if access:
                session.verify = access.cacert
                session.cert = (access.cert, access.key)
        self._scheme = scheme
        self._clients = self._make_clients(endpoints)
        self._current = 0  # the endpoint that answered last
        self._lock = threading.Lock()
        self._stream: _WatchStream | None = None
        self._login_lock = threading.Lock()
        self._token: str | None = None  # the login's token; None before the first login

    def _make_clients(self, endpoints: Sequence[tuple[str, int]]) -> list[Etcd3Client]:
        return [
            Etcd3Client(host, port, self._scheme, api_path="/v3/", session=self._session)
            for host, port in endpoints
        ]

    def use_endpoints(self, endpoints: Sequence[tuple[str, int]]) -> None:
        """Ask these endpoints from now on (the cluster's members changed); the watch moves
        when it next reconnects."""
        if not endpoints or list(endpoints) == self.endpoints:
            return
        clients = self._make_clients(endpoints)
        self.endpoints, self._clients, self._current = list(endpoints), clients, 0

    def user_roles(self) -> tuple[str, ...]:
        """The etcd roles of the user this store logs in as (etcd lets a user read its own),
        through the login it holds: no new login (etcd checks each one with bcrypt)."""
        if self.access is None or not self.access.user:
            raise StoreError(f"etcd {self}: no login, so no roles")
        result = self._post("/auth/user/get", {"name": self.access.user})
        return tuple(result.get("roles", ()))

    def member_endpoints(self) -> list[tuple[str, int]]:
        """The client endpoints the etcd cluster's members advertise (started members only)."""
        result = self._post("/cluster/member/list", {})
        found = []
        for member in result.get("members", []):
            for url in member.get("clientURLs", []):
                parts = urlsplit(url)
                if parts.hostname:
                    found.append((parts.hostname, parts.port or DEFAULT_PORT))
        return list(dict.fromkeys(found))

    def __repr__(self) -> str:
        hosts = ",".join(f"{h}:{p}" for h, p in self.endpoints)
        return f"{'https' if self.access else 'etcd'}://{hosts}{self.prefix}"

    # -- keys ----------------------------------------------------------------------------------

    def _key(self, kind: str, name: str) -> str:
        return f"{self.prefix}/{kind}/{name}"

    def _split(self, key: str) -> tuple[str, str]:
        kind, _, name = key.removeprefix(self.prefix + "/").partition("/")
        return kind, name

    def _record(self, kv: dict[str, Any]) -> Record:
        kind, name = self._split(_unb64(kv["key"]))
        value = json.loads(base64.b64decode(kv.get("value", "")) or b"null")
        return Record(kind, name, value, int(kv["create_revision"]), int(kv["mod_revision"]))

    # -- requests ------------------------------------------------------------------------------

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST to the first endpoint that answers, logged in."""
        return self._logged_in(lambda: self._post_once(path, body))

    def _post_once(
        self, path: str, body: dict[str, Any], headers: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """POST to the first endpoint that answers, starting with the one that answered last."""
        errors, tls = [], []
        clients = self._clients  # one list throughout, even if use_endpoints replaces it
        for step in range(len(clients)):
            index = (self._current + step) % len(clients)
            client = clients[index]
            endpoint = f"{client.host}:{client.port}"
            try:
                response = self._session.post(
                    client.get_url(path), json=body, headers=headers,
                    timeout=(min(CONNECT_TIMEOUT, self._timeout), self._timeout),
                )  # fmt: skip
            except requests.exceptions.SSLError as err:
                tls.append(tls_failure(endpoint, self.access, str(err)))
                continue
            except requests.RequestException as err:
                errors.append(f"{endpoint} {self._unreachable(err)}")
                continue
            if response.status_code in _BUSY:
                errors.append(f"{endpoint} answered {response.status_code}")
                continue
            if response.status_code != 200:
                raise self._refusal(path, _message(response))
            self._current = index
            result: dict[str, Any] = response.json()
            return result
        if tls:
            raise StoreError(f"etcd {self}: {'; '.join(tls)}")
        raise Unavailable(f"etcd {self} cannot be reached ({'; '.join(errors)}); is it running?")

    def _unreachable(self, err: requests.RequestException) -> str:
        if isinstance(err, requests.Timeout):
            return "timed out"
        if self.access is None and "without response" in str(err):
            # What etcd does to plain HTTP on a port that serves TLS only.
            return "closed the connection unanswered, as etcd over TLS does: use https://"
        return "connection failed"

    def _refusal(self, path: str, message: str) -> StoreError:
        if "lease not found" in message:
            return LeaseExpired(0)
        return refusal(self, self.access, path, message)

    # -- login ---------------------------------------------------------------------------------

    def _logged_in(self, request: Callable[[], T]) -> T:
        """Run request with the login's token; when etcd refuses the token (expired, or
        forgotten by a restart), log in again and run it once more."""
        if self.access is None or not self.access.user:
            return request()
        token = self._token
        if token is None:
            token = self._log_in(None)
        try:
            return request()
        except TokenRefused:
            self._log_in(token)
            return request()

    def _log_in(self, stale: str | None) -> str:
        """Authenticate as the access's user unless another thread has replaced the stale
        token meanwhile; set the new token on every request. Returns the current token."""
        assert self.access is not None and self.access.user
        with self._login_lock:
            if self._token is not None and self._token != stale:
                return self._token
            body = {"name": self.access.user, "password": self.access.password()}
            # No token on the login itself: a stale one must not be judged first.
            result = self._post_once("/auth/authenticate", body, {"Authorization": None})
            token = str(result.get("token", ""))
            for session in (self._session, self._watching):
                session.headers["Authorization"] = token
            self._token = token
            return token

    def _range(
        self, key: str, range_end: str | None = None, revision: int = 0
    ) -> tuple[int, builtins.list[dict[str, Any]]]:
        """Every key-value in [key, range_end) at one revision (paged), and that revision."""
        kvs: builtins.list[dict[str, Any]] = []
        start = _b64(key)
        while True:
            body: dict[str, Any] = {"key": start, "limit": PAGE, "revision": revision}
            if range_end is not None:
                body["range_end"] = range_end
            result = self._post("/kv/range", body)
            # The first page fixes the revision: a header always carries the store's current
            # revision, also for a read at an older one, and the pages after it must not move
            # (a snapshot claiming a later revision than some of its pages was read at hides
            # the writes in between from a watch that starts after it).
            revision = revision or int(result["header"]["revision"])
            page = result.get("kvs", [])
            kvs.extend(page)
            if not result.get("more") or not page:
                return revision, kvs
            start = base64.b64encode(base64.b64decode(page[-1]["key"]) + b"\0").decode()

    # -- reads ---------------------------------------------------------------------------------

    def get(self, kind: str, name: str) -> Record | None:
        _, kvs = self._range(self._key(kind, name))
        return self._record(kvs[0]) if kvs else None

    def list(self, kind: str, prefix: str = "") -> builtins.list[Record]:
        start = self._key(kind, prefix)
        _, kvs = self._range(start, _range_end(start))
        return [self._record(kv) for kv in kvs]

    def snapshot(self) -> Snapshot:
        start = self.prefix + "/"
        revision, kvs = self._range(start, _range_end(start))
        records: dict[str, builtins.list[Record]] = {}
        for kv in kvs:
            record = self._record(kv)
            records.setdefault(record.kind, []).append(record)
        return Snapshot(revision, records)

    def revision(self) -> int:
        # A key under the prefix: a role that grants the prefix's keys grants this read.
        result = self._post("/kv/range", {"key": _b64(self.prefix + "/"), "count_only": True})
        return int(result["header"]["revision"])

    # -- writes --------------------------------------------------------------------------------

    def put(
        self, kind: str, name: str, value: Value, *, expect: int | None = None, lease: int = 0
    ) -> Record:
        revision, responses = self._txn([Put(kind, name, value, expect, lease)])
        previous = responses[0].get("response_put", {}).get("prev_kv")
        created = int(previous["create_revision"]) if previous else revision
        stored = json.loads(json.dumps(value, sort_keys=True))
        return Record(kind, name, stored, created, revision)

    def delete(self, kind: str, name: str, *, expect: int | None = None) -> bool:
        _, responses = self._txn([Delete(kind, name, expect)])
        return int(responses[0].get("response_delete_range", {}).get("deleted", 0)) > 0

    def txn(self, ops: Sequence[Op]) -> int:
        revision, _ = self._txn(ops)
        return revision

    def _txn(self, ops: Sequence[Op]) -> tuple[int, builtins.list[dict[str, Any]]]:
        keys = [(op.kind, op.name) for op in ops]
        if len(set(keys)) != len(keys):
            raise ValueError(f"a txn may name each key once; got {keys}")
        compared = [op for op in ops if op.expect is not None]
        compare = [
            {
                "key": _b64(self._key(op.kind, op.name)),
                "target": "MOD",
                "result": "EQUAL",
                "mod_revision": op.expect,
            }
            for op in compared
        ]
        success = []
        for op in ops:
            key = _b64(self._key(op.kind, op.name))
            if isinstance(op, Put):
                put = {"key": key, "value": _encode(op.value), "prev_kv": True}
                if op.lease:
                    put["lease"] = op.lease
                success.append({"request_put": put})
            elif isinstance(op, Delete):
                success.append({"request_delete_range": {"key": key}})
        # On failure, read the compared keys back to say which one was not as expected.
        failure = [{"request_range": {"key": _b64(self._key(op.kind, op.name))}} for op in compared]
        body = {"compare": compare, "success": success, "failure": failure}
        try:
            result = self._post("/kv/txn", body)
        except LeaseExpired:
            raise LeaseExpired(next(op.lease for op in ops if isinstance(op, Put))) from None
        revision = int(result["header"]["revision"])
        responses = result.get("responses", [])
        if result.get("succeeded") or not compared:
            return revision, responses
        for op, response in zip(compared, responses, strict=True):
            kvs = response.get("response_range", {}).get("kvs", [])
            actual = int(kvs[0]["mod_revision"]) if kvs else 0
            if actual != op.expect:
                assert op.expect is not None
                raise Conflict(op.kind, op.name, op.expect, actual)
        raise StoreError(f"etcd {self}: a txn failed though every compared key matched; retry")

    def compact(self, revision: int) -> None:
        """Forget the history before revision (etcd's compaction; tests and benches use it)."""
        self._post("/kv/compaction", {"revision": revision, "physical": True})

    # -- leases --------------------------------------------------------------------------------

    def grant_lease(self, ttl: float) -> int:
        if ttl <= 0:
            raise ValueError(f"a lease needs a ttl above 0, not {ttl}")
        result = self._post("/lease/grant", {"TTL": max(1, math.ceil(ttl))})
        return int(result["ID"])

    def keep_alive(self, lease: int) -> bool:
        result = self._post("/lease/keepalive", {"ID": lease})
        return int(result.get("result", {}).get("TTL", 0)) > 0

    def revoke_lease(self, lease: int) -> None:
        try:
            self._post("/kv/lease/revoke", {"ID": lease})
        except LeaseExpired:
            return

    # -- watch ---------------------------------------------------------------------------------

    def watch(self, from_revision: int, *, timeout: float) -> builtins.list[Event]:
        """Events after from_revision from one long-lived stream, kept open between calls that
        go on where the last one stopped."""
        with self._lock:
            stream = self._stream
            if stream is None or stream.next_revision != from_revision + 1 or stream.failed:
                if stream is not None:
                    stream.close()
                stream = self._stream = self._open_stream(from_revision + 1)
        return stream.next_events(timeout)

    def _open_stream(self, start: int) -> _WatchStream:
        return self._logged_in(lambda: self._open_stream_once(start))

    def _open_stream_once(self, start: int) -> _WatchStream:
        """Open the watch at the first endpoint that answers and read etcd's first answer
        here: a watch it refuses (a token, a permission) is cancelled in that answer."""
        errors = []
        clients = self._clients  # one list throughout, even if use_endpoints replaces it
        for step in range(len(clients)):
            index = (self._current + step) % len(clients)
            client = clients[index]
            endpoint = f"{client.host}:{client.port}"
            start_key = self.prefix + "/"
            body: dict[str, Any] = {
                "create_request": {
                    "key": _b64(start_key),
                    "range_end": _range_end(start_key),
                    "start_revision": start,
                }
            }
            try:
                response = self._watching.post(
                    client.get_url("/watch"), json=body, stream=True, timeout=(2.0, None)
                )
                if response.status_code != 200:
                    response.close()
                    raise self._refusal("/watch", _message(response))
                lines = _lines(response)
                first = next(lines, b"{}")
            except requests.exceptions.SSLError as err:
                why = tls_failure(endpoint, self.access, str(err))
                raise StoreError(f"etcd {self}: {why}") from None
            except (requests.RequestException, OSError) as err:
                errors.append(f"{endpoint}: {_first_line(err)}")
                continue
            result = _json(first).get("result", {})
            if result.get("canceled") and not result.get("compact_revision"):
                response.close()
                raise self._refusal("/watch", str(result.get("cancel_reason", "cancelled")))
            self._current = index
            return _WatchStream(self, response, itertools.chain([first], lines), start)
        raise Unavailable(f"etcd {self} cannot be reached ({'; '.join(errors)}); is it running?")

    def _event(self, raw: dict[str, Any]) -> Event:
        kv = raw["kv"]
        kind, name = self._split(_unb64(kv["key"]))
        if raw.get("type") == "DELETE":
            return Event(int(kv["mod_revision"]), "delete", kind, name, None)
        value = json.loads(base64.b64decode(kv.get("value", "")) or b"null")
        return Event(int(kv["mod_revision"]), "put", kind, name, value)

    # -- connection ----------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            if self._stream is not None:
                self._stream.close()
                self._stream = None
        self._session.close()
        self._watching.close()


def unprotected_warning(store: object) -> str | None:
    """The warning for a plain etcd:// store, which anyone who reaches it can write; else None."""
    if isinstance(store, EtcdStore) and store.access is None:
        return (
            f"the store {store} is unauthenticated: anyone who reaches it controls every node; "
            "use https:// with --cacert, --cert, --key, --user and --password-file"
        )
    return None


class _LivelyAdapter(HTTPAdapter):
    """Connections with the keep-alive probes of _LIVELY."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **{**kwargs, "socket_options": _LIVELY})


@dataclass
class _Failure:
    error: StoreError


class _WatchStream:
    """One streaming watch request, read line by line by a thread into a queue."""

    def __init__(
        self, store: EtcdStore, response: requests.Response, lines: Iterator[bytes], start: int
    ) -> None:
        self._store = store
        self._response = response
        self._lines = lines
        self._queue: queue.Queue[builtins.list[Event] | _Failure] = queue.Queue()
        self.next_revision = start  # the first revision the next events may carry
        self.failed = False
        self._thread = threading.Thread(target=self._read, name="etcd-watch", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for line in self._lines:
                result = json.loads(line).get("result", {})
                compacted = int(result.get("compact_revision", 0))
                if compacted:
                    start = self.next_revision - 1
                    self._queue.put(_Failure(Compacted(start, compacted)))
                    return
                if result.get("canceled"):
                    reason = result.get("cancel_reason", "cancelled by the server")
                    self._queue.put(_Failure(Unavailable(f"etcd watch ended: {reason}")))
                    return
                events = [self._store._event(raw) for raw in result.get("events", [])]
                if events:
                    self._queue.put(events)
            self._queue.put(_Failure(Unavailable(f"etcd {self._store}: the watch stream ended")))
        except (requests.RequestException, ValueError, OSError) as err:
            message = f"etcd {self._store}: the watch stream broke ({_first_line(err)})"
            self._queue.put(_Failure(Unavailable(message)))

    def next_events(self, timeout: float) -> builtins.list[Event]:
        try:
            item = self._queue.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return []
        if isinstance(item, _Failure):
            self.failed = True
            raise item.error
        self.next_revision = item[-1].revision + 1
        return item

    def close(self) -> None:
        """End the stream: shut the socket down first, which wakes the reader thread (closing
        the response while it reads would wait for its lock), then release the connection."""
        self.failed = True
        with contextlib.suppress(ValueError, RuntimeError, OSError):
            self._response.raw.shutdown()
        self._thread.join(timeout=2)
        self._response.close()


def _lines(response: requests.Response) -> Iterator[bytes]:
    for line in response.iter_lines():
        if line:
            yield line


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _json(line: bytes) -> dict[str, Any]:
    try:
        found = json.loads(line)
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}


def _message(response: requests.Response) -> str:
    """The message of an error etcd answered with (its JSON body), else the body's first line."""
    found = _json(response.content).get("message")
    if found:
        return str(found)
    text = response.text.strip().splitlines()
    return text[0] if text else f"HTTP {response.status_code}"
