"""The fake kernel's shared state: namespaces, each holding what every fake subsystem keeps."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kernel.errors import NotFound

NODE = None  # the namespace the process runs in, as in the real kernel's ns=None


@dataclass
class FakeNamespace:
    """One namespace: each subsystem keeps its state under its own key in `parts`."""

    name: str | None
    parts: dict[str, Any] = field(default_factory=dict)

    def part(self, key: str, factory: Any) -> Any:
        """This subsystem's state in the namespace, made by factory() the first time."""
        if key not in self.parts:
            self.parts[key] = factory()
        return self.parts[key]


@dataclass
class FakeWorld:
    """All fake namespaces; the node (None) always exists, as the real one does."""

    namespaces: dict[str | None, FakeNamespace] = field(
        default_factory=lambda: {NODE: FakeNamespace(NODE)}
    )
    # Called with a namespace's name after it is deleted, so a subsystem can drop what the kernel
    # would drop with it (the veth peer in another namespace, for one).
    on_namespace_deleted: list[Callable[[str], None]] = field(default_factory=list)

    def require(self, ns: str | None) -> FakeNamespace:
        """The namespace, or NotFound as the real kernel.netns.run_in raises it."""
        try:
            return self.namespaces[ns]
        except KeyError:
            raise NotFound(f"network namespace {ns} does not exist") from None


class FakeNetns:
    """kernel.netns.Netns in memory."""

    def __init__(self, world: FakeWorld) -> None:
        self.world = world

    def create(self, name: str) -> None:
        self.world.namespaces.setdefault(name, FakeNamespace(name))

    def delete(self, name: str) -> None:
        if self.world.namespaces.pop(name, None) is not None:
            for hook in self.world.on_namespace_deleted:
                hook(name)

    def exists(self, name: str) -> bool:
        return name in self.world.namespaces

    def list_namespaces(self, prefix: str = "") -> list[str]:
        return sorted(n for n in self.world.namespaces if n is not None and n.startswith(prefix))
