"""Records read back from the store, decoded into the model's classes."""

from __future__ import annotations

import typing
from typing import Any, TypeVar, cast

from meshctl.model.fields import MeshctlError


class _Decodable(typing.Protocol):
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Any: ...


class _StoredRecord(typing.Protocol):
    """What from_record reads of a store record (meshctl.store.Record)."""

    @property
    def kind(self) -> str: ...

    @property
    def name(self) -> str: ...

    @property
    def value(self) -> Any: ...


D = TypeVar("D", bound=_Decodable)


class CorruptRecordError(MeshctlError):
    """A stored record the model cannot read: hand-edited, damaged, or of another version."""


def from_record(cls: type[D], record: _StoredRecord) -> D:
    """The model object a store record holds; a record it cannot be read from is a one-line
    error naming the record and how to get rid of it, not a KeyError deep in from_dict."""
    try:
        if not isinstance(record.value, dict):
            raise TypeError(f"a JSON object was expected, not {type(record.value).__name__}")
        return cast(D, cls.from_dict(record.value))
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        detail = f"missing field {err}" if isinstance(err, KeyError) else str(err)
        raise CorruptRecordError(
            f"{record.kind} {record.name}: stored record is invalid ({detail}); remove it with: "
            f"meshctl store rm {record.kind} {record.name}"
        ) from None
