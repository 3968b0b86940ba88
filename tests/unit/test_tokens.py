"""meshctl.cluster.tokens: join tokens in swarm's shape, parsed strictly, refused with one line
that never shows the secret; managers keep only the secret's hash."""

from __future__ import annotations

import re

import pytest

from meshctl.cluster import pki, tokens
from meshctl.model import MeshctlError

DIGEST = "ab" * 32
SECRET = "w" + "a" * 26


def test_round_trip() -> None:
    for role, letter in (("worker", "w"), ("manager", "m")):
        text = tokens.make_token(DIGEST, role)
        assert re.fullmatch(rf"MESHCTL-1-{DIGEST}-{letter}[a-z2-7]{{26}}", text)
        token = tokens.parse_token(text)
        assert (token.ca_digest, token.role) == (DIGEST, role)
        assert str(token) == text
        assert token.secret == text.rsplit("-", 1)[1]


def test_secrets_differ() -> None:
    assert len({tokens.make_token(DIGEST, "worker") for _ in range(20)}) == 20


def test_token_of_a_real_ca() -> None:
    digest = pki.ca_digest(pki.make_ca()[0])
    token = tokens.parse_token(tokens.make_token(digest, "manager"))
    assert token.ca_digest == digest
    tokens.check_ca(token, digest, "10.0.0.1")


def test_surrounding_whitespace_is_ignored() -> None:
    text = tokens.make_token(DIGEST, "worker")
    assert tokens.parse_token(f"  {text}\n") == tokens.parse_token(text)


def test_make_token_refuses_bad_input() -> None:
    with pytest.raises(MeshctlError, match="role"):
        tokens.make_token(DIGEST, "admin")
    with pytest.raises(MeshctlError, match="digest"):
        tokens.make_token("AB" * 32, "worker")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "MESHCTL",
        f"SWMTKN-1-{DIGEST}-{SECRET}",
        f"meshctl-1-{DIGEST}-{SECRET}",
        f"MESHCTL-2-{DIGEST}-{SECRET}",
        f"MESHCTL-1-{DIGEST[:-1]}-{SECRET}",
        f"MESHCTL-1-{DIGEST.upper()}-{SECRET}",
        f"MESHCTL-1-{'g' * 64}-{SECRET}",
        f"MESHCTL-1-{DIGEST}-{SECRET}-extra",
        f"MESHCTL-1-{DIGEST}-{SECRET[:-1]}",
        f"MESHCTL-1-{DIGEST}-{SECRET}a",
        f"MESHCTL-1-{DIGEST}-{SECRET.upper()}",
        f"MESHCTL-1-{DIGEST}-x{SECRET[1:]}",
        f"MESHCTL-1-{DIGEST}-w{'1' * 26}",
        f"MESHCTL-1-{DIGEST}-{SECRET} {SECRET}",
        f"MESHCTL-1-{DIGEST}{SECRET}",
    ],
)
def test_malformed_token_is_one_line_without_the_secret(text: str) -> None:
    with pytest.raises(MeshctlError) as excinfo:
        tokens.parse_token(text)
    message = str(excinfo.value)
    assert message and "\n" not in message
    assert SECRET[1:].lower() not in message.lower()
    assert "aaaaaaaa" not in message


def test_repr_hides_the_secret() -> None:
    token = tokens.parse_token(f"MESHCTL-1-{DIGEST}-{SECRET}")
    assert SECRET not in repr(token)
    assert "worker" in repr(token)


def test_only_the_current_secret_of_the_role_matches() -> None:
    current = tokens.make_token(DIGEST, "worker")
    token = tokens.parse_token(current)
    assert tokens.same_secret(token, current)
    assert not tokens.same_secret(token, tokens.make_token(DIGEST, "worker"))  # rotated
    assert not tokens.same_secret(token, None)
    assert not tokens.same_secret(token, "garbage")
    # The role letter is part of the secret: a manager token with a worker's random part fails.
    promoted = tokens.Token(DIGEST, "manager", "m" + token.secret[1:])
    assert not tokens.same_secret(promoted, current)


def test_check_ca_refuses_another_clusters_ca() -> None:
    token = tokens.parse_token(tokens.make_token(DIGEST, "worker"))
    tokens.check_ca(token, DIGEST, "10.0.0.1")
    with pytest.raises(MeshctlError) as excinfo:
        tokens.check_ca(token, "cd" * 32, "10.0.0.1")
    message = str(excinfo.value)
    assert "\n" not in message and "is not the one the token names" in message
    assert token.secret not in message
