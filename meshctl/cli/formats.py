"""`--format` as docker takes it: `table` (the default), `json`, or a template in a small subset
of Go's text/template applied to each item's JSON document (docs/cli-json.md).

    {{.Name}}  {{.DesiredState}}  {{.Networks}}     a field (case and `_` do not matter)
    {{.Attributes.service}}                        a field of a field
    {{.}}  {{json .}}  {{json .Ports}}             the whole item, a value as JSON
    {{upper .State}}  {{lower .Name}}              case
    {{join .Command " "}}                          a list's items with a separator
    \\t and \\n                                     a tab, a newline (as docker reads them)

A string prints as itself, a number as a number, null as `<nil>`, a list or an object as JSON.
A template is checked before anything runs: an unknown function or a malformed action is a
one-line error; a field an item lacks is one too, naming the fields it has (a key missing in
a map inside it, as `.Attributes.service` of an event without one, prints `<no value>`).
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from meshctl.model import ValidationError

_ACTION = re.compile(r"{{(.*?)}}", re.S)
_PATH = re.compile(r"\.|(\.[A-Za-z_][A-Za-z0-9_]*)+")
FUNCTIONS: dict[str, Callable[..., str]] = {}


def _function(name: str) -> Callable[[Callable[..., str]], Callable[..., str]]:
    def register(fn: Callable[..., str]) -> Callable[..., str]:
        FUNCTIONS[name] = fn
        return fn

    return register


@dataclass(frozen=True)
class _Action:
    function: str  # "" for a plain value
    path: tuple[str, ...]  # () for `.`
    args: tuple[str, ...]  # the literal arguments after the path (join's separator)


Template = list[str | _Action]


def parse(text: str) -> Template:
    """A template as literal text and actions; ValidationError saying what is wrong."""
    text = text.replace("\\t", "\t").replace("\\n", "\n")
    parts: Template = []
    end = 0
    for match in _ACTION.finditer(text):
        parts.append(text[end : match.start()])
        parts.append(_parse_action(match.group(1), text))
        end = match.end()
    rest = text[end:]
    if "{{" in rest or "}}" in rest:
        raise ValidationError(f"invalid --format {text!r}: an action is not closed with }}}}")
    parts.append(rest)
    return [p for p in parts if p != ""]


def _parse_action(body: str, text: str) -> _Action:
    try:
        words = shlex.split(body.strip())
    except ValueError as err:
        raise ValidationError(f"invalid --format {text!r}: {err}") from None
    function = ""
    if words and not words[0].startswith("."):
        function = words.pop(0)
        if function not in FUNCTIONS:
            raise ValidationError(
                f"invalid --format {text!r}: unknown function {function!r}; there are "
                f"{', '.join(sorted(FUNCTIONS))} and fields like {{{{.Name}}}}"
            )
    if not words or not _PATH.fullmatch(words[0]):
        raise ValidationError(
            f"invalid --format {text!r}: {{{{{body.strip()}}}}} needs a field like .Name or ."
        )
    path = tuple(p for p in words[0].split(".") if p)
    args = tuple(words[1:])
    wanted = 1 if function == "join" else 0
    if len(args) != wanted:
        raise ValidationError(
            f"invalid --format {text!r}: {{{{{body.strip()}}}}} takes "
            + ("a separator after the field" if wanted else "only a field")
        )
    return _Action(function, path, args)


def _key(name: str) -> str:
    return name.replace("_", "").lower()


def _lookup(document: Any, path: tuple[str, ...]) -> Any:
    """The value at path: a field the item lacks is an error (a typo), a key a map inside it
    lacks is `<no value>`, as Go's templates have it."""
    value = document
    for depth, step in enumerate(path):
        if not isinstance(value, dict):
            raise ValidationError(f"template: .{step} on a value that has no fields")
        found = [k for k in value if k == step] or [k for k in value if _key(k) == _key(step)]
        if not found and depth > 0:
            return _NO_VALUE
        if not found:
            fields = ", ".join("." + k for k in value)
            raise ValidationError(f"template: no field .{step} here; there are {fields}")
        value = value[found[0]]
    return value


class _NoValue:
    """What a map's missing key renders as."""

    def __str__(self) -> str:
        return "<no value>"


_NO_VALUE = _NoValue()


def _text(value: Any) -> str:
    if value is None:
        return "<nil>"
    if isinstance(value, str | _NoValue):
        return str(value)
    return json.dumps(value)  # numbers, true/false, lists and objects


@_function("json")
def _json(value: Any) -> str:
    return "null" if value is _NO_VALUE else json.dumps(value)


@_function("upper")
def _upper(value: Any) -> str:
    return _text(value).upper()


@_function("lower")
def _lower(value: Any) -> str:
    return _text(value).lower()


@_function("join")
def _join(value: Any, separator: str) -> str:
    if not isinstance(value, list):
        raise ValidationError("template: join takes a list")
    return separator.join(_text(v) for v in value)


def render(template: Template, document: Any) -> str:
    """One item through the template."""
    out = []
    for part in template:
        if isinstance(part, str):
            out.append(part)
            continue
        value = _lookup(document, part.path)
        out.append(FUNCTIONS[part.function](value, *part.args) if part.function else _text(value))
    return "".join(out)


def check(text: str) -> str:
    """A --format value: table, json, or a template (checked here)."""
    if text not in ("table", "json"):
        if "{{" not in text:
            raise ValidationError(
                f"invalid --format {text!r}: use table, json or a template like '{{{{.Name}}}}'"
            )
        parse(text)
    return text
