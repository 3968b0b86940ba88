"""Netfilter through iptables-legacy-save and -restore: meshctl's own MESH-* chains, in batches.

meshctl owns only chains named MESH-*, every rule it writes carries a `meshctl:<object-id>` comment,
and its only edit outside its chains is one commented jump rule per builtin chain. A batch
(`TableChange`) is one commit of `iptables-legacy-restore --noflush`: a controller rebuilds just
the chains of the services that changed, atomically; `apply_tables` writes several tables' batches
in one run, streamed to the tool as they are rendered. A table is read with one
`iptables-legacy-save` run. Text in and out is what kube-proxy does; building rules as libiptc
objects from Python (python-iptables) measured 28x slower than restore.

Rules are plain frozen dataclasses in a canonical form: what `apply` writes is exactly what
`list_owned` reads back, so a planner diffs desired against observed by equality.
"""

from __future__ import annotations

import functools
import ipaddress
import itertools
import math
import re
import subprocess
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from kernel import netns
from kernel.errors import KernelError, PermissionDenied, Unsupported
from kernel.gcpause import gc_paused

CHAIN_PREFIX = "MESH-"
COMMENT_PREFIX = "meshctl:"
COMMENT_MAX = 255  # xt_comment keeps 256 bytes including the terminating NUL

BUILTIN_CHAINS: Mapping[str, tuple[str, ...]] = {
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
    "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
    "raw": ("PREROUTING", "OUTPUT"),
}

# The builtin nat chains from which the kernel accepts each NAT target (anywhere they are reached
# from, through any jumps); a commit that breaks this fails with EINVAL.
NAT_TARGET_CHAINS: Mapping[str, frozenset[str]] = {
    "DNAT": frozenset({"PREROUTING", "OUTPUT"}),
    "REDIRECT": frozenset({"PREROUTING", "OUTPUT"}),
    "SNAT": frozenset({"POSTROUTING", "INPUT"}),
    "MASQUERADE": frozenset({"POSTROUTING"}),
}

# conntrack prints --ctstate in this order whatever order it was given in.
_CT_STATES = ("INVALID", "NEW", "RELATED", "ESTABLISHED", "UNTRACKED", "SNAT", "DNAT")
_ALL_BITS = 0xFFFFFFFF

Args = tuple[tuple[str, str], ...]


def opts(**options: str | int | float) -> Args:
    """Keyword options as (option, value) pairs: opts(to_destination="10.0.0.2:80")."""
    return tuple((key.replace("_", "-"), str(value)) for key, value in options.items())


def _hex_mask(value: str, default_mask: int | None) -> tuple[int, int | None]:
    """Parse "V" or "V/M" (any base) into integers; default_mask fills a missing mask."""
    mark, _, mask = value.partition("/")
    return int(mark, 0), int(mask, 0) if mask else default_mask


def _canonical_value(module: str, key: str, value: str) -> tuple[str, str]:
    """One option as iptables-save prints it back, so written and read rules compare equal."""
    if module == "statistic" and key == "probability":
        # The kernel keeps the probability as a 31-bit fraction and prints it with 11 decimals.
        fraction = math.floor(float(value) * 0x80000000 + 0.5)
        return key, f"{fraction / 0x80000000:.11f}"
    if module == "mark" and key == "mark":
        mark, mask = _hex_mask(value, _ALL_BITS)
        return key, f"{mark:#x}" if mask == _ALL_BITS else f"{mark:#x}/{mask:#x}"
    if module == "conntrack" and key == "ctstate":
        states = {state.strip().upper() for state in value.split(",")}
        unknown = states - set(_CT_STATES)
        if unknown:
            raise ValueError(f"unknown conntrack state(s) {sorted(unknown)}; use {_CT_STATES}")
        return key, ",".join(state for state in _CT_STATES if state in states)
    if module == "addrtype":
        return key, value.upper()
    if module == "MARK" and key in ("set-mark", "set-xmark"):
        mark, mask = _hex_mask(value, None)
        # --set-mark V/M is stored as --set-xmark V/(V|M); a bare value clears every other bit.
        if mask is None:
            mask = _ALL_BITS
        elif key == "set-mark":
            mask |= mark
        return "set-xmark", f"{mark:#x}/{mask:#x}"
    return key, value


