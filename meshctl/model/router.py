"""The HTTP routing mesh's settings and its TLS certificates."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

from meshctl.model.fields import (
    _ROUTE_HOST,
    PublishMode,
    ValidationError,
    _check_choice,
    check_port,
    check_text,
    new_id,
)
from meshctl.model.service import PublishedPort


@dataclass(frozen=True)
class Router:
    """The HTTP routing mesh, while enabled: one HAProxy per node, published on http_port and
    https_port through the routing mesh (mode ingress: the router's VIP on the ingress network
    spreads over every node's router) or straight to the node's own router (mode host: it sees
    the client's address). cookie_key seeds the sticky-session cookies, the same on every node
    so that a cookie holds whichever node's router a request reaches."""

    http_port: int = 80
    https_port: int = 443
    mode: PublishMode = "ingress"
    vip: str | None = None  # on the ingress network (mode ingress)
    cookie_key: str = field(default_factory=lambda: secrets.token_hex(16))
    id: str = field(default_factory=new_id)
    created_at: float = 0.0

    def __post_init__(self) -> None:
        check_port(self.http_port, "http_port")
        check_port(self.https_port, "https_port")
        _check_choice(self.mode, PublishMode, "mode")
        if self.http_port == self.https_port:
            raise ValidationError(
                f"invalid https_port {self.https_port}: it is the --http-port too; give two "
                "different ports",
                "https_port",
            )

    def ports(self) -> tuple[PublishedPort, ...]:
        """The router's ports as published ports (it listens on the same numbers)."""
        return tuple(
            PublishedPort(port, port, "tcp", self.mode)
            for port in (self.http_port, self.https_port)
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "http_port": self.http_port,
            "https_port": self.https_port,
            "mode": self.mode,
            "vip": self.vip,
            "cookie_key": self.cookie_key,
            "created_at": self.created_at,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Router:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


@dataclass(frozen=True)
class Certificate:
    """A certificate and its key (PEM) that the router presents for `host` (`*.NAME`: any name
    below NAME) when a TLS client names it (SNI)."""

    host: str
    cert: str
    key: str
    created_at: float = 0.0

    def __post_init__(self) -> None:
        if not _ROUTE_HOST.fullmatch(self.host):
            raise ValidationError(
                f"invalid certificate host {self.host!r}: write a lowercase DNS name, "
                "optionally with `*.` before it, like app.example.com or *.example.com"
            )
        check_text(self.cert, "cert")
        check_text(self.key, "key")

    def to_dict(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "cert": self.cert,
            "key": self.key,
            "created_at": self.created_at,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Certificate:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})
