"""Join tokens (#26), in swarm's shape: `MESHCTL-1-<CA digest>-<secret>`.

The digest (meshctl.cluster.pki.ca_digest) pins the cluster CA, so a joining node can trust the
manager it first talks to; the secret, a role letter ("w" worker, "m" manager) and 26 random
base32 characters, admits it in that role. The current token of each role is kept in the
store where only managers' users may read it (swarm keeps its tokens in its Raft store too):
`join-token` prints it again, and a manager compares a joining node's secret with it in
constant time. No message here ever shows a secret.
"""

from __future__ import annotations

import base64
import hmac
import re
import secrets
from dataclasses import dataclass, field

from meshctl.cluster.pki import ROLES
from meshctl.model import MeshctlError

PREFIX = "MESHCTL"
VERSION = "1"
ROLE_LETTERS = {"manager": "m", "worker": "w"}
_ROLE_OF_LETTER = {letter: role for role, letter in ROLE_LETTERS.items()}
_DIGEST_RE = re.compile(r"[0-9a-f]{64}")
_SECRET_RE = re.compile(r"[mw][a-z2-7]{26}")
_SHAPE = f"{PREFIX}-{VERSION}-<CA digest>-<secret>"


@dataclass(frozen=True)
class Token:
    """A parsed join token. repr leaves the secret out, so a log line never shows it."""

    ca_digest: str
    role: str
    secret: str = field(repr=False)

    def __str__(self) -> str:
        return f"{PREFIX}-{VERSION}-{self.ca_digest}-{self.secret}"


def make_token(ca_digest: str, role: str) -> str:
    """A new token admitting a node in `role` to the cluster whose CA has this digest."""
    if role not in ROLES:
        raise MeshctlError(f"invalid role {role!r}: use one of {', '.join(ROLES)}")
    if not _DIGEST_RE.fullmatch(ca_digest):
        raise MeshctlError("invalid CA digest: expected 64 lowercase hex digits (sha256)")
    random = base64.b32encode(secrets.token_bytes(16)).decode().rstrip("=").lower()
    return str(Token(ca_digest, role, ROLE_LETTERS[role] + random))


def parse_token(text: str) -> Token:
    """The token in `text` (surrounding whitespace ignored); MeshctlError if it is malformed."""
    parts = text.strip().split("-")
    if len(parts) != 4 or parts[0] != PREFIX:
        raise MeshctlError(f"malformed join token: expected {_SHAPE}")
    _, version, digest, secret = parts
    if version != VERSION:
        raise MeshctlError(
            f"unsupported join token version: this meshctl reads {PREFIX}-{VERSION}- tokens"
        )
    if not _DIGEST_RE.fullmatch(digest):
        raise MeshctlError("malformed join token: the CA digest is not 64 lowercase hex digits")
    if not _SECRET_RE.fullmatch(secret):
        raise MeshctlError(
            "malformed join token: the secret is not a role letter (m or w) "
            "and 26 base32 characters"
        )
    return Token(digest, _ROLE_OF_LETTER[secret[0]], secret)


def check_ca(token: Token, ca_digest: str, where: str) -> None:
    """MeshctlError unless the CA presented at `where` is the one the token pins."""
    if not hmac.compare_digest(token.ca_digest, ca_digest):
        raise MeshctlError(
            f"the cluster CA {where} presents (sha256 {ca_digest[:12]}...) is not the one the "
            f"token names ({token.ca_digest[:12]}...): a wrong address, a token of another "
            "cluster, or someone in between"
        )


def same_secret(token: Token, current: str | None) -> bool:
    """Whether token carries the secret of current, the role's token now (None: there is none),
    compared in constant time: a rotated token's secret is not the current one."""
    if current is None:
        return False
    try:
        stored = parse_token(current)
    except MeshctlError:
        return False
    return stored.role == token.role and hmac.compare_digest(stored.secret, token.secret)
