"""meshctl's nftables table as data: its chains, rules, sets and maps in canonical form, the
checks that keep a transaction inside it, the `nft -f` text of a transaction and the parser of
`nft -j list table` output. Pure: kernel.nftables_messages makes a transaction's netlink
messages, kernel.nftables sends them and runs nft to read.

meshctl owns one table per namespace, `ip meshctl`, and never names another: every command this
module renders starts with `<verb> <object> ip meshctl`, and no rule, name or element may hold a
character that could end a command (`;`, `#`, a line break). A rule is the text nft prints for
it (`nft list`), so what a transaction writes is what a read parses back and a planner diffs
desired against observed by equality (tests/conformance/test_nftables.py holds each form meshctl
writes to that).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

FAMILY = "ip"
TABLE = "meshctl"
WHERE = f"{FAMILY} {TABLE}"

_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,127}")
_UNSAFE = re.compile(r"[;#\n\r]")


@dataclass(frozen=True)
class Hook:
    """What makes a chain a base chain: `type nat hook prerouting priority -100`."""

    type: str
    hook: str
    priority: int

    def render(self) -> str:
        return f"type {self.type} hook {self.hook} priority {self.priority}; policy accept;"


@dataclass(frozen=True)
class Chain:
    """A chain's rules in order (each as nft prints it), and its hook if it is a base chain."""

    rules: tuple[str, ...] = ()
    hook: Hook | None = None


@dataclass(frozen=True)
class NftSet:
    """A named set or map (`map`). `declare` is its type (`type ipv4_addr : verdict`): it is
    written, not read back, so two sets compare by kind and elements. elements: key -> value,
    "" for a set's."""

    declare: str = field(compare=False)
    map: bool = False
    elements: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class NftTable:
    """What meshctl holds in its table of one namespace (empty: no table)."""

    chains: Mapping[str, Chain] = field(default_factory=dict)
    sets: Mapping[str, NftSet] = field(default_factory=dict)


@dataclass(frozen=True)
class NftChange:
    """One transaction on the meshctl table, made in this order: the table with the sets of
    `add_sets` and the chains of `replace` (each declared if missing), element deletions, the
    `replace` chains flushed (but those in `new`, known not to exist) and filled, element
    additions, `delete` chains flushed, `delete_sets` deleted, `delete` chains deleted. A map
    element whose value changes is deleted and added again."""

    add_sets: Mapping[str, NftSet] = field(default_factory=dict)
    replace: Mapping[str, Chain] = field(default_factory=dict)
    new: frozenset[str] = frozenset()
    delete_elements: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    add_elements: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    delete: tuple[str, ...] = ()
    delete_sets: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not any(
            (
                self.add_sets,
                self.replace,
                self.delete_elements,
                self.add_elements,
                self.delete,
                self.delete_sets,
            )
        )


def table_change(desired: NftTable, held: NftTable) -> NftChange:
    """The smallest transaction from held to desired: chains whose rules (or hook) differ are
    replaced whole, equal ones untouched; set elements are added and deleted one by one."""
    replace = {n: c for n, c in desired.chains.items() if held.chains.get(n) != c}
    new = frozenset(n for n in replace if n not in held.chains)
    delete = tuple(n for n in held.chains if n not in desired.chains)
    add_sets = {n: s for n, s in desired.sets.items() if n not in held.sets}
    add_elements: dict[str, dict[str, str]] = {}
    delete_elements: dict[str, tuple[str, ...]] = {}
    for name, wanted in desired.sets.items():
        have = held.sets[name].elements if name in held.sets else {}
        added = {k: v for k, v in wanted.elements.items() if have.get(k) != v}
        gone = tuple(k for k, v in have.items() if wanted.elements.get(k) != v)
        if added:
            add_elements[name] = added
        if gone:
            delete_elements[name] = gone
    delete_sets = tuple(n for n in held.sets if n not in desired.sets)
    return NftChange(add_sets, replace, new, delete_elements, add_elements, delete, delete_sets)


def validate(change: NftChange) -> None:
    """Refuse (ValueError) what could reach beyond meshctl's table or end a command early."""
    names = [
        *change.add_sets,
        *change.replace,
        *change.delete_elements,
        *change.add_elements,
        *change.delete,
        *change.delete_sets,
    ]
    for name in names:
        if not _NAME.fullmatch(name):
            raise ValueError(
                f"nftables name {name!r}: use a letter, then letters, digits, '_', '.' or '-'"
            )
    texts = [
        *(s.declare for s in change.add_sets.values()),
        *(rule for chain in change.replace.values() for rule in chain.rules),
        *(key for keys in change.delete_elements.values() for key in keys),
        *(text for elements in change.add_elements.values() for item in elements.items()
          for text in item),
    ]  # fmt: skip
    for text in texts:
        if _UNSAFE.search(text):
            raise ValueError(f"{text!r}: nftables rules and elements cannot hold ';', '#' or a "
                             "line break here")  # fmt: skip


def _elements(items: Iterator[str]) -> str:
    return "{ " + ", ".join(items) + " }"