# Modules whose option values _canonical_value rewrites; the others' values stay as given.
_REWRITTEN = frozenset({"statistic", "mark", "conntrack", "addrtype", "MARK", "REJECT"})


def _canonical_args(module: str, args: Args) -> Args:
    """Options of a match or target in canonical form, sorted by name (their order is free)."""
    if module not in _REWRITTEN and len(args) < 2:  # the common case, kept cheap for planners
        if not args or (type(args[0][0]) is str and type(args[0][1]) is str):
            return args
        return tuple((str(k), str(v)) for k, v in args)
    return _rewritten_args(module, args)


@functools.lru_cache(maxsize=4096)  # planners build the same few matches thousands of times
def _rewritten_args(module: str, args: Args) -> Args:
    pairs = dict(_canonical_value(module, str(k), str(v)) for k, v in args)
    if module == "REJECT":
        pairs.setdefault("reject-with", "icmp-port-unreachable")  # the kernel's default, printed
    return tuple(sorted(pairs.items()))


@functools.lru_cache(
    maxsize=65536
)  # planners and the parser meet the same addresses again and again
def _canonical_cidr(value: str | None) -> str | None:
    """An address or network as a.b.c.d/len with host bits cleared; "any" is None."""
    if value is None:
        return None
    network = ipaddress.ip_network(value, strict=False)
    return None if network.prefixlen == 0 else str(network)


@dataclass(frozen=True)
class Match:
    """One `-m NAME --option value ...` match; args are canonicalised on construction."""

    name: str
    args: Args = ()

    def __post_init__(self) -> None:
        if self.name == "comment":
            raise ValueError("put the comment in Rule.comment, not in a comment match")
        object.__setattr__(self, "args", _canonical_args(self.name, self.args))


@dataclass(frozen=True)
class Rule:
    """One rule of `chain`, in canonical form (hashable; equal rules are equal in the kernel).

    `target` is a verdict (ACCEPT, DROP, RETURN), an extension (DNAT, SNAT, MASQUERADE,
    REDIRECT, REJECT, MARK) with `target_args`, or the name of a chain to jump to. The comment
    is written as the last match; rules meshctl writes must carry `meshctl:<object-id>`.
    """

    chain: str
    target: str
    comment: str = ""
    target_args: Args = ()
    source: str | None = None
    destination: str | None = None
    protocol: str | None = None
    in_interface: str | None = None
    out_interface: str | None = None
    matches: tuple[Match, ...] = ()

    def __post_init__(self) -> None:
        # Fields already in canonical form (most of them, in the rules planners build by the
        # hundred thousand) are left alone: each rewrite of a frozen field costs a call.
        if self.source is not None:
            object.__setattr__(self, "source", _canonical_cidr(self.source))
        if self.destination is not None:
            object.__setattr__(self, "destination", _canonical_cidr(self.destination))
        if self.protocol is not None:
            protocol = self.protocol.lower()
            object.__setattr__(
                self, "protocol", None if protocol in ("", "ip", "all") else protocol
            )
        if type(self.matches) is not tuple:
            object.__setattr__(self, "matches", tuple(self.matches))
        if self.target_args or self.target in _REWRITTEN:  # REJECT has a default to print
            object.__setattr__(self, "target_args", _canonical_args(self.target, self.target_args))

    def render(self) -> str:
        """The rule exactly as iptables-save prints it ("-A CHAIN ... -j TARGET ...")."""
        return f"-A {self.chain} {self._spec()}"

    def _spec(self) -> str:
        """The rule without "-A CHAIN": what follows the chain in -A, -I and -D commands."""
        words: list[str] = []
        if self.source is not None:
            words += ("-s", self.source)
        if self.destination is not None:
            words += ("-d", self.destination)
        if self.in_interface is not None:
            words += ("-i", self.in_interface)
        if self.out_interface is not None:
            words += ("-o", self.out_interface)
        if self.protocol is not None:
            words += ("-p", self.protocol)
        for match in self.matches:
            words += ("-m", match.name)
            _add_options(words, match.args)
        if self.comment:
            words += ("-m", "comment", "--comment", _save_string(self.comment))
        words += ("-j", self.target)
        _add_options(words, self.target_args)
        return " ".join(words)


