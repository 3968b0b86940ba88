"""The command line's names for the model's fields: a ValidationError names the field it is
about, and the CLI reports it under the flag that set it."""

from __future__ import annotations

from meshctl.model import ValidationError


def flag_error(err: ValidationError) -> str:
    """The error's one line as the command line says it."""
    return str(err)
