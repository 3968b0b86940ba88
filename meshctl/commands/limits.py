"""The limits a host sets in the environment (see README, "Limits"): replicas per service and
networks in all."""

from __future__ import annotations

import os

from meshctl.model import REPLICAS_CEILING, ValidationError, ascii_int

MAX_REPLICAS_ENV = "MESHCTL_MAX_REPLICAS"
DEFAULT_MAX_REPLICAS = 1_000
MAX_NETWORKS_ENV = "MESHCTL_MAX_NETWORKS"
DEFAULT_MAX_NETWORKS = 1_000


def env_limit(variable: str, default: int, ceiling: int | None = None) -> int:
    """A limit set by an environment variable: a whole number from 1 (to ceiling)."""
    text = os.environ.get(variable)
    if text is None:
        return default
    value = ascii_int(text)
    if value is None or value < 1 or (ceiling is not None and value > ceiling):
        top = f" to {ceiling:,}" if ceiling is not None else " or more"
        raise ValidationError(f"invalid ${variable} {text!r}: set a whole number from 1{top}")
    return value


def check_replicas(name: str, replicas: int) -> int:
    """Refuse a replica count above $MESHCTL_MAX_REPLICAS before any task is planned."""
    limit = env_limit(MAX_REPLICAS_ENV, DEFAULT_MAX_REPLICAS, REPLICAS_CEILING)
    if replicas > limit:
        raise ValidationError(
            f"invalid replicas {replicas} for service {name}: at most {limit:,} per service; "
            f"use fewer, or raise ${MAX_REPLICAS_ENV}"
        )
    return replicas


def network_limit() -> int:
    """How many networks may exist at once ($MESHCTL_MAX_NETWORKS)."""
    return env_limit(MAX_NETWORKS_ENV, DEFAULT_MAX_NETWORKS)


def check_network_count(name: str, count: int, limit: int) -> None:
    """Refuse network `name` when `count` networks exist and the limit is reached."""
    if count >= limit:
        raise ValidationError(
            f"cannot create network {name}: {count} networks exist, the limit is {limit:,}; "
            f"remove one, or raise ${MAX_NETWORKS_ENV}"
        )
