"""Tasks: one slot of a service on one node, and the history of its states."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from meshctl.model.fields import (
    DesiredState,
    Health,
    TaskState,
    ValidationError,
    _check_choice,
    new_id,
)


@dataclass(frozen=True)
class Task:
    """One replica (`web.1`): desired state from ops, observed state from the controller.

    node is "" until a node's controller claims the task (a compare-and-swap on its record).
    Stored under its id, so a slot can be re-created while its old task still drains.
    """

    service: str
    service_id: str
    slot: int
    spec_version: int
    desired_state: DesiredState = "running"
    state: TaskState = "pending"
    node: str = ""
    addresses: dict[str, str] = field(default_factory=dict)
    pid: int | None = None
    health: Health = "none"
    exit_code: int | None = None
    error: str = ""
    id: str = field(default_factory=new_id)
    created_at: float = 0.0
    updated_at: float = 0.0
    # With pid, names the process for good (a reused PID starts later): how a restarted
    # controller re-adopts the task instead of starting it again.
    start_time: int | None = None
    restarts: int = 0
    history: tuple[TaskEvent, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "history", tuple(self.history))
        _check_choice(self.desired_state, DesiredState, "task desired state")
        _check_choice(self.state, TaskState, "task state")
        _check_choice(self.health, Health, "task health")
        if self.slot < 1:
            raise ValidationError(f"invalid task slot {self.slot}: slots start at 1")

    @property
    def name(self) -> str:
        return f"{self.service}.{self.slot}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "service": self.service,
            "service_id": self.service_id,
            "slot": self.slot,
            "spec_version": self.spec_version,
            "desired_state": self.desired_state,
            "state": self.state,
            "node": self.node,
            "addresses": dict(self.addresses),
            "pid": self.pid,
            "health": self.health,
            "exit_code": self.exit_code,
            "error": self.error,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "start_time": self.start_time,
            "restarts": self.restarts,
            "history": [e.to_dict() for e in self.history],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Task:
        fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data and k != "history"}
        history = tuple(TaskEvent.from_dict(e) for e in data.get("history", ()))
        return cls(**fields, history=history)

    def with_event(self, now: float, state: TaskState, message: str = "") -> Task:
        """The task in `state`, the transition recorded (the last HISTORY_SIZE are kept)."""
        event = TaskEvent(now, state, message)
        history = (*self.history, event)[-HISTORY_SIZE:]
        return replace(self, state=state, updated_at=now, history=history)


HISTORY_SIZE = 10


@dataclass(frozen=True)
class TaskEvent:
    """One transition of a task: when, into which observed state, and why."""

    time: float
    state: str
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"time": self.time, "state": self.state, "message": self.message}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskEvent:
        return cls(float(data["time"]), str(data["state"]), str(data.get("message", "")))
