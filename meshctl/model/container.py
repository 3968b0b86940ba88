"""Containers of other runtimes attached to a network (`meshctl container attach`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from meshctl.model.fields import ValidationError, check_name, check_one_line, new_id, proc_pid


@dataclass(frozen=True)
class Container:
    """A namespace another runtime made (Docker, podman, unshare...), attached to a network.

    netns is the path the node's controller opens (/proc/PID/ns/net or a bind mount); the
    controller adds one veth (`mesh-<network-id>` inside) with the address, and nothing else.
    """

    name: str
    netns: str
    network: str
    node: str
    address: str = ""
    id: str = field(default_factory=new_id)
    created_at: float = 0.0
    # For a netns of the form /proc/PID/ns/net: that process's start time when it was attached.
    # A PID is reused once its process ends; the controller wires nothing into a namespace
    # whose PID no longer names that process (see meshctl.node.desired.container_spec).
    start_time: int | None = None

    def __post_init__(self) -> None:
        check_name(self.name, "container name")
        check_name(self.network, "network name")
        check_name(self.node, "node name")
        if not self.netns.startswith("/"):
            raise ValidationError(
                f"invalid netns {self.netns!r}: give an absolute path like /run/netns/NAME", "netns"
            )
        check_one_line(self.netns, "netns")

    @property
    def pid(self) -> int | None:
        """The process whose namespace netns names, if it is /proc/PID/ns/net."""
        return proc_pid(self.netns)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "netns": self.netns,
            "network": self.network,
            "node": self.node,
            "address": self.address,
            "created_at": self.created_at,
            "start_time": self.start_time,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Container:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})
