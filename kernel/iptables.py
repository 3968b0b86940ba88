"""Netfilter through python-iptables (legacy): meshctl's own MESH-* chains, applied in batches.

meshctl owns only chains named MESH-*, every rule it writes carries a `meshctl:<object-id>` comment,
and its only edit outside its chains is one commented jump rule per builtin chain. A batch
(`TableChange`) is applied with one libiptc commit per table, so a controller rebuilds just the
chains of the services that changed, atomically.

Rules are plain frozen dataclasses in a canonical form: what `apply` writes is exactly what
`list_owned` reads back, so a planner diffs desired against observed by equality.
"""

from __future__ import annotations

import ipaddress
import math
import shlex
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from kernel import netns
from kernel.errors import KernelError, PermissionDenied

T = TypeVar("T")

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


def _canonical_args(module: str, args: Args) -> Args:
    """Options of a match or target in canonical form, sorted by name (their order is free)."""
    pairs = dict(_canonical_value(module, str(k), str(v)) for k, v in args)
    if module == "REJECT":
        pairs.setdefault("reject-with", "icmp-port-unreachable")  # the kernel's default, printed
    return tuple(sorted(pairs.items()))


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
        object.__setattr__(self, "source", _canonical_cidr(self.source))
        object.__setattr__(self, "destination", _canonical_cidr(self.destination))
        protocol = (self.protocol or "").lower()
        object.__setattr__(self, "protocol", None if protocol in ("", "ip", "all") else protocol)
        object.__setattr__(self, "matches", tuple(self.matches))
        object.__setattr__(self, "target_args", _canonical_args(self.target, self.target_args))

    def render(self) -> str:
        """The rule in iptables-save syntax ("-A CHAIN ... -j TARGET ...")."""
        words = ["-A", self.chain]
        for flag, value in (
            ("-s", self.source),
            ("-d", self.destination),
            ("-i", self.in_interface),
            ("-o", self.out_interface),
            ("-p", self.protocol),
        ):
            if value is not None:
                words += [flag, value]
        modules = [(m.name, m.args) for m in self.matches]
        if self.comment:
            modules.append(("comment", (("comment", self.comment),)))
        for name, args in modules:
            words += ["-m", name]
            for key, value in args:
                words += [f"--{key}", *([value] if value else [])]
        words += ["-j", self.target]
        for key, value in self.target_args:
            words += [f"--{key}", *([value] if value else [])]
        return shlex.join(words)


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


def _check_protocol(rule: Rule) -> None:
    """Ports need their protocol, as iptables insists (it fails with an obscure parameter error)."""
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
    check_table(table)
    for chain in (*change.create, *change.replace, *change.delete):
        _check_owned_chain(chain)
    for chain, rules in change.replace.items():
        for rule in rules:
            _check_commented(rule)
            _check_protocol(rule)
            if rule.chain != chain:
                raise ValueError(f"rule {rule.render()!r} is listed under chain {chain}")
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

    def flush_owned(self, ns: netns.Namespace, table: str) -> None: ...


# libiptc keeps one process-wide socket (opened by the first handle, closed with the last) and
# python-iptables caches one Table object per name: every use goes through this lock, and each
# batch opens its handles inside the target namespace and frees them all before it returns.
_LOCK = threading.Lock()


def _forget_tables(iptc: Any) -> None:
    """Free every cached libiptc handle and drop the Table objects that held them.

    Freeing the last handle closes libiptc's socket, so the next batch opens one in its own
    namespace. The objects must go too: building a jump to a chain makes python-iptables look
    the name up in every table through Table(name), and a cached object with a freed handle
    would crash the process; a new one opens its handle here, in the batch's namespace.
    """
    for cached in list(iptc.Table._cache.values()):
        cached.close()
    iptc.Table._cache.clear()


def _iptc() -> Any:
    """python-iptables, imported on first use so the model and the fake load without libiptc."""
    import iptc

    return iptc


@contextmanager
def _iptc_errors(what: str) -> Iterator[None]:
    """Turn python-iptables/libxtables failures into a KernelError that says what to do."""
    iptc = _iptc()
    try:
        yield
    except (iptc.IPTCError, iptc.xtables.XTablesError, AttributeError, TypeError) as err:
        text = f"{what}: {err}"
        if "ermission" in str(err):
            raise PermissionDenied(f"{text}; run as root (CAP_NET_ADMIN)") from err
        raise KernelError(
            f"{text}; check that legacy iptables works here (`meshctl doctor`), that no rule "
            "still jumps to a chain being deleted, and that every target suits the builtin chains "
            "that reach it (SNAT/MASQUERADE only from POSTROUTING/INPUT, DNAT/REDIRECT only from "
            "PREROUTING/OUTPUT)"
        ) from err


def _in_table(ns: netns.Namespace, table: str, fn: Callable[[Any], T]) -> T:
    """Run fn(handle) on a fresh libiptc handle of `table` inside ns, under the process lock."""
    check_table(table)

    def body() -> T:
        iptc = _iptc()
        with _LOCK, _iptc_errors(f"iptables {table} table in netns {ns or '(node)'}"):
            _forget_tables(iptc)
            try:
                return fn(iptc.Table(table, autocommit=False))  # opened here, in ns
            finally:
                _forget_tables(iptc)

    return netns.run_in(ns, body)


def _joined(params: Mapping[str, list[str]]) -> Args:
    return tuple((key, " ".join(values)) for key, values in params.items())