_BARE = frozenset("_-0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_TO_ESCAPE = re.compile(r"[\\\"']")


def _save_string(value: str) -> str:
    """A string option (a comment) as iptables-save prints it and iptables-restore reads it:
    bare if only letters, digits, '_' and '-', else in double quotes with \\, " and ' escaped."""
    if value and _BARE.issuperset(value):
        return value
    if '"' in value or "'" in value or "\\" in value:
        value = _TO_ESCAPE.sub(r"\\\g<0>", value)
    return f'"{value}"'


def _add_options(words: list[str], args: Args) -> None:
    # A value of several words (--tcp-flags SYN,ACK SYN) stays several words, as iptables wants.
    for key, value in args:
        words.append(f"--{key}")
        if value:
            words.append(value)


@dataclass(frozen=True)
class OwnedTable:
    """What meshctl owns in one table: its MESH-* chains (rules in order) and its jump rules."""

    chains: Mapping[str, tuple[Rule, ...]] = field(default_factory=dict)
    jumps: tuple[Rule, ...] = ()  # meshctl-commented rules of builtin chains, chain by chain


@dataclass(frozen=True)
class TableChange:
    """One batch for one table, applied in a single commit.

    Order: create chains (`create` and the missing ones of `replace`), delete `delete_jumps`,
    empty `delete` and `replace` chains, fill `replace` chains, insert missing `ensure_jumps` at
    the top of their builtin chain (in the order given), then delete the `delete` chains.
    """

    create: tuple[str, ...] = ()
    replace: Mapping[str, tuple[Rule, ...]] = field(default_factory=dict)
    delete: tuple[str, ...] = ()
    ensure_jumps: tuple[Rule, ...] = ()
    delete_jumps: tuple[Rule, ...] = ()


def check_table(table: str) -> None:
    if table not in BUILTIN_CHAINS:
        raise ValueError(f"unknown table {table!r}; use one of {sorted(BUILTIN_CHAINS)}")


def _check_owned_chain(chain: str) -> None:
    if not chain.startswith(CHAIN_PREFIX) or len(chain) > 28:
        raise ValueError(
            f"chain {chain!r} is not meshctl's: meshctl writes only chains named "
            f"{CHAIN_PREFIX}* of at most 28 characters"
        )


def _check_commented(rule: Rule) -> None:
    if not rule.comment.startswith(COMMENT_PREFIX) or len(rule.comment) > COMMENT_MAX:
        raise ValueError(
            f"rule {rule.render()!r} needs a comment '{COMMENT_PREFIX}<object-id>' of at most "
            f"{COMMENT_MAX} characters: every rule meshctl writes must say it is meshctl's"
        )


_PORT_TARGETS = frozenset({"REDIRECT", "DNAT", "SNAT"})  # targets whose options may carry ports


def _check_protocol(rule: Rule) -> None:
    """Ports need their protocol, as iptables insists (it fails with an obscure parameter error)."""
    if rule.protocol is None and not rule.matches and rule.target not in _PORT_TARGETS:
        return  # the common case (no ports anywhere), checked cheaply: planners write thousands
    needs: list[tuple[str, ...]] = [(m.name,) for m in rule.matches if m.name in ("tcp", "udp")]
    to = dict(rule.target_args)
    if rule.target == "REDIRECT" or ":" in to.get("to-destination", to.get("to-source", "")):
        needs.append(("tcp", "udp"))
    for protocols in needs:
        if rule.protocol not in protocols:
            raise ValueError(
                f"rule {rule.render()!r} uses ports: give it protocol={' or '.join(protocols)} (-p)"
            )


def validate(table: str, change: TableChange) -> None:
    """Refuse (ValueError) a change that would touch anything meshctl does not own."""
    _validate_frame(table, change)
    for chain, rules in change.replace.items():
        for rule in rules:
            _check_rule(chain, rule)


def _check_rule(chain: str, rule: Rule) -> None:
    _check_commented(rule)
    _check_protocol(rule)
    if rule.chain != chain:
        raise ValueError(f"rule {rule.render()!r} is listed under chain {chain}")


def _validate_frame(table: str, change: TableChange) -> None:
    """validate() but for the rules of replaced chains (restore_lines checks each as it goes)."""
    check_table(table)
    for chain in (*change.create, *change.replace, *change.delete):
        _check_owned_chain(chain)
    for jump in (*change.ensure_jumps, *change.delete_jumps):
        _check_commented(jump)
        _check_protocol(jump)
        if jump.chain not in BUILTIN_CHAINS[table] or not jump.target.startswith(CHAIN_PREFIX):
            raise ValueError(
                f"jump rule {jump.render()!r} must go from a builtin chain of the {table} table "
                f"({', '.join(BUILTIN_CHAINS[table])}) to a {CHAIN_PREFIX}* chain"
            )


def is_owned_jump(rule: Rule) -> bool:
    """A rule of a builtin chain that meshctl wrote (and so may delete)."""
    return rule.comment.startswith(COMMENT_PREFIX)


class IptablesAPI(Protocol):
    """The netfilter verbs the controller uses; kernel.fake.iptables.FakeIptables implements it."""

    def available(self, ns: netns.Namespace) -> str | None: ...

    def list_owned(self, ns: netns.Namespace, table: str) -> OwnedTable: ...

    def apply(self, ns: netns.Namespace, table: str, change: TableChange) -> None: ...

    def apply_tables(self, ns: netns.Namespace, changes: Mapping[str, TableChange]) -> None: ...

    def flush_owned(self, ns: netns.Namespace, table: str) -> None: ...


_ADDRESSING = frozenset({"-s", "-d", "-i", "-o", "-p"})  # the fields a Rule has, besides matches
_COMMENT_MATCH = " -m comment --comment "
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')
_ESCAPED = re.compile(r"\\(.)")


def _options(words: list[str]) -> Args:
    """The `--key value...` options of a match or target: a flag gets the value "", the values
    of a multi-word option (--tcp-flags SYN,ACK SYN) are joined with spaces."""
    args: list[tuple[str, str]] = []
    for word in words:
        if word.startswith("--"):
            args.append((word[2:], ""))
        elif args:
            key, value = args[-1]
            args[-1] = (key, f"{value} {word}" if value else word)
        else:
            raise ValueError(f"{word!r} is not an option")
    return tuple(args)


@functools.lru_cache(maxsize=4096)  # a table repeats a few matches (probabilities, ports) often
def _match(text: str) -> Match:
    """A saved `-m NAME --option value...` (without the leading "-m ") as a canonical Match."""
    name, *words = text.split()
    return Match(name, _options(words))


def _cut_comment(line: str) -> tuple[str, str | None]:
    """The rule's (first) comment, and the line without its comment match: None when the line
    has a second comment or another quoted string, which a Rule cannot hold."""
    start = line.find(_COMMENT_MATCH)
    if start < 0:
        return "", None if '"' in line else line
    at = start + len(_COMMENT_MATCH)
    if line.startswith('"', at):
        end = line.find('"', at + 1) + 1
        comment = line[at + 1 : end - 1]
        if "\\" in comment or not end:  # an escaped quote may end it later: the slow way
            quoted = _QUOTED.match(line, at)
            if quoted is None:
                return "", None
            comment, end = _ESCAPED.sub(r"\1", quoted.group(1)), quoted.end()
    else:  # iptables-save leaves a comment of only letters, digits, '_' and '-' bare
        end = line.find(" ", at)
        end = len(line) if end < 0 else end
        comment = line[at:end]
    rest = line[:start] + line[end:]
    return comment, None if '"' in rest or _COMMENT_MATCH in rest else rest


def parse_rule(line: str) -> Rule:
    """One `-A CHAIN ...` line of iptables-save as the Rule a planner would build for it.

    A rule a Rule cannot express (negation, goto, fragments, no target, two comments) becomes
    one that carries its saved text in an `unparsed` match: it equals no rule meshctl wants, so
    a planner rewrites its chain (or deletes it, if it is a meshctl jump) instead of failing.
    """
    comment, rest = _cut_comment(line)
    if rest is not None and " ! " not in rest and " -j " in rest:
        head, _, tail = rest.partition(" -j ")
        first, *modules = head.split(" -m ")
        words = first.split()
        target, *options = tail.split()
        addressing = dict(zip(words[2::2], words[3::2], strict=False)) if len(words) > 2 else {}
        if len(words) % 2 == 0 and _ADDRESSING.issuperset(addressing):
            try:
                target_args = _options(options) if options else ()
                matches = tuple(map(_match, modules))
            except ValueError:
                pass
            else:
                # Built without Rule.__post_init__: iptables-save prints addresses, protocols and
                # option values in canonical form already (the conformance suite checks that they
                # equal what planners build), and skipping it made parsing a third faster.
                rule = object.__new__(Rule)
                rule.__dict__.update(
                    chain=words[1],
                    target=target,
                    comment=comment,
                    target_args=tuple(sorted(target_args)),
                    source=addressing.get("-s"),
                    destination=addressing.get("-d"),
                    protocol=addressing.get("-p"),
                    in_interface=addressing.get("-i"),
                    out_interface=addressing.get("-o"),
                    matches=matches,
                )
                return rule
    chain = line[3:].split(" ", 1)[0]
    target = line.split(" -j ", 1)[1].split()[0] if " -j " in line else ""
    return Rule(chain, target, comment, matches=(Match("unparsed", (("rule", line),)),))


# Every table edit meshctl makes goes through this lock, so meshctl's own read-then-write batches
# (the jump rules) never interleave; other tools are kept apart by the xtables lock (-w).
_LOCK = threading.Lock()

SAVE = "iptables-legacy-save"
RESTORE = "iptables-legacy-restore"
WAIT_SECONDS = "10"  # for the xtables lock, held by any other iptables command running
_OWNED_MARK = f'--comment "{COMMENT_PREFIX}'  # in every saved rule meshctl wrote (always quoted)
_FAILED_LINE = re.compile(r"line:? (\d+)")
_READ_HINT = "check that legacy iptables works here (`meshctl doctor`)"
_WRITE_HINT = (
    f"{_READ_HINT}, that no rule still jumps to a "
    "chain being deleted, and that every target suits the builtin chains that reach it "
    "(SNAT/MASQUERADE only from POSTROUTING/INPUT, DNAT/REDIRECT only from PREROUTING/OUTPUT)"
)


def _run(
    ns: netns.Namespace, what: str, command: list[str], stdin: Iterable[str] | None = None
) -> str:
    """Run an iptables tool inside ns, writing it the lines of stdin, and return its stdout; a
    failure raises a KernelError naming the tool's complaint (and the input line it refused)
    and what to do.

    The lines are written as they come, a chunk at a time, so the tool parses a batch while the
    caller is still rendering it (both cores work: a 210,000-rule batch renders in 0.6 s). A
    line with a line break in it kills the tool before its COMMIT: nothing is changed.
    """
    hint = _WRITE_HINT if stdin is not None else _READ_HINT
    where = f"{what} in netns {ns or '(node)'}"

    def start() -> subprocess.Popen[str]:
        # A process started from a thread that entered ns is born in ns.
        pipe, given = subprocess.PIPE, subprocess.PIPE if stdin is not None else subprocess.DEVNULL
        return subprocess.Popen(command, stdin=given, stdout=pipe, stderr=pipe, text=True)

    try:
        tool = netns.run_in(ns, start)
    except FileNotFoundError as err:
        raise Unsupported(
            f"{where}: {command[0]} not found; install Debian's iptables package "
            "(apt-get install iptables: iptables-legacy-save/-restore)"
        ) from err
    sent: list[str] = []
    try:
        if stdin is not None:
            _feed(tool, stdin, sent)
    except BaseException:
        tool.kill()
        tool.communicate()
        raise
    stdout, stderr = tool.communicate()
    if tool.returncode == 0:
        return stdout
    complaints = [line.strip() for line in stderr.splitlines() if line.strip()]
    reason = complaints[0] if complaints else f"{command[0]} exited with {tool.returncode}"
    failed = _FAILED_LINE.search(stderr)
    if failed and 0 < int(failed.group(1)) <= len(sent):
        number = int(failed.group(1))
        reason += f" (input line {number}: {sent[number - 1]})"
    if "ermission denied" in stderr or "must be root" in stderr:
        raise PermissionDenied(f"{where}: {reason}; run as root (CAP_NET_ADMIN)")
    raise KernelError(f"{where}: {reason}; {hint}")


_CHUNK = 2048  # lines per write to a tool's stdin


def _feed(tool: subprocess.Popen[str], lines: Iterable[str], sent: list[str]) -> None:
    """Write lines to the tool's stdin, keeping them in sent; stop quietly if it has exited (its
    complaint says why). communicate() closes its stdin afterwards."""
    assert tool.stdin is not None
    it = iter(lines)
    try:
        while chunk := list(itertools.islice(it, _CHUNK)):
            for line in chunk:
                if "\n" in line or "\r" in line:
                    raise ValueError(
                        f"{line!r}: iptables rules and chain names cannot hold line breaks"
                    )
            sent += chunk
            tool.stdin.write("\n".join(chunk) + "\n")
            tool.stdin.flush()
    except BrokenPipeError:
        pass


def _save(ns: netns.Namespace, table: str) -> list[str]:
    """The lines of `iptables-legacy-save -t table` in ns."""
    return _run(ns, f"reading the iptables {table} table", [SAVE, "-t", table]).splitlines()


def _restore(ns: netns.Namespace, table: str, lines: Iterable[str]) -> None:
    """Feed one batch to iptables-legacy-restore in ns: one commit, all or nothing."""
    command = [RESTORE, "--noflush", "-w", WAIT_SECONDS]
    _run(ns, f"writing the iptables {table} table", command, _table_batch(table, iter(lines)))


def _table_batch(table: str, lines: Iterator[str]) -> Iterator[str]:
    """One table's part of a restore run: nothing if it has no lines, else *table ... COMMIT."""
    first = next(lines, None)
    if first is not None:
        yield from itertools.chain([f"*{table}", first], lines, ["COMMIT"])


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


def _is_builtin_rule(line: str, table: str) -> bool:
    return any(line.startswith(f"-A {chain} ") for chain in BUILTIN_CHAINS[table])


def _owned_lines(lines: Iterable[str], table: str) -> tuple[dict[str, list[str]], list[str]]:
    """Saved lines meshctl owns: MESH-* chains with their rule lines, and its builtin-chain rule
    lines. Only these are ever parsed; a foreign rule costs one prefix test."""
    chains: dict[str, list[str]] = {}
    jumps = []
    prefix, declared = f"-A {CHAIN_PREFIX}", f":{CHAIN_PREFIX}"
    for line in lines:
        if line.startswith(prefix):
            chains[line[3:].split(" ", 1)[0]].append(line)
        elif line.startswith(declared):
            chains[line[1 : line.index(" ")]] = []
        elif _OWNED_MARK in line and _is_builtin_rule(line, table):
            jumps.append(line)
    return chains, jumps


def _owned_jumps(lines: Iterable[str]) -> list[tuple[Rule, str]]:
    """meshctl's rules of builtin chains, each with the saved line it was parsed from."""
    parsed = ((parse_rule(line), line) for line in lines)
    return [(rule, line) for rule, line in parsed if is_owned_jump(rule)]


def _list_owned(lines: list[str], table: str) -> OwnedTable:
    chains, jumps = _owned_lines(lines, table)
    order = {chain: index for index, chain in enumerate(BUILTIN_CHAINS[table])}
    return OwnedTable(
        chains={chain: tuple(map(parse_rule, rules)) for chain, rules in chains.items()},
        # Chain by chain, as the planners list them; save already prints them so.
        jumps=tuple(
            sorted((rule for rule, _ in _owned_jumps(jumps)), key=lambda r: order[r.chain])
        ),
    )


def _needs_reading(change: TableChange) -> bool:
    """Whether the change depends on what the table holds: jump rules go in only if missing and
    out only if present, and `create` must not empty a chain that exists."""
    declared = {*change.replace, *change.delete}
    return bool(
        change.ensure_jumps
        or change.delete_jumps
        or any(chain not in declared for chain in change.create)
    )


def restore_lines(table: str, change: TableChange, saved: list[str] | None) -> Iterator[str]:
    """The iptables-restore --noflush commands (between *table and COMMIT) that apply `change`,
    rendered as they are read; a rule that validate() refuses raises ValueError on its way.

    `saved` is the table as iptables-save printed it, needed when _needs_reading(change). A
    declared chain (`:CHAIN - [0:0]`) is created if missing and emptied if present.
    """
    existing, owned_jumps = set(), []
    if saved is not None:
        existing = {line[1 : line.index(" ")] for line in saved if line.startswith(":")}
        owned_jumps = _owned_jumps(_owned_lines(saved, table)[1])
    create = (chain for chain in change.create if chain not in existing)
    # Chains in name order, and rules chain by chain in that order, as iptables-save prints
    # them: libiptc keeps its chains sorted, and 10,000 chains given in any other order took
    # twice as long to restore (8.5 s against 4.0 s for 210,000 rules).
    declare = sorted({*create, *change.replace, *change.delete})
    yield from (f":{chain} - [0:0]" for chain in declare)
    unwanted = set(change.delete_jumps)
    # -D takes the rule as saved, so any rule listed as meshctl's can be deleted, parsed or not.
    yield from (f"-D{line[2:]}" for rule, line in owned_jumps if rule in unwanted)
    for chain in sorted(change.replace):
        for rule in change.replace[chain]:
            _check_rule(chain, rule)  # here, not before: the tool parses meanwhile
            yield rule.render()
    present = {rule for rule, _ in owned_jumps if rule not in unwanted}
    for chain in dict.fromkeys(jump.chain for jump in change.ensure_jumps):
        wanted = [j for j in dict.fromkeys(change.ensure_jumps) if j.chain == chain]
        missing = [jump for jump in wanted if jump not in present]
        # Each goes in at the top, so the last first: they end up in the order given.
        yield from (f"-I {chain} 1 {jump._spec()}" for jump in reversed(missing))
    yield from (f"-X {chain}" for chain in change.delete)


def flush_lines(table: str, saved: list[str]) -> list[str]:
    """The restore commands that remove every MESH-* chain and meshctl jump rule of `saved`."""
    chains, jumps = _owned_lines(saved, table)
    lines = [f"-D{line[2:]}" for _, line in _owned_jumps(jumps)]
    lines += [f":{chain} - [0:0]" for chain in chains]  # emptied first: they may jump to each other
    lines += [f"-X {chain}" for chain in chains]
    return lines


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
        lines = _save(ns, table)
        with gc_paused():
            return _list_owned(lines, table)

    def apply(self, ns: netns.Namespace, table: str, change: TableChange) -> None:
        """Apply one batch to `table` of ns in one commit; a refused change changes nothing
        (a refused rule stops the restore tool before its commit)."""
        self.apply_tables(ns, {table: change})

    def apply_tables(self, ns: netns.Namespace, changes: Mapping[str, TableChange]) -> None:
        """Apply a batch to each table, in the order given, through one restore run (and one
        save where some need reading). Each table's batch is one commit, all or nothing: a
        table refused or failing is left unchanged, the tables before it may be changed."""
        for table, change in changes.items():
            _validate_frame(table, change)
        with _LOCK:
            saved = _saved(ns, [t for t, change in changes.items() if _needs_reading(change)])
            batch = itertools.chain.from_iterable(
                _table_batch(table, restore_lines(table, change, saved.get(table)))
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
