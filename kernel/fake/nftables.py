"""kernel.nftables in memory: meshctl's table per fake namespace, beside other tools' tables.

Behaves as the real one does, checked by tests/conformance/test_nftables.py: a transaction
applies wholly or not at all; it is refused if a rule or element refers to a chain or set that
would not exist, if it deletes an element or chain that is not there, or a chain still referred
to. Tests install another tool's table with `add_foreign` and read every table with `tables`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from kernel import netns
from kernel.errors import KernelError
from kernel.fake.world import FakeWorld
from kernel.nftables_rules import TABLE, Chain, NftChange, NftSet, NftTable, validate

_CHAIN_REF = re.compile(r"\b(?:goto|jump) ([A-Za-z][A-Za-z0-9_.-]*)")
_SET_REF = re.compile(r"@([A-Za-z][A-Za-z0-9_.-]*)")


@dataclass
class _Tables:
    """The namespace's tables by name: meshctl's under TABLE (None: none), others as text."""

    own: NftTable | None = None
    foreign: dict[str, str] = field(default_factory=dict)


class FakeNftables:
    """NftablesAPI over a FakeWorld; `unavailable` makes available() report that reason."""

    def __init__(self, world: FakeWorld, unavailable: str | None = None) -> None:
        self.world = world
        self.unavailable = unavailable

    def _tables(self, ns: netns.Namespace) -> _Tables:
        tables: _Tables = self.world.require(ns).part("nftables", _Tables)
        return tables

    def available(self, ns: netns.Namespace) -> str | None:
        self.world.require(ns)
        return self.unavailable

    def list_table(self, ns: netns.Namespace) -> NftTable:
        return self._tables(ns).own or NftTable()

    def apply(self, ns: netns.Namespace, change: NftChange) -> None:
        validate(change)
        if change.empty:
            return
        tables = self._tables(ns)
        where = f"nftables table ip {TABLE} in netns {ns or '(node)'}"
        table = tables.own or NftTable()
        chains = dict(table.chains)
        sets = {name: dict(s.elements) for name, s in table.sets.items()}
        kinds = {name: s for name, s in table.sets.items()}
        for name, new in change.add_sets.items():
            if name not in sets:
                sets[name], kinds[name] = dict(new.elements), replace(new, elements={})
        for name, chain in change.replace.items():
            old = chains.get(name)
            if old is not None and old.hook != chain.hook:
                raise KernelError(f"{where}: chain {name} exists with another hook")
        for name, keys in change.delete_elements.items():
            for key in keys:
                if key not in sets.get(name, {}):
                    raise KernelError(f"{where}: no element {key} in {name} to delete")
                del sets[name][key]
        for name, chain in change.replace.items():
            old = chains.get(name)
            if name in change.new and old is not None:  # not flushed: its rules stay first
                chain = Chain(old.rules + chain.rules, chain.hook)
            chains[name] = chain
        for name, elements in change.add_elements.items():
            if name not in sets:
                raise KernelError(f"{where}: no set {name} to add elements to")
            sets[name].update(elements)
        for name in change.delete:
            if chains.pop(name, None) is None:
                raise KernelError(f"{where}: no chain {name} to delete")
        for name in change.delete_sets:
            if sets.pop(name, None) is None:
                raise KernelError(f"{where}: no set {name} to delete")
        _check_references(where, chains, sets)
        tables.own = NftTable(
            chains=chains,
            sets={n: NftSet("", kinds[n].map, elements) for n, elements in sets.items()},
        )

    def delete_table(self, ns: netns.Namespace) -> None:
        self._tables(ns).own = None

    def add_foreign(self, ns: netns.Namespace, name: str, text: str) -> None:
        """Stand in for another tool: its table `name` (never meshctl's), as text."""
        assert name != TABLE
        self._tables(ns).foreign[name] = text

    def tables(self, ns: netns.Namespace) -> dict[str, object]:
        """Every table of the namespace: meshctl's and the others'."""
        tables = self._tables(ns)
        own: dict[str, object] = {} if tables.own is None else {TABLE: tables.own}
        return {**tables.foreign, **own}


def _check_references(
    where: str, chains: dict[str, Chain], sets: dict[str, dict[str, str]]
) -> None:
    """Refuse, as the kernel does, a rule or element that refers to what does not exist."""
    texts = [(name, rule) for name, chain in chains.items() for rule in chain.rules]
    texts += [(name, value) for name, elements in sets.items() for value in elements.values()]
    for owner, text in texts:
        for target in _CHAIN_REF.findall(text):
            if target not in chains:
                raise KernelError(
                    f"{where}: {owner} refers to chain {target}, which would not exist"
                )
        for target in _SET_REF.findall(text):
            if target not in sets:
                raise KernelError(f"{where}: {owner} refers to set {target}, which would not exist")
