"""kernel.iptables in memory: tables of chains of canonical Rules per fake namespace.

Behaves as the real one does, checked by tests/conformance/test_iptables.py: a batch applies
wholly or not at all, foreign chains and rules are kept, deleting a chain that is still jumped
to fails. Tests inject foreign state with `add_foreign` and compare whole tables with `save`.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

from kernel import netns
from kernel.errors import KernelError
from kernel.fake.world import FakeWorld
from kernel.iptables_rules import (
    BUILTIN_CHAINS,
    CHAIN_PREFIX,
    NAT_TARGET_CHAINS,
    OwnedTable,
    Rule,
    TableChange,
    check_table,
    is_owned_jump,
    validate,
)

# table -> chain -> rules; builtin chains first, then the others in creation order.
Tables = dict[str, dict[str, list[Rule]]]


def _new_tables() -> Tables:
    return {table: {chain: [] for chain in chains} for table, chains in BUILTIN_CHAINS.items()}


class FakeIptables:
    """IptablesAPI over a FakeWorld; `unavailable` makes available() report that reason."""

    def __init__(self, world: FakeWorld, unavailable: str | None = None) -> None:
        self.world = world
        self.unavailable = unavailable

    def _table(self, ns: netns.Namespace, table: str) -> dict[str, list[Rule]]:
        check_table(table)
        tables: Tables = self.world.require(ns).part("iptables", _new_tables)
        return tables[table]

    def available(self, ns: netns.Namespace) -> str | None:
        self.world.require(ns)
        return self.unavailable

    def list_owned(self, ns: netns.Namespace, table: str) -> OwnedTable:
        chains = self._table(ns, table)
        return OwnedTable(
            chains={n: tuple(rules) for n, rules in chains.items() if n.startswith(CHAIN_PREFIX)},
            jumps=tuple(
                rule for n in BUILTIN_CHAINS[table] for rule in chains[n] if is_owned_jump(rule)
            ),
        )

    def apply(self, ns: netns.Namespace, table: str, change: TableChange) -> None:
        validate(table, change)
        current = self._table(ns, table)
        chains = copy.deepcopy(current)  # committed only if every step succeeds
        for name in (*change.create, *change.replace):
            chains.setdefault(name, [])
        for name in {jump.chain for jump in change.delete_jumps}:
            chains[name] = [rule for rule in chains[name] if rule not in change.delete_jumps]
        for name in (*change.delete, *change.replace):
            if name in chains:
                chains[name] = []
        for name, rules in change.replace.items():
            chains[name] = list(rules)
        for name in dict.fromkeys(jump.chain for jump in change.ensure_jumps):
            wanted = [j for j in change.ensure_jumps if j.chain == name and j not in chains[name]]
            chains[name] = list(dict.fromkeys(wanted)) + chains[name]
        for name in change.delete:
            chains.pop(name, None)
        self._check_targets(ns, table, chains)
        current.clear()
        current.update(chains)

    def apply_tables(self, ns: netns.Namespace, changes: Mapping[str, TableChange]) -> None:
        for table, change in changes.items():
            self.apply(ns, table, change)

    def flush_owned(self, ns: netns.Namespace, table: str) -> None:
        current = self._table(ns, table)
        chains = {
            name: [rule for rule in rules if not is_owned_jump(rule)]
            if name in BUILTIN_CHAINS[table]
            else list(rules)
            for name, rules in current.items()
            if not name.startswith(CHAIN_PREFIX)
        }
        self._check_targets(ns, table, chains)
        current.clear()
        current.update(chains)

    def add_foreign(
        self, ns: netns.Namespace, table: str, chain: str, rule: Rule | None = None
    ) -> None:
        """Stand in for another tool: create `chain` if missing and append `rule` (any comment)."""
        chains = self._table(ns, table)
        chains.setdefault(chain, [])
        if rule is not None:
            chains[chain].append(rule)

    def save(self, ns: netns.Namespace, table: str) -> str:
        """The whole table, foreign and owned, in iptables-save syntax (without counters)."""
        chains = self._table(ns, table)
        lines = [f":{name}" for name in chains]
        lines += [rule.render() for rules in chains.values() for rule in rules]
        return "\n".join(lines)

    @staticmethod
    def _check_targets(ns: netns.Namespace, table: str, chains: dict[str, list[Rule]]) -> None:
        """Refuse what libiptc or the kernel refuse at commit: jumps to missing chains, and NAT
        targets reached from a builtin chain that may not use them."""
        where = f"iptables {table} table in netns {ns or '(node)'}"
        for rules in chains.values():
            for rule in rules:
                if rule.target.startswith(CHAIN_PREFIX) and rule.target not in chains:
                    raise KernelError(
                        f"{where}: rule {rule.render()!r} jumps to chain {rule.target} which "
                        "would not exist; delete the rules that jump to a chain before deleting it"
                    )
        if table != "nat":
            return
        for builtin in BUILTIN_CHAINS[table]:
            seen, todo = {builtin}, [builtin]
            while todo:
                for rule in chains[todo.pop()]:
                    allowed = NAT_TARGET_CHAINS.get(rule.target)
                    if allowed is not None and builtin not in allowed:
                        raise KernelError(
                            f"{where}: rule {rule.render()!r} is reached from {builtin} but "
                            f"{rule.target} works only from {', '.join(sorted(allowed))}: "
                            "jump to its chain from there only"
                        )
                    if rule.target in chains and rule.target not in seen:
                        seen.add(rule.target)
                        todo.append(rule.target)
