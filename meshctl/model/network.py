"""Networks and a service's attachment to one."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from meshctl.model.fields import (
    VNI_FIRST,
    VNI_LAST,
    Driver,
    ValidationError,
    _check_choice,
    _subnet,
    check_label,
    check_name,
    new_id,
)


@dataclass(frozen=True)
class Network:
    """A network: a bridge per node; an overlay joins the bridges of its nodes by VXLAN (its
    VNI, claimed in the store with it); internal = no egress."""

    name: str
    subnet: str
    driver: Driver = "bridge"
    internal: bool = False
    labels: dict[str, str] = field(default_factory=dict)
    id: str = field(default_factory=new_id)
    created_at: float = 0.0
    vni: int = 0  # overlay only

    def __post_init__(self) -> None:
        check_name(self.name, "network name")
        object.__setattr__(self, "subnet", _subnet(self.subnet))
        _check_choice(self.driver, Driver, "driver")
        if self.driver == "overlay" and not VNI_FIRST <= self.vni <= VNI_LAST:
            raise ValidationError(
                f"invalid VNI {self.vni} of overlay network {self.name}: use {VNI_FIRST} to "
                f"{VNI_LAST}"
            )
        for key, value in self.labels.items():
            check_label(key, value)

    @property
    def overlay(self) -> bool:
        return self.driver == "overlay"

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "subnet": self.subnet,
            "driver": self.driver,
            "internal": self.internal,
            "labels": dict(self.labels),
            "created_at": self.created_at,
            "vni": self.vni,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Network:
        return cls(
            name=data["name"],
            subnet=data["subnet"],
            driver=data.get("driver", "bridge"),
            internal=bool(data.get("internal", False)),
            labels=dict(data.get("labels", {})),
            id=data["id"],
            created_at=float(data.get("created_at", 0.0)),
            vni=int(data.get("vni", 0)),
        )


@dataclass(frozen=True)
class NetworkAttachment:
    """A service's place on a network: extra DNS aliases, and its VIP there (vip mode only)."""

    network: str
    aliases: tuple[str, ...] = ()
    vip: str | None = None

    def __post_init__(self) -> None:
        check_name(self.network, "network name")
        for alias in self.aliases:
            check_name(alias, f"alias on network {self.network}")

    def to_dict(self) -> dict[str, Any]:
        return {"network": self.network, "aliases": list(self.aliases), "vip": self.vip}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NetworkAttachment:
        return cls(data["network"], tuple(data.get("aliases", ())), data.get("vip"))

    @classmethod
    def parse(cls, text: str) -> NetworkAttachment:
        """Read --network NET[:ALIAS[,ALIAS]]."""
        name, _, aliases = text.partition(":")
        return cls(name, tuple(a for a in aliases.split(",") if a) if aliases else ())
