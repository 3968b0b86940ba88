"""What a node shows from outside meshctl: load-balancer rules and addresses (iptables, nftables
or IPVS), links, processes, DNS answers and what new connections hear, read with the kernel's
own tools and with packets, so the checks do not trust meshctl's readers.

Each reader returns plain data; the property test compares it with the store and its model.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shlex
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype

from kernel import netns
from tests.conftest import tcp_read

DNS_ADDRESS = "127.0.0.11"  # what a task's resolv.conf names (Docker's embedded DNS address)


# -- iptables ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SavedRule:
    """The parts of an `iptables-save` rule the checks look at."""

    chain: str
    target: str
    destination: str | None = None
    # The share of what reaches the rule that it takes: a `statistic` match's probability
    # (mode random) or 1/every (mode nth); None without one (it takes all).
    share: float | None = None
    to_destination: str | None = None
    comment: str | None = None
    set_mark: int | None = None  # the mark a MARK rule sets (its --set-xmark value)


def parse_rules(saved: str) -> dict[str, dict[str, list[SavedRule]]]:
    """table → chain → rules in order, from `iptables-save` text (empty chains included)."""
    tables: dict[str, dict[str, list[SavedRule]]] = {}
    table: dict[str, list[SavedRule]] = {}
    for line in saved.splitlines():
        if line.startswith("*"):
            table = tables.setdefault(line[1:], {})
        elif line.startswith(":"):
            table.setdefault(line[1:].split()[0], [])
        elif line.startswith("-A "):
            words = shlex.split(line)
            values: dict[str, str] = {}
            for flag, value in zip(words, words[1:], strict=False):
                if flag in ("-A", "-d", "-j", "--probability", "--every", "--packet",
                            "--to-destination", "--comment", "--set-xmark"):  # fmt: skip
                    values.setdefault(flag, value)
            share = None
            if "--probability" in values:
                share = float(values["--probability"])
            elif "--every" in values and values.get("--packet") == "0":
                share = 1 / int(values["--every"])
            rule = SavedRule(
                chain=values["-A"],
                target=values.get("-j", ""),
                destination=values.get("-d"),
                share=share,
                to_destination=values.get("--to-destination"),
                comment=values.get("--comment"),
                set_mark=int(values["--set-xmark"].split("/")[0], 0)
                if "--set-xmark" in values
                else None,
            )
            table.setdefault(rule.chain, []).append(rule)
    return tables


def iptables_save(ns: str | None) -> dict[str, dict[str, list[SavedRule]]]:
    """Every table of namespace ns (a name under /run/netns), parsed."""
    argv = ["iptables-legacy-save"]
    if ns is not None:
        argv = ["nsenter", f"--net={netns.path(ns)}", "--", *argv]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30).stdout
    return parse_rules(out)


def _matches(rule: SavedRule, address: str) -> bool:
    if rule.destination is None:
        return True
    return ipaddress.IPv4Address(address) in ipaddress.IPv4Network(rule.destination, strict=False)


@dataclass(frozen=True)
class VipPath:
    """Where a new connection to a VIP can go: the DNAT targets on every path (one entry per
    path, so a backend reachable twice shows twice), whether it is refused, and anything odd."""

    dnat: tuple[str, ...]
    refused: bool
    problems: tuple[str, ...]


def follow(
    table: dict[str, list[SavedRule]], chain: str, address: str, problems: list[str], depth: int = 0
) -> list[SavedRule]:
    """The rules a new connection to address ends at, from chain on through every jump whose
    destination matches (a `statistic` match may or may not match, so each branch counts); a
    MESH-SVC-* chain where several rules match spreads the connections, and must do so evenly:
    rule i of n takes 1/(n-i) of what is left (at random or in turn), the last one the rest."""
    if depth > 8:
        problems.append(f"chain {chain}: jumps nest deeper than 8")
        return []
    matching = [r for r in table.get(chain, []) if _matches(r, address)]
    if len(matching) > 1 and chain.startswith("MESH-SVC-"):
        n = len(matching)
        for i, rule in enumerate(matching):
            want = None if i == n - 1 else 1 / (n - i)
            have = rule.share
            if (want is None) != (have is None) or (
                want is not None and have is not None and abs(want - have) > 1e-6
            ):
                problems.append(f"{chain} rule {i + 1}/{n}: takes {have}, want {want}")
    reached: list[SavedRule] = []
    for rule in matching:
        if rule.target in table and rule.target != chain:
            reached.extend(follow(table, rule.target, address, problems, depth + 1))
        else:
            reached.append(rule)
    return reached


def refused(tables: dict[str, dict[str, list[SavedRule]]], vip: str) -> bool:
    """Whether filter INPUT rejects a new connection to vip (a VIP with no backend)."""
    ends = follow(tables.get("filter", {}), "INPUT", vip, [])
    return any(r.target == "REJECT" for r in ends)


def vip_path(tables: dict[str, dict[str, list[SavedRule]]], vip: str) -> VipPath:
    """Follow a new connection to vip through nat PREROUTING (DNAT) and filter INPUT."""
    problems: list[str] = []
    terminal = follow(tables.get("nat", {}), "PREROUTING", vip, problems)
    dnat = tuple(sorted(r.to_destination or "?" for r in terminal if r.target == "DNAT"))
    return VipPath(dnat, refused(tables, vip), tuple(problems))


# -- nftables (the LB namespace's table of the nftables backend) ---------------------------------

NFT_TABLE = "meshctl"


def nft_table(ns: str) -> dict[str, Any]:
    """`nft -j list table ip meshctl` in namespace ns, as chains (name → rules' exprs), maps and
    sets (name → elements); empty if the table is missing."""
    argv = ["nsenter", f"--net={netns.path(ns)}", "--", "nft", "-j", "list", "table", "ip",
            NFT_TABLE]  # fmt: skip
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    table: dict[str, Any] = {"chains": {}, "sets": {}}
    if result.returncode != 0:
        return table
    for item in json.loads(result.stdout)["nftables"]:
        if "chain" in item:
            table["chains"].setdefault(item["chain"]["name"], [])
        elif "rule" in item:
            table["chains"].setdefault(item["rule"]["chain"], []).append(item["rule"]["expr"])
        for kind in ("map", "set"):
            if kind in item:
                table["sets"][item[kind]["name"]] = item[kind].get("elem", [])
    return table


def _goto(verdict: Any) -> str | None:
    return verdict.get("goto", {}).get("target") if isinstance(verdict, dict) else None


def nft_vip_path(table: dict[str, Any], vip: str) -> VipPath:
    """Follow a new connection to vip as the nftables backend's table sends it: the nat
    prerouting's vmap @services to the VIP's service chain, a goto or a `numgen inc mod N` vmap
    over endpoint chains (each of 0..N-1 once, so they take turns), each one DNAT; refused if
    vip is in @no-endpoints, which filter input rejects."""
    chains, sets = table["chains"], table["sets"]
    problems: list[str] = []
    dispatch = [e for rule in chains.get("prerouting", []) for e in rule if "vmap" in e]
    if [e["vmap"]["data"] for e in dispatch] != ["@services"]:
        problems.append(f"prerouting dispatches by {dispatch}, want one vmap @services")
    services = {key: _goto(verdict) for key, verdict in sets.get("services", [])}
    rejecting = [r for r in chains.get("input", []) if any("reject" in e for e in r)]
    rejects_the_set = len(rejecting) == 2 and all(
        r[0].get("match", {}).get("right") == "@no-endpoints" for r in rejecting
    )
    refused = rejects_the_set and vip in sets.get("no-endpoints", [])
    service = services.get(vip)
    if service is None:
        return VipPath((), refused, tuple(problems))
    endpoints: list[str] = []
    for rule in chains.get(service, []):
        for expr in rule:
            if target := _goto(expr):
                endpoints.append(target)
            elif "vmap" in expr and "numgen" in expr["vmap"]["key"]:
                numgen = expr["vmap"]["key"]["numgen"]
                choices = dict(expr["vmap"]["data"]["set"])
                if numgen["mode"] != "inc" or sorted(choices) != list(range(numgen["mod"])):
                    problems.append(f"{service}: numgen {numgen} over {sorted(choices)}")
                endpoints += [_goto(choices[k]) or "" for k in sorted(choices)]
            else:
                problems.append(f"{service}: unexpected {expr}")
    dnat = []
    for chain in endpoints:
        targets = [e["dnat"]["addr"] for rule in chains.get(chain, []) for e in rule if "dnat" in e]
        if len(targets) != 1:
            problems.append(f"endpoint chain {chain!r} DNATs to {targets}")
        dnat += targets
    return VipPath(tuple(sorted(dnat)), refused, tuple(problems))


def nft_stray_vips(table: dict[str, Any], vips: Iterable[str]) -> list[str]:
    """Entries of @services and @no-endpoints for no VIP of vips, and chains nothing reaches."""
    known = set(vips)
    sets = table["sets"]
    stray = [f"@services element {k}" for k, _ in sets.get("services", []) if k not in known]
    stray += [f"@no-endpoints element {k}" for k in sets.get("no-endpoints", []) if k not in known]
    reached = {_goto(v) for _, v in sets.get("services", [])}
    for rules in table["chains"].values():
        for rule in rules:
            for expr in rule:
                if "vmap" in expr and isinstance(expr["vmap"]["data"], dict):
                    reached |= {_goto(v) for _, v in expr["vmap"]["data"]["set"]}
                reached.add(_goto(expr))
    base = {"prerouting", "postrouting", "input"}  # hooked, reached by no goto
    stray += [f"chain {name}" for name in table["chains"] if name not in reached | base]
    return stray


@dataclass(frozen=True)
class IptablesLb:
    """An LB namespace of the iptables backend, as iptables-legacy-save shows it."""

    tables: dict[str, dict[str, list[SavedRule]]]

    def vip_path(self, vip: str) -> VipPath:
        return vip_path(self.tables, vip)

    def stray(self, vips: Iterable[str]) -> list[str]:
        """Dispatch rules for no VIP of vips."""
        known = set(vips)
        return [
            f"{r} for no VIP"
            for rules in self.tables.get("nat", {}).values()
            for r in rules
            if r.target.startswith("MESH-SVC-")
            and r.destination
            and r.destination.removesuffix("/32") not in known
        ]


@dataclass(frozen=True)
class NftablesLb:
    """An LB namespace of the nftables backend, as `nft -j` shows it."""

    table: dict[str, Any]

    def vip_path(self, vip: str) -> VipPath:
        return nft_vip_path(self.table, vip)

    def stray(self, vips: Iterable[str]) -> list[str]:
        return nft_stray_vips(self.table, vips)


# -- IPVS (the LB namespace's fwmark services of the ipvs backend) -------------------------------


@dataclass(frozen=True)
class IpvsDest:
    """A destination of an IPVS service, as `ipvsadm -S -n` shows it."""

    address: str
    port: int
    forward: str  # m: masquerade, g: direct routing, i: tunnel
    weight: int


@dataclass(frozen=True)
class IpvsService:
    scheduler: str
    dests: tuple[IpvsDest, ...]


def parse_ipvsadm(saved: str) -> dict[int, IpvsService]:
    """fwmark → service, from `ipvsadm -S -n` text; services by address and port (not meshctl's
    kind) are left out."""
    schedulers: dict[int, str] = {}
    dests: dict[int, list[IpvsDest]] = {}
    for line in saved.splitlines():
        words = line.split()
        if len(words) < 3 or words[1] != "-f":
            continue
        mark = int(words[2])
        values = dict(zip(words, words[1:], strict=False))
        if words[0] == "-A":
            schedulers[mark] = values.get("-s", "")
        elif words[0] == "-a":
            address, _, port = values["-r"].partition(":")
            forward = next((w[1:] for w in words if w in ("-m", "-g", "-i")), "?")
            dests.setdefault(mark, []).append(
                IpvsDest(address, int(port or 0), forward, int(values.get("-w", "1")))
            )
    return {
        mark: IpvsService(scheduler, tuple(dests.get(mark, ())))
        for mark, scheduler in schedulers.items()
    }


def ipvsadm_save(ns: str) -> dict[int, IpvsService]:
    """The fwmark services of namespace ns, read with ipvsadm."""
    argv = ["nsenter", f"--net={netns.path(ns)}", "--", "ipvsadm", "-S", "-n"]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30).stdout
    return parse_ipvsadm(out)


@dataclass(frozen=True)
class IpvsLb:
    """An LB namespace of the ipvs backend: mangle marks a VIP's new connections, IPVS balances
    each mark's fwmark service over its destinations (round robin, masquerading to the same
    port; weight 0 drains: such a destination takes no new connection), filter refuses a VIP
    with none."""

    tables: dict[str, dict[str, list[SavedRule]]]
    services: dict[int, IpvsService]

    def marks(self, vip: str, problems: list[str]) -> list[int]:
        """The marks mangle PREROUTING gives a new connection to vip."""
        ends = follow(self.tables.get("mangle", {}), "PREROUTING", vip, problems)
        return [r.set_mark for r in ends if r.target == "MARK" and r.set_mark is not None]

    def vip_path(self, vip: str) -> VipPath:
        problems: list[str] = []
        marks = self.marks(vip, problems)
        dnat: list[str] = []
        if len(marks) > 1:
            problems.append(f"marked {len(marks)} times: {[hex(m) for m in marks]}")
        for mark in marks:
            service = self.services.get(mark)
            if service is None:
                problems.append(f"marked {mark:#x}, which no IPVS service balances")
                continue
            if service.scheduler != "rr":
                problems.append(f"fwmark {mark:#x} scheduled by {service.scheduler}, want rr")
            for dest in service.dests:
                if dest.forward != "m" or dest.port != 0 or dest.weight not in (0, 1):
                    problems.append(f"fwmark {mark:#x}: destination {dest}, want masquerade "
                                    "to the same port (0) with weight 1 or 0")  # fmt: skip
                if dest.weight > 0:
                    dnat.append(dest.address)
        return VipPath(tuple(sorted(dnat)), refused(self.tables, vip), tuple(problems))

    def stray(self, vips: Iterable[str]) -> list[str]:
        """IPVS services no VIP's mark reaches, and marks for no VIP of vips."""
        reached = {mark for vip in vips for mark in self.marks(vip, [])}
        stray = [f"IPVS service fwmark {m:#x}" for m in sorted(set(self.services) - reached)]
        known = {f"{vip}/32" for vip in vips}
        stray += [
            f"{r} for no VIP"
            for rules in self.tables.get("mangle", {}).values()
            for r in rules
            if r.target == "MARK" and r.destination not in known
        ]
        return stray