def transaction_lines(change: NftChange) -> Iterator[str]:
    """The `nft -f` text of the change, one transaction (validate() it first): what
    kernel.nftables_messages' messages are checked against, byte for byte, through nft.

    Chains are declared and filled in `table { chain { ... } }` blocks, not one `add rule`
    command per rule: nft 1.0.6 took 36 s for 3,000 services' chains as commands, 7.5 s as
    blocks."""
    yield f"table {WHERE} {{"
    for name, nft_set in change.add_sets.items():
        yield f"{'map' if nft_set.map else 'set'} {name} {{ {nft_set.declare}; }}"
    for name, chain in change.replace.items():
        yield f"chain {name} {{ {chain.hook.render() if chain.hook else ''} }}"
    yield "}"
    for name, keys in change.delete_elements.items():
        yield f"delete element {WHERE} {name} {_elements(iter(keys))}"
    for name in change.replace:
        if name not in change.new:
            yield f"flush chain {WHERE} {name}"
    yield f"table {WHERE} {{"
    for name, chain in change.replace.items():
        if chain.rules:
            yield f"chain {name} {{ " + "".join(f"{rule}; " for rule in chain.rules) + "}"
    yield "}"
    for name, elements in change.add_elements.items():
        if elements:
            items = (f"{k} : {v}" if v else k for k, v in elements.items())
            yield f"add element {WHERE} {name} {_elements(items)}"
    for name in change.delete:
        yield f"flush chain {WHERE} {name}"
    for name in change.delete_sets:  # their elements may refer to the chains deleted next
        yield f"delete set {WHERE} {name}"
    for name in change.delete:
        yield f"delete chain {WHERE} {name}"


# -- reading: `nft -j list table ip meshctl` -----------------------------------------------------


class _Unknown(Exception):
    """An expression this parser does not render: its rule equals none meshctl writes."""


def _value(e: Any) -> str:
    """A key, value or operand as nft prints it."""
    if isinstance(e, bool):
        raise _Unknown
    if isinstance(e, str | int):
        return str(e)
    if isinstance(e, list):
        return ", ".join(map(_value, e))
    if not isinstance(e, dict) or len(e) != 1:
        raise _Unknown
    ((kind, body),) = e.items()
    if kind == "payload" and "protocol" in body:
        return f"{body['protocol']} {body['field']}"
    if kind in ("meta", "ct") and set(body) == {"key"}:
        return f"{kind} {body['key']}"
    if kind == "numgen":
        offset = f" offset {body['offset']}" if body.get("offset") else ""
        return f"numgen {body['mode']} mod {body['mod']}{offset}"
    if kind == "concat":
        return " . ".join(map(_value, body))
    if kind == "prefix":
        return f"{_value(body['addr'])}/{body['len']}"
    if kind == "set":
        items = body if isinstance(body, list) else [body]
        return "{ " + ", ".join(_element(item) for item in items) + " }"
    if kind in ("goto", "jump"):
        return f"{kind} {body['target']}"
    if kind in ("accept", "drop", "return", "continue") and body is None:
        return kind
    raise _Unknown


def _element(item: Any) -> str:
    if isinstance(item, list) and len(item) == 2:
        return f"{_value(item[0])} : {_value(item[1])}"
    return _value(item)


def _statement(s: Any) -> str:
    """One statement of a rule as nft prints it."""
    if not isinstance(s, dict) or len(s) != 1:
        raise _Unknown
    ((kind, body),) = s.items()
    if kind == "match":
        op = body["op"]
        left, right = _value(body["left"]), _value(body["right"])
        return f"{left} {right}" if op in ("==", "in") else f"{left} {op} {right}"
    if kind == "vmap":
        return f"{_value(body['key'])} vmap {_value(body['data'])}"
    if kind in ("dnat", "snat") and set(body) <= {"addr", "port"}:
        port = f":{body['port']}" if "port" in body else ""
        return f"{kind} to {_value(body['addr'])}{port}"
    if kind in ("masquerade", "notrack") and body is None:
        return kind
    if kind == "reject":
        if body is None:
            return "reject"
        if body.get("type") == "tcp reset":
            return "reject with tcp reset"
        if body.get("type") == "icmp" and "expr" in body:
            return f"reject with icmp {body['expr']}"
        raise _Unknown
    if kind == "mangle":
        return f"{_value(body['key'])} set {_value(body['value'])}"
    if kind == "counter":
        return "counter"
    return _value(s)  # a verdict


def rule_text(expressions: list[Any]) -> str:
    """A rule's JSON expressions as nft prints the rule; one this parser cannot render becomes
    `unparsed <json>`, which equals no rule meshctl writes (its chain is then rewritten)."""
    try:
        return " ".join(map(_statement, expressions))
    except (_Unknown, KeyError, TypeError, ValueError):
        return "unparsed " + json.dumps(expressions, sort_keys=True)


def parse_table(listing: str) -> NftTable:
    """The meshctl table of one `nft -j list table ip meshctl` output."""
    chains: dict[str, tuple[Hook | None, list[str]]] = {}
    sets: dict[str, NftSet] = {}
    for item in json.loads(listing).get("nftables", []):
        if "chain" in item:
            c = item["chain"]
            hook = Hook(c["type"], c["hook"], int(c["prio"])) if "hook" in c else None
            chains[c["name"]] = (hook, [])
        elif "rule" in item:
            r = item["rule"]
            chains.setdefault(r["chain"], (None, []))[1].append(rule_text(r["expr"]))
        elif "set" in item or "map" in item:
            is_map = "map" in item
            s = item["map" if is_map else "set"]
            elements = {}
            for elem in s.get("elem", []):
                if is_map:
                    elements[_member(elem[0])] = _member(elem[1])
                else:
                    elements[_member(elem)] = ""
            sets[s["name"]] = NftSet("", is_map, elements)
    return NftTable(
        chains={name: Chain(tuple(rules), hook) for name, (hook, rules) in chains.items()},
        sets=sets,
    )


def _member(e: Any) -> str:
    """An element's key or value (an element with options, such as a timeout, by its value)."""
    if isinstance(e, dict) and "elem" in e:
        e = e["elem"]["val"]
    try:
        return _value(e)
    except _Unknown:
        return "unparsed " + json.dumps(e, sort_keys=True)