def _from_iptc(chain: str, entry: Any) -> Rule:
    """A python-iptables rule read back from the kernel, as a canonical Rule."""
    comment = ""
    matches = []
    for match in entry.matches:
        args = _joined(match.get_all_parameters())
        if match.name == "comment" and not comment:
            comment = dict(args).get("comment", "")
        else:
            matches.append(Match(match.name, args))
    target = entry.target
    return Rule(
        chain=chain,
        target=target.name,
        comment=comment,
        target_args=_joined(target.get_all_parameters()),
        source=entry.src,
        destination=entry.dst,
        protocol=entry.protocol,
        in_interface=entry.in_interface,
        out_interface=entry.out_interface,
        matches=tuple(matches),
    )


def _to_iptc(rule: Rule) -> Any:
    """A canonical Rule as a python-iptables rule ready to append or insert."""
    entry = _iptc().Rule()
    if rule.source is not None:
        entry.src = rule.source
    if rule.destination is not None:
        entry.dst = rule.destination
    if rule.in_interface is not None:
        entry.in_interface = rule.in_interface
    if rule.out_interface is not None:
        entry.out_interface = rule.out_interface
    if rule.protocol is not None:
        entry.protocol = rule.protocol
    for match in rule.matches:
        module = entry.create_match(match.name)
        for key, value in match.args:
            module.set_parameter(key, value)
    if rule.comment:
        entry.create_match("comment").comment = rule.comment
    target = entry.create_target(rule.target)
    for key, value in rule.target_args:
        target.set_parameter(key, value)
    return entry


def _read_chain(handle: Any, chain: str) -> list[tuple[Rule, Any]]:
    """The rules of a chain, each with the python-iptables entry it was read from."""
    return [(_from_iptc(chain, entry), entry) for entry in _iptc().Chain(handle, chain).rules]


def _owned_chains(handle: Any) -> list[str]:
    return [chain.name for chain in handle.chains if chain.name.startswith(CHAIN_PREFIX)]


def _list_owned(handle: Any, table: str) -> OwnedTable:
    chains = {
        chain: tuple(r for r, _ in _read_chain(handle, chain)) for chain in _owned_chains(handle)
    }
    jumps = tuple(
        rule
        for chain in BUILTIN_CHAINS[table]
        for rule, _ in _read_chain(handle, chain)
        if is_owned_jump(rule)
    )
    return OwnedTable(chains=chains, jumps=jumps)


def _delete_entries(handle: Any, chain: str, keep: Callable[[Rule], bool]) -> None:
    iptc_chain = _iptc().Chain(handle, chain)
    for rule, entry in _read_chain(handle, chain):
        if not keep(rule):
            iptc_chain.delete_rule(entry)


def _apply(handle: Any, table: str, change: TableChange) -> None:
    iptc = _iptc()
    existing = {chain.name for chain in handle.chains}
    for chain in (*change.create, *change.replace):
        if chain not in existing:
            handle.create_chain(chain)
            existing.add(chain)
    for chain in {jump.chain for jump in change.delete_jumps}:
        _delete_entries(handle, chain, lambda rule: rule not in change.delete_jumps)
    for chain in (*change.delete, *change.replace):
        if chain in existing:
            handle.flush_entries(chain)
    for chain, rules in change.replace.items():
        iptc_chain = iptc.Chain(handle, chain)
        for rule in rules:
            iptc_chain.append_rule(_to_iptc(rule))
    for chain in dict.fromkeys(jump.chain for jump in change.ensure_jumps):
        present = {rule for rule, _ in _read_chain(handle, chain)}
        wanted = [j for j in change.ensure_jumps if j.chain == chain and j not in present]
        iptc_chain = iptc.Chain(handle, chain)
        for jump in reversed(list(dict.fromkeys(wanted))):  # inserted at the top, in given order
            iptc_chain.insert_rule(_to_iptc(jump), 0)
    for chain in change.delete:
        if chain in existing:
            handle.delete_chain(chain)
    handle.commit()


def _flush_owned(handle: Any, table: str) -> None:
    for chain in BUILTIN_CHAINS[table]:
        _delete_entries(handle, chain, lambda rule: not is_owned_jump(rule))
    owned = _owned_chains(handle)
    for chain in owned:  # empty them all first: they may jump to each other
        handle.flush_entries(chain)
    for chain in owned:
        handle.delete_chain(chain)
    handle.commit()


class Iptables:
    """IptablesAPI on the real kernel through python-iptables (legacy xtables)."""

    def available(self, ns: netns.Namespace) -> str | None:
        """None if legacy iptables works from Python in ns, else a one-line reason."""
        try:
            for table in ("filter", "nat"):
                _in_table(ns, table, lambda handle: handle.chains)
        except (KernelError, ImportError, OSError) as err:
            return f"legacy iptables does not work from python-iptables: {err}"
        return None

    def list_owned(self, ns: netns.Namespace, table: str) -> OwnedTable:
        """meshctl's chains and jump rules in `table` of ns; nothing foreign."""
        return _in_table(ns, table, lambda handle: _list_owned(handle, table))

    def apply(self, ns: netns.Namespace, table: str, change: TableChange) -> None:
        """Apply one batch to `table` of ns in one commit; a refused change changes nothing."""
        validate(table, change)
        _in_table(ns, table, lambda handle: _apply(handle, table, change))

    def flush_owned(self, ns: netns.Namespace, table: str) -> None:
        """Remove every MESH-* chain and meshctl jump rule from `table` of ns, nothing else."""
        _in_table(ns, table, lambda handle: _flush_owned(handle, table))