# What an LB namespace holds, read with the tool of the backend the controller runs: from its
# name and its iptables-save (read for the marks whatever the backend; the iptables backend's
# reading is that same snapshot, not a second one).
SavedTables = dict[str, dict[str, list[SavedRule]]]
LB_READERS: dict[str, Callable[[str, SavedTables], IptablesLb | NftablesLb | IpvsLb]] = {
    "iptables": lambda ns, saved: IptablesLb(saved),
    "nftables": lambda ns, saved: NftablesLb(nft_table(ns)),
    "ipvs": lambda ns, saved: IpvsLb(saved, ipvsadm_save(ns)),
}


def marks(tables: dict[str, dict[str, list[SavedRule]]]) -> set[str]:
    """What meshctl's rule comments name (`meshctl:<what>`), without the prefix."""
    found = set()
    for table in tables.values():
        for rules in table.values():
            for rule in rules:
                if rule.comment and rule.comment.startswith("meshctl:"):
                    found.add(rule.comment.removeprefix("meshctl:"))
    return found


# -- links and addresses -------------------------------------------------------------------------


def links(ns: str) -> list[dict[str, Any]]:
    """`ip -d -j link show` in namespace ns."""
    out = subprocess.run(["ip", "-n", ns, "-d", "-j", "link", "show"],
                         capture_output=True, text=True, check=True, timeout=30).stdout  # fmt: skip
    found: list[dict[str, Any]] = json.loads(out)
    return found


