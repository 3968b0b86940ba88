"""Diff of what meshctl owns in one iptables table: desired vs observed → one batched change.

Pure: the planner for every namespace (node, load balancer, task) uses it, and a second diff
after applying the change must be empty.
"""

from __future__ import annotations

from collections.abc import Iterator

from kernel.iptables_rules import OwnedTable, TableChange


def table_change(desired: OwnedTable, actual: OwnedTable) -> TableChange | None:
    """The smallest change that makes actual equal desired, or None when they are equal.

    A chain whose rules differ is replaced whole (iptables has no cheaper edit that keeps
    order); chains that are equal are not touched, so a change to one service rebuilds only
    that service's chains.
    """
    replace = {
        chain: rules for chain, rules in desired.chains.items() if actual.chains.get(chain) != rules
    }
    delete = tuple(chain for chain in actual.chains if chain not in desired.chains)
    wanted_jumps = set(desired.jumps)
    present_jumps = set(actual.jumps)
    ensure_jumps = tuple(j for j in desired.jumps if j not in present_jumps)
    delete_jumps = tuple(j for j in actual.jumps if j not in wanted_jumps)
    if not (replace or delete or ensure_jumps or delete_jumps):
        return None
    return TableChange(
        replace=replace, delete=delete, ensure_jumps=ensure_jumps, delete_jumps=delete_jumps
    )


def table_lines(where: str, table: str, change: TableChange) -> Iterator[str]:
    """One `meshctl diff` line per chain replaced or deleted and per jump rule added or removed."""
    for chain, rules in change.replace.items():
        yield f"~ {where}: {table} chain {chain} ({len(rules)} rules)"
    for chain in change.delete:
        yield f"- {where}: {table} chain {chain}"
    for rule in change.ensure_jumps:
        yield f"+ {where}: {table} {rule.render()}"
    for rule in change.delete_jumps:
        yield f"- {where}: {table} {rule.render()}"
