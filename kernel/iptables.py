"""Netfilter through iptables-legacy-save and -restore: meshctl's own MESH-* chains, in batches.

A batch (`TableChange`, kernel.iptables_rules) is one commit of `iptables-legacy-restore
--noflush`: a controller rebuilds just the chains of the services that changed, atomically;
`apply_tables` writes several tables' batches in one run, streamed to the tool as they are
rendered. A table is read with one `iptables-legacy-save` run. Text in and out is what kube-proxy
does; building rules as libiptc objects from Python (python-iptables) measured 28x slower than
restore. This module runs the tools; the rules, their checks and their text are
kernel.iptables_rules'.
"""

from __future__ import annotations

import itertools
import re
import threading
from collections.abc import Iterable, Mapping
from typing import Protocol

from kernel import netns
from kernel.errors import KernelError
from kernel.gcpause import gc_paused
from kernel.iptables_rules import (
    OwnedTable,
    TableChange,
    check_table,
    flush_lines,
    list_owned_lines,
    needs_reading,
    restore_lines,
    table_batch,
    validate_frame,
)
from kernel.tool import Tool


class IptablesAPI(Protocol):
    """The netfilter verbs the controller uses; kernel.fake.iptables.FakeIptables implements it."""

    def available(self, ns: netns.Namespace) -> str | None: ...

    def list_owned(self, ns: netns.Namespace, table: str) -> OwnedTable: ...

    def apply(self, ns: netns.Namespace, table: str, change: TableChange) -> None: ...

    def apply_tables(self, ns: netns.Namespace, changes: Mapping[str, TableChange]) -> None: ...

    def flush_owned(self, ns: netns.Namespace, table: str) -> None: ...


# Every table edit meshctl makes goes through this lock, so meshctl's own read-then-write batches
# (the jump rules) never interleave; other tools are kept apart by the xtables lock (-w).
_LOCK = threading.Lock()

SAVE = "iptables-legacy-save"
RESTORE = "iptables-legacy-restore"
WAIT_SECONDS = "10"  # for the xtables lock, held by any other iptables command running
_READ_HINT = "check that legacy iptables works here (`meshctl doctor`)"
_WRITE_HINT = (
    f"{_READ_HINT}, that no rule still jumps to a "
    "chain being deleted, and that every target suits the builtin chains that reach it "
    "(SNAT/MASQUERADE only from POSTROUTING/INPUT, DNAT/REDIRECT only from PREROUTING/OUTPUT)"
)


IPTABLES = Tool(
    package="Debian's iptables package (apt-get install iptables: iptables-legacy-save/-restore)",
    denied=("ermission denied", "must be root"),
    lines="iptables rules and chain names",
    failed_line=re.compile(r"line:? (\d+)"),
)


def _run(
    ns: netns.Namespace, what: str, command: list[str], stdin: Iterable[str] | None = None
) -> str:
    """Run an iptables tool inside ns (kernel.tool), with the hint for a read or a write."""
    return IPTABLES.run(ns, what, command, stdin, _WRITE_HINT if stdin is not None else _READ_HINT)


def _made(ns: netns.Namespace, table: str) -> bool:
    """Whether the kernel has made the legacy table in ns yet: it does on first use, so a
    namespace nobody wrote iptables rules in (every task's, where nftables runs) answers
    without starting iptables-legacy-save, which would make it."""

    def read() -> bool:
        try:
            with open("/proc/thread-self/net/ip_tables_names") as names:
                return table in names.read().split()
        except FileNotFoundError:
            return False  # no legacy iptables in this kernel: no table either

    return netns.run_in(ns, read)


def _save(ns: netns.Namespace, table: str) -> list[str]:
    """The lines of `iptables-legacy-save -t table` in ns."""
    return _run(ns, f"reading the iptables {table} table", [SAVE, "-t", table]).splitlines()


def _restore(ns: netns.Namespace, table: str, lines: Iterable[str]) -> None:
    """Feed one batch to iptables-legacy-restore in ns: one commit, all or nothing."""
    command = [RESTORE, "--noflush", "-w", WAIT_SECONDS]
    _run(ns, f"writing the iptables {table} table", command, table_batch(table, iter(lines)))


def _saved(ns: netns.Namespace, tables: list[str]) -> dict[str, list[str]]:
    """The saved lines of each table, read by one iptables-legacy-save run; a table that the
    namespace has never used is not printed, and is empty."""
    if len(tables) < 2:
        return {table: _save(ns, table) for table in tables}
    saved: dict[str, list[str]] = {table: [] for table in tables}
    lines: list[str] = []
    for line in _run(ns, "reading the iptables tables", [SAVE]).splitlines():
        if line.startswith("*"):
            lines = saved.setdefault(line[1:], [])
        lines.append(line)
    return {table: saved[table] for table in tables}


class Iptables:
    """IptablesAPI on the real kernel through iptables-legacy-save and iptables-legacy-restore."""

    def available(self, ns: netns.Namespace) -> str | None:
        """None if legacy iptables can be read and written in ns, else a one-line reason."""
        try:
            for table in ("filter", "nat"):
                _save(ns, table)
                _run(
                    ns, f"testing a write to {table}", [RESTORE, "--test"], [f"*{table}", "COMMIT"]
                )
        except KernelError as err:
            return f"legacy iptables does not work: {err}"
        return None

    def list_owned(self, ns: netns.Namespace, table: str) -> OwnedTable:
        """meshctl's chains and jump rules in `table` of ns; nothing foreign."""
        check_table(table)
        if not _made(ns, table):
            return OwnedTable()  # nothing can be in it; reading it would make it
        lines = _save(ns, table)
        with gc_paused():
            return list_owned_lines(lines, table)

    def apply(self, ns: netns.Namespace, table: str, change: TableChange) -> None:
        """Apply one batch to `table` of ns in one commit; a refused change changes nothing
        (a refused rule stops the restore tool before its commit)."""
        self.apply_tables(ns, {table: change})

    def apply_tables(self, ns: netns.Namespace, changes: Mapping[str, TableChange]) -> None:
        """Apply a batch to each table, in the order given, through one restore run (and one
        save where some need reading). Each table's batch is one commit, all or nothing: a
        table refused or failing is left unchanged, the tables before it may be changed."""
        for table, change in changes.items():
            validate_frame(table, change)
        with _LOCK:
            saved = _saved(ns, [t for t, change in changes.items() if needs_reading(change)])
            batch = itertools.chain.from_iterable(
                table_batch(table, restore_lines(table, change, saved.get(table)))
                for table, change in changes.items()
            )
            first = next(batch, None)
            if first is not None:  # else the tables hold the changes already
                command = [RESTORE, "--noflush", "-w", WAIT_SECONDS]
                _run(ns, f"writing the iptables {'/'.join(changes)} tables", command,
                     itertools.chain([first], batch))  # fmt: skip

    def flush_owned(self, ns: netns.Namespace, table: str) -> None:
        """Remove every MESH-* chain and meshctl jump rule from `table` of ns, nothing else."""
        check_table(table)
        with _LOCK:
            lines = flush_lines(table, _save(ns, table))
            if lines:
                _restore(ns, table, lines)