def addresses(ns: str, device: str) -> set[str]:
    """The IPv4 addresses (CIDR) of a device in namespace ns; empty if there is no such device."""
    result = subprocess.run(["ip", "-n", ns, "-j", "-4", "addr", "show", "dev", device],
                            capture_output=True, text=True, timeout=30)  # fmt: skip
    if result.returncode != 0:
        return set()
    return {
        f"{info['local']}/{info['prefixlen']}"
        for link in json.loads(result.stdout or "[]")
        for info in link.get("addr_info", [])
    }


# -- processes -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    start_time: int
    netns_inode: int
    cmdline: str


def _stat_fields(pid: int) -> list[bytes]:
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    return stat[stat.rindex(b")") + 2 :].split()


def proc(pid: int) -> Proc | None:
    """One process, or None if it is gone (or a zombie whose namespaces are gone)."""
    try:
        fields = _stat_fields(pid)
        inode = os.stat(f"/proc/{pid}/ns/net").st_ino
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return Proc(pid, int(fields[1]), int(fields[19]), inode, cmdline)


def wait_dead(pid: int, start_time: int, timeout: float = 10.0) -> bool:
    """Wait until the process is a zombie or gone (a SIGKILL takes effect when the process
    next runs, which on a loaded host is after kill() returned); False if it never died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            fields = _stat_fields(pid)
        except (FileNotFoundError, ProcessLookupError):
            return True
        if fields[0] in (b"Z", b"X") or int(fields[19]) != start_time:
            return True
        time.sleep(0.01)
    return False


def processes_with(marker: bytes) -> dict[int, Proc]:
    """Every live process whose environment holds marker (zombies have none left to read)."""
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                environ = f.read()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if marker in environ.split(b"\0") and (p := proc(int(name))) is not None:
            found[p.pid] = p
    return found


def ancestors(pid: int) -> list[int]:
    """pid's parent, grandparent, ... as far as the chain holds (at most 64)."""
    found: list[int] = []
    while pid > 1 and len(found) < 64:
        p = proc(pid)
        if p is None:
            break
        found.append(p.ppid)
        pid = p.ppid
    return found


