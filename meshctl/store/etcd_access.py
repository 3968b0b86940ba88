"""How meshctl proves itself to a cluster's etcd, and what it tells the user when etcd says no.

A cluster's etcd (#26) speaks TLS only, wants a client certificate signed by the cluster CA
(--client-cert-auth) and, on top of it, an etcd user: the JSON gateway cannot map a client
certificate to a user (it refuses certificates with a CommonName, etcd PR #10392), so a store
logs in with a user and password (POST /v3/auth/authenticate) and sends the token it gets as
the `Authorization` header. The wording here never includes the password or the token.
"""

from __future__ import annotations

from dataclasses import dataclass

from meshctl.store import StoreError

# What etcd answers when the token is missing, expired (--auth-token-ttl) or forgotten (a
# restart drops every simple token; deleting a user drops its tokens): log in again.
_TOKEN_REFUSALS = ("invalid auth token", "auth token is not provided", "user name is empty")
# The gateway's paths that only read; every other request writes (or renews a lease).
_READS = ("/kv/range", "/watch")


@dataclass(frozen=True)
class EtcdAccess:
    """TLS and a login for an https:// store: the cluster CA that signed etcd's certificate,
    this node's client certificate and key, and the etcd user with the file holding its
    password (no user: TLS only, for an etcd without `auth enable`)."""

    cacert: str
    cert: str
    key: str
    user: str | None = None
    password_file: str | None = None

    def __post_init__(self) -> None:
        if not (self.cacert and self.cert and self.key):
            raise StoreError("an https:// store needs --cacert, --cert and --key together")
        if bool(self.user) != bool(self.password_file):
            raise StoreError("an etcd login needs --user and --password-file together")

    def password(self) -> str:
        """The password, read when logging in (so a rotated file is picked up)."""
        assert self.password_file is not None
        try:
            with open(self.password_file, encoding="utf-8") as file:
                return file.read().rstrip("\r\n")
        except OSError as err:
            raise StoreError(
                f"cannot read the password file {self.password_file}: {err.strerror}"
            ) from None


class TokenRefused(StoreError):
    """etcd did not take the login token (missing, expired, or revoked): log in again."""


def refusal(store: object, access: EtcdAccess | None, path: str, message: str) -> StoreError:
    """The StoreError for an answer in which etcd refused a request on path."""
    user = access.user if access else None
    if any(text in message for text in _TOKEN_REFUSALS):
        if user:
            return TokenRefused(f"etcd {store} refused the login of user {user!r}: {message}")
        return StoreError(f"etcd {store} wants a login: give --user and --password-file")
    if "authentication failed" in message:
        return StoreError(
            f"etcd user {user!r} cannot log in to {store}: wrong password or removed from the "
            "cluster"
        )
    if "permission denied" in message:
        verb = "read" if path in _READS else "write"
        who = f"etcd user {user!r}" if user else "this client"
        return StoreError(f"{who} is not allowed to {verb} {store}: its etcd roles forbid it")
    return StoreError(f"etcd {store}: {message}")


def tls_failure(endpoint: str, access: EtcdAccess | None, error: str) -> str:
    """Why a TLS connection to endpoint failed, in words a user can act on."""
    if "CERTIFICATE_VERIFY_FAILED" in error:
        ca = access.cacert if access else "the system's CAs"
        return (
            f"the store's certificate at {endpoint} is not signed by the cluster CA {ca} "
            "(or does not name that address); check --cacert"
        )
    if "WRONG_VERSION_NUMBER" in error or "wrong version number" in error:
        return f"{endpoint} does not speak TLS; a plain store is etcd://"
    cert = access.cert if access else "(none)"
    return (
        f"{endpoint} refused this client's certificate {cert}: missing, expired or not signed "
        "by the cluster CA"
    )
