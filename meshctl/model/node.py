"""Nodes: their records, their status under a lease, and placement constraints on them."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from meshctl.model.fields import (
    Availability,
    ValidationError,
    _check_choice,
    check_address,
    check_label,
    check_name,
    check_one_line,
    new_id,
)


@dataclass(frozen=True)
class Node:
    """A node = the namespace a controller runs in: the address other nodes reach it on (its
    underlay address), labels for placement constraints and its availability. Whether it is up
    is not stored here: a live controller keeps a NodeStatus under its lease."""

    name: str
    address: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    availability: Availability = "active"
    id: str = field(default_factory=new_id)
    created_at: float = 0.0
    lb_backend: str = ""  # the load-balancer backend its controller runs (or last ran)

    def __post_init__(self) -> None:
        check_name(self.name, "node name")
        _check_choice(self.availability, Availability, "availability")
        if self.address:
            check_address(self.address, "address")
        for key, value in self.labels.items():
            check_label(key, value)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "address": self.address,
            "labels": dict(self.labels),
            "availability": self.availability,
            "created_at": self.created_at,
            "lb_backend": self.lb_backend,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Node:
        return cls(
            name=data["name"],
            address=str(data.get("address", "")),
            labels=dict(data.get("labels", {})),
            availability=data.get("availability", "active"),
            id=data["id"],
            created_at=float(data.get("created_at", 0.0)),
            lb_backend=str(data.get("lb_backend", "")),
        )


@dataclass(frozen=True)
class NodeStatus:
    """What a live controller says of its node, kept under its lease (gone: the node is down).

    message is "" when all is well, else why passes fail ("degraded: ..."); errors names the
    networks that fail on this node and why (the others keep converging). pid, pid_start and
    boot_id name the controller process, so a controller restarted on the same host can take
    over from one that died before its lease ran out.
    """

    node: str
    since: float = 0.0
    message: str = ""
    errors: dict[str, str] = field(default_factory=dict)
    pid: int = 0
    pid_start: int = 0
    boot_id: str = ""
    lb_backend: str = ""
    vxlan_port: int = 0  # the UDP port its overlays use
    # the newest task revision its load balancers follow, reported while a task elsewhere that
    # they balance over is leaving (meshctl.lb.endpoints): its node stops it only after that
    programmed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "since": self.since,
            "message": self.message,
            "errors": dict(self.errors),
            "pid": self.pid,
            "pid_start": self.pid_start,
            "boot_id": self.boot_id,
            "lb_backend": self.lb_backend,
            "vxlan_port": self.vxlan_port,
            "programmed": self.programmed,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NodeStatus:
        fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**fields)


_CONSTRAINT = re.compile(r"node\.(name|id|labels\.([A-Za-z0-9][A-Za-z0-9._/-]*))\s*(==|!=)\s*(.*)")


@dataclass(frozen=True)
class Constraint:
    """A placement constraint as docker writes it: node.name==N, node.id!=I, node.labels.K==V."""

    field: str  # "name", "id" or "labels.K"
    equal: bool
    value: str

    @classmethod
    def parse(cls, text: str) -> Constraint:
        check_one_line(text, "constraints")
        match = _CONSTRAINT.fullmatch(text.strip(" ")) if isinstance(text, str) else None
        if match is None or not match.group(4).strip():
            raise ValidationError(
                f"invalid constraints {text!r}: write node.labels.KEY==VALUE, "
                "node.labels.KEY!=VALUE, node.name==NAME or node.id==ID",
                "constraints",
            )
        return cls(match.group(1), match.group(3) == "==", match.group(4).strip())

    def matches(self, node: Node) -> bool:
        if self.field == "name":
            have: str | None = node.name
        elif self.field == "id":
            have = node.id
        else:
            have = node.labels.get(self.field.removeprefix("labels."))
        return (have == self.value) == self.equal

    def __str__(self) -> str:
        return f"node.{self.field}{'==' if self.equal else '!='}{self.value}"