# -- connections -------------------------------------------------------------------------------


def connect(ns: str, address: str, port: int, count: int, timeout: float) -> list[str]:
    """What count new TCP connections from namespace ns to address:port hear, one after
    another: each the text the server sent before it closed, or `refused`, `timeout`, or the
    error (timeout as tests.conftest.tcp_read scales it)."""

    def body() -> list[str]:
        heard = []
        for _ in range(count):
            try:
                heard.append(tcp_read(address, port, timeout))
            except ConnectionRefusedError:
                heard.append("refused")
            except TimeoutError:
                heard.append("timeout")
            except OSError as err:
                heard.append(f"error: {err}")
        return heard

    return netns.run_in(ns, body)


# -- DNS -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DnsAnswer:
    rcode: str  # NOERROR, NXDOMAIN, SERVFAIL, ... or "timeout"
    addresses: frozenset[str]


def ask(ns: str, names: Iterable[str], timeout: float = 2.0) -> dict[str, DnsAnswer]:
    """A queries for names, asked from inside namespace ns at the task's resolver address.

    After one timeout the rest are not asked (they time out too: nothing answers in ns yet,
    as in a task the controller has not wired); one name at 2 s each made one look at a
    snapshot take 18 s."""
    wanted = list(names)

    def body() -> dict[str, DnsAnswer]:
        answers = {}
        for name in wanted:
            query = dns.message.make_query(name, "A")
            try:
                reply = dns.query.udp(query, DNS_ADDRESS, timeout=timeout)
            except dns.exception.Timeout:
                timed_out = DnsAnswer("timeout", frozenset())
                answers |= {rest: timed_out for rest in wanted if rest not in answers}
                break
            found = frozenset(
                item.address
                for rrset in reply.answer
                if rrset.rdtype == dns.rdatatype.A
                for item in rrset
            )
            answers[name] = DnsAnswer(dns.rcode.to_text(reply.rcode()), found)
        return answers

    return netns.run_in(ns, body)
