"""kernel.iptables against the fake and the real kernel: what meshctl owns, and nothing else.

Foreign state is installed as another tool would (the `iptables-legacy` command on the real
kernel, `add_foreign` in the fake) and must come out of every meshctl operation byte-identical.
The real-only tests send TCP connections through DNAT and statistic rules between namespaces.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from kernel import iptables, netns
from kernel.errors import KernelError, Unsupported
from kernel.fake.iptables import FakeIptables
from kernel.iptables import Iptables, IptablesAPI
from kernel.iptables_rules import (
    BUILTIN_CHAINS,
    Match,
    OwnedTable,
    Rule,
    TableChange,
    opts,
    parse_rule,
    table_change,
)
from meshctl.lb.iptables import iptables_tables
from meshctl.lb.spec import Backend, VirtualIp, lb_spec
from tests.conftest import NetnsFactory, scaled

C = "meshctl:svc-web"  # the comment of every rule these tests write as meshctl


def api(kernel: Any) -> IptablesAPI:
    backend: IptablesAPI = kernel.iptables
    return backend


def is_fake(kernel: Any) -> bool:
    return isinstance(kernel.iptables, FakeIptables)


def in_ns(ns: str, *cmd: str, stdin: str | None = None) -> str:
    """Run a command inside a namespace this test created; its stdout."""
    done = subprocess.run(
        ["ip", "netns", "exec", ns, *cmd], input=stdin, capture_output=True, text=True
    )
    assert done.returncode == 0, f"{cmd} in {ns}: {done.stderr}"
    return done.stdout


def add_foreign(kernel: Any, ns: str, table: str, chain: str, rule: Rule | None = None) -> None:
    """Install a chain and rule as another tool would: not through meshctl."""
    if is_fake(kernel):
        kernel.iptables.add_foreign(ns, table, chain, rule)
        return
    add_foreign_lines(ns, table, chain, *([rule.render()] if rule else []))


def add_foreign_lines(ns: str, table: str, chain: str, *lines: str) -> None:
    """Another tool's chain (created if missing) and rules in iptables-save syntax, real kernel."""
    declare = [] if chain in BUILTIN_CHAINS[table] or f":{chain} " in saved(ns, table) else [chain]
    text = "\n".join([f"*{table}", *(f":{c} - [0:0]" for c in declare), *lines, "COMMIT", ""])
    in_ns(ns, "iptables-legacy-restore", "--noflush", stdin=text)


def whole_table(kernel: Any, ns: str, table: str) -> str:
    """Everything in the table, foreign and owned, as text to compare (counters left out)."""
    if is_fake(kernel):
        text: str = kernel.iptables.save(ns, table)
        return text
    return saved(ns, table)


def saved(ns: str, table: str) -> str:
    """iptables-legacy-save of a real namespace's table, without its timestamp comments."""
    out = in_ns(ns, "iptables-legacy-save", "-t", table)
    return "\n".join(line for line in out.splitlines() if not line.startswith("#"))


@pytest.fixture
def ns(kernel: Any) -> str:
    name: str = kernel.new_ns("ipt")
    return name


def every_kind_of_rule(chain: str) -> tuple[Rule, ...]:
    """One rule per feature the planner uses, given loosely so canonicalisation is exercised."""
    return (
        Rule(
            chain,
            "DNAT",
            C,
            opts(to_destination="10.0.0.2:8080"),
            source="10.0.0.5/24",
            destination="10.0.9.9",
            protocol="TCP",
            in_interface="meshbr0",
            matches=(
                Match("tcp", opts(dport=80)),
                Match("statistic", opts(mode="random", probability=1 / 3)),
                Match("conntrack", opts(ctstate="established,related")),
                Match("mark", opts(mark="0x10/0xff")),
                Match("addrtype", opts(dst_type="local")),
            ),
        ),
        Rule(chain, "SNAT", C, opts(to_source="10.0.0.1"), out_interface="meshbr0"),
        Rule(chain, "MASQUERADE", C, protocol="udp", matches=(Match("udp", opts(sport="1:1024")),)),
        Rule(
            chain,
            "REDIRECT",
            C,
            opts(to_ports=5353),
            protocol="udp",
            matches=(Match("udp", opts(dport=53)),),
        ),
        Rule(chain, "MARK", C, opts(set_mark=0x4000)),
        Rule(chain, "MARK", C, opts(set_mark="0x1/0xf"), matches=(Match("mark", opts(mark=1)),)),
        Rule(chain, "MESH-OTHER", C),
        Rule(chain, "RETURN", C),
    )


def test_every_rule_kind_reads_back_equal(kernel: Any, ns: str) -> None:
    ipt = api(kernel)
    rules = every_kind_of_rule("MESH-SVC-WEB")
    ipt.apply(ns, "nat", TableChange(create=("MESH-OTHER",), replace={"MESH-SVC-WEB": rules}))
    assert ipt.list_owned(ns, "nat") == OwnedTable(chains={"MESH-SVC-WEB": rules, "MESH-OTHER": ()})
    # The canonical form is what iptables itself prints.
    assert rules[0].render() == (
        "-A MESH-SVC-WEB -s 10.0.0.0/24 -d 10.0.9.9/32 -i meshbr0 -p tcp -m tcp --dport 80 "
        "-m statistic --mode random --probability 0.33333333349 "
        "-m conntrack --ctstate RELATED,ESTABLISHED -m mark --mark 0x10/0xff "
        '-m addrtype --dst-type LOCAL -m comment --comment "meshctl:svc-web" '
        "-j DNAT --to-destination 10.0.0.2:8080"
    )
    assert rules[4].target_args == (("set-xmark", "0x4000/0xffffffff"),)
    assert rules[5].target_args == (("set-xmark", "0x1/0xf"),)


def test_filter_verdicts_read_back_equal(kernel: Any, ns: str) -> None:
    ipt = api(kernel)
    rules = (
        Rule(
            "MESH-FILTER", "ACCEPT", C, matches=(Match("conntrack", opts(ctstate="ESTABLISHED")),)
        ),
        Rule("MESH-FILTER", "REJECT", C, protocol="tcp", matches=(Match("tcp", opts(dport=81)),)),
        Rule("MESH-FILTER", "DROP", C, source="192.168.7.0/24"),
    )
    ipt.apply(ns, "filter", TableChange(replace={"MESH-FILTER": rules}))
    assert ipt.list_owned(ns, "filter").chains == {"MESH-FILTER": rules}
    assert rules[1].target_args == (("reject-with", "icmp-port-unreachable"),)


def test_create_replace_delete_chains(kernel: Any, ns: str) -> None:
    ipt = api(kernel)
    web = (Rule("MESH-SVC-WEB", "DNAT", C, opts(to_destination="10.0.0.2:80"), protocol="tcp"),)
    ipt.apply(ns, "nat", TableChange(create=("MESH-SVC-A",), replace={"MESH-SVC-WEB": web}))
    assert dict(ipt.list_owned(ns, "nat").chains) == {"MESH-SVC-A": (), "MESH-SVC-WEB": web}

    # Replacing a chain sets its rules wholly; other chains stay as they are.
    web2 = (
        Rule("MESH-SVC-WEB", "DNAT", C, opts(to_destination="10.0.0.3:80"), protocol="tcp"),
        Rule("MESH-SVC-WEB", "RETURN", C),
    )
    ipt.apply(ns, "nat", TableChange(replace={"MESH-SVC-WEB": web2}))
    assert dict(ipt.list_owned(ns, "nat").chains) == {"MESH-SVC-A": (), "MESH-SVC-WEB": web2}

    ipt.apply(ns, "nat", TableChange(delete=("MESH-SVC-A", "MESH-NEVER-MADE")))
    assert dict(ipt.list_owned(ns, "nat").chains) == {"MESH-SVC-WEB": web2}


def test_second_identical_apply_changes_nothing(kernel: Any, ns: str) -> None:
    ipt = api(kernel)
    change = TableChange(
        replace={"MESH-PREROUTING": (Rule("MESH-PREROUTING", "RETURN", C),)},
        ensure_jumps=(Rule("PREROUTING", "MESH-PREROUTING", "meshctl:node"),),
    )
    ipt.apply(ns, "nat", change)
    owned, text = ipt.list_owned(ns, "nat"), whole_table(kernel, ns, "nat")
    ipt.apply(ns, "nat", change)
    assert ipt.list_owned(ns, "nat") == owned
    assert whole_table(kernel, ns, "nat") == text


def test_several_tables_in_one_batch(kernel: Any, ns: str) -> None:
    """apply_tables: both tables read in one save (their jumps go in once), written in one run;
    a refused table is left unchanged, and one before it is either changed whole or not at all."""
    ipt = api(kernel)
    add_foreign(kernel, ns, "filter", "INPUT")
    nat = TableChange(
        replace={"MESH-N": (Rule("MESH-N", "RETURN", C),)},
        ensure_jumps=(Rule("PREROUTING", "MESH-N", C),),
    )
    filter_change = TableChange(
        replace={"MESH-F": (Rule("MESH-F", "ACCEPT", C),)},
        ensure_jumps=(Rule("INPUT", "MESH-F", C),),
    )
    for _ in range(2):
        ipt.apply_tables(ns, {"nat": nat, "filter": filter_change})
        assert ipt.list_owned(ns, "nat") == OwnedTable(nat.replace, nat.ensure_jumps)
        owned = OwnedTable(filter_change.replace, filter_change.ensure_jumps)
        assert ipt.list_owned(ns, "filter") == owned
    filter_before = whole_table(kernel, ns, "filter")
    emptied = TableChange(replace={"MESH-N": ()})
    refused = TableChange(replace={"MESH-F": (Rule("MESH-F", "ACCEPT", "not-meshctl"),)})
    with pytest.raises(ValueError, match="meshctl"):
        ipt.apply_tables(ns, {"nat": emptied, "filter": refused})
    assert ipt.list_owned(ns, "nat").chains["MESH-N"] in ((), nat.replace["MESH-N"])
    assert whole_table(kernel, ns, "filter") == filter_before


def test_jump_rules_go_first_once_and_leave_alone(kernel: Any, ns: str) -> None:
    ipt = api(kernel)
    foreign = Rule(
        "PREROUTING",
        "ACCEPT",
        "other-tool",
        protocol="tcp",
        matches=(Match("tcp", opts(dport=22)),),
    )
    add_foreign(kernel, ns, "nat", "PREROUTING", foreign)
    jump = Rule("PREROUTING", "MESH-PREROUTING", "meshctl:node")
    local = Rule(
        "OUTPUT",
        "MESH-OUTPUT",
        "meshctl:node",
        matches=(Match("addrtype", opts(dst_type="LOCAL")),),
    )
    change = TableChange(create=("MESH-PREROUTING", "MESH-OUTPUT"), ensure_jumps=(jump, local))
    ipt.apply(ns, "nat", change)
    ipt.apply(ns, "nat", change)
    assert ipt.list_owned(ns, "nat").jumps == (jump, local)
    prerouting = [
        line for line in whole_table(kernel, ns, "nat").splitlines() if "PREROUTING " in line
    ]
    # Ours is inserted above the foreign rule, and only once.
    ours = [i for i, line in enumerate(prerouting) if line.endswith("-j MESH-PREROUTING")]
    theirs = [i for i, line in enumerate(prerouting) if "--dport 22" in line]
    assert len(ours) == 1 and len(theirs) == 1 and ours[0] < theirs[0], prerouting

    ipt.apply(ns, "nat", TableChange(delete_jumps=(jump,), delete=("MESH-PREROUTING",)))
    assert ipt.list_owned(ns, "nat") == OwnedTable(chains={"MESH-OUTPUT": ()}, jumps=(local,))
    assert "--dport 22" in whole_table(kernel, ns, "nat")


def test_foreign_rules_and_chains_survive_a_full_lifecycle(kernel: Any, ns: str) -> None:
    ipt = api(kernel)
    add_foreign(kernel, ns, "nat", "DOCKER")
    add_foreign(kernel, ns, "nat", "DOCKER", Rule("DOCKER", "RETURN", "", in_interface="docker0"))
    add_foreign(
        kernel,
        ns,
        "nat",
        "PREROUTING",
        Rule("PREROUTING", "DOCKER", "", matches=(Match("addrtype", opts(dst_type="LOCAL")),)),
    )
    add_foreign(
        kernel,
        ns,
        "nat",
        "POSTROUTING",
        Rule("POSTROUTING", "MASQUERADE", "not meshctl", source="172.17.0.0/16"),
    )
    add_foreign(kernel, ns, "filter", "FORWARD", Rule("FORWARD", "DROP", "", out_interface="x0"))
    before = {t: whole_table(kernel, ns, t) for t in ("nat", "filter")}

    svc = tuple(every_kind_of_rule("MESH-SVC-WEB"))
    ipt.apply(
        ns,
        "nat",
        TableChange(
            create=("MESH-OTHER",),
            replace={
                # Not a jump to MESH-SVC-WEB: SNAT and MASQUERADE are refused under PREROUTING.
                "MESH-PREROUTING": (Rule("MESH-PREROUTING", "RETURN", C),),
                "MESH-SVC-WEB": svc,
            },
            ensure_jumps=(Rule("PREROUTING", "MESH-PREROUTING", "meshctl:node"),),
        ),
    )
    ipt.apply(
        ns,
        "filter",
        TableChange(
            replace={"MESH-FORWARD": (Rule("MESH-FORWARD", "ACCEPT", C),)},
            ensure_jumps=(Rule("FORWARD", "MESH-FORWARD", "meshctl:node"),),
        ),
    )
    assert ipt.list_owned(ns, "nat").chains["MESH-SVC-WEB"] == svc
    ipt.apply(ns, "nat", TableChange(replace={"MESH-SVC-WEB": svc[:1]}, delete=()))
    # Foreign rules are never listed as meshctl's.
    jumps = ipt.list_owned(ns, "nat").jumps
    assert [(j.chain, j.target, j.comment) for j in jumps] == [
        ("PREROUTING", "MESH-PREROUTING", "meshctl:node")
    ]
    assert "DOCKER" not in ipt.list_owned(ns, "nat").chains

    for table in ("nat", "filter"):
        ipt.flush_owned(ns, table)
        assert ipt.list_owned(ns, table) == OwnedTable()
    assert {t: whole_table(kernel, ns, t) for t in ("nat", "filter")} == before


@pytest.mark.parametrize(
    "change",
    [
        TableChange(create=("DOCKER",)),
        TableChange(replace={"mesh-lower": ()}),
        TableChange(delete=("PREROUTING",)),
        TableChange(replace={"MESH-X": (Rule("MESH-X", "RETURN", ""),)}),
        TableChange(replace={"MESH-X": (Rule("MESH-X", "RETURN", "svc-web"),)}),
        TableChange(replace={"MESH-X": (Rule("MESH-Y", "RETURN", C),)}),
        TableChange(ensure_jumps=(Rule("PREROUTING", "MESH-X", ""),)),
        TableChange(ensure_jumps=(Rule("PREROUTING", "ACCEPT", C),)),
        TableChange(ensure_jumps=(Rule("MESH-X", "MESH-Y", C),)),
        TableChange(delete_jumps=(Rule("FORWARD", "MESH-X", C),)),  # not a nat chain
        TableChange(replace={"MESH-X": (Rule("MESH-X", "REDIRECT", C, opts(to_ports=1)),)}),
        # Refused after thousands of rules went to the restore tool: it is stopped uncommitted.
        TableChange(
            replace={
                "MESH-X": (
                    *(
                        Rule("MESH-X", "RETURN", C, destination=f"10.9.{i >> 8}.{i & 255}")
                        for i in range(5000)
                    ),
                    Rule("MESH-X", "RETURN", "svc-web"),
                )
            }
        ),
    ],
    ids=lambda change: repr(change)[12:60],
)
def test_refused_changes_change_nothing(kernel: Any, ns: str, change: TableChange) -> None:
    ipt = api(kernel)
    ipt.apply(ns, "nat", TableChange(replace={"MESH-X": (Rule("MESH-X", "RETURN", C),)}))
    before = whole_table(kernel, ns, "nat")
    with pytest.raises(ValueError, match="meshctl|MESH-|listed under|builtin chain|protocol="):
        ipt.apply(ns, "nat", change)
    assert whole_table(kernel, ns, "nat") == before


def test_deleting_a_chain_still_jumped_to_fails_whole(kernel: Any, ns: str) -> None:
    ipt = api(kernel)
    ipt.apply(
        ns,
        "nat",
        TableChange(create=("MESH-B",), replace={"MESH-A": (Rule("MESH-A", "MESH-B", C),)}),
    )
    before = whole_table(kernel, ns, "nat")
    with pytest.raises(KernelError):
        ipt.apply(ns, "nat", TableChange(create=("MESH-C",), delete=("MESH-B",)))
    assert whole_table(kernel, ns, "nat") == before


def test_nat_target_reached_from_the_wrong_builtin_chain_fails_whole(kernel: Any, ns: str) -> None:
    ipt = api(kernel)
    masquerade = (Rule("MESH-SNAT", "MASQUERADE", C, out_interface="meshbr0"),)
    ipt.apply(ns, "nat", TableChange(replace={"MESH-SNAT": masquerade}))
    before = whole_table(kernel, ns, "nat")
    with pytest.raises(KernelError):
        ipt.apply(
            ns,
            "nat",
            TableChange(
                replace={"MESH-PREROUTING": (Rule("MESH-PREROUTING", "MESH-SNAT", C),)},
                ensure_jumps=(Rule("PREROUTING", "MESH-PREROUTING", "meshctl:node"),),
            ),
        )
    assert whole_table(kernel, ns, "nat") == before


def test_every_lb_rule_reads_back_equal(kernel: Any, ns: str) -> None:
    # The load balancer's tables as its planner builds them: balanced, drained and refused VIPs.
    backends = tuple(Backend(f"10.0.0.{20 + i}") for i in range(3))
    vips = (
        VirtualIp("svc-a", "a", "10.0.0.10", backends),
        VirtualIp("svc-b", "b", "10.0.0.11", (Backend("10.0.0.30", weight=0),)),
        VirtualIp("svc-c", "c", "10.0.0.12"),
    )
    ipt = api(kernel)
    for table, owned in iptables_tables(lb_spec("n1", "net1", "10.0.0.2/24", vips)).items():
        ipt.apply(ns, table, TableChange(replace=owned.chains, ensure_jumps=owned.jumps))
        assert ipt.list_owned(ns, table) == owned, table


def test_the_diff_of_what_was_applied_is_empty(kernel: Any, ns: str) -> None:
    """table_change to a table, applied, reads back with nothing left to change (`empty`, the
    convention kernel.nftables_rules.table_change keeps too)."""
    ipt = api(kernel)
    vips = (VirtualIp("svc-a", "a", "10.0.0.10", (Backend("10.0.0.20"),)),)
    owned = iptables_tables(lb_spec("n1", "net1", "10.0.0.2/24", vips))["nat"]
    assert table_change(owned, owned).empty
    change = table_change(owned, ipt.list_owned(ns, "nat"))
    assert not change.empty

    ipt.apply(ns, "nat", change)

    assert table_change(owned, ipt.list_owned(ns, "nat")).empty
    assert table_change(OwnedTable(), ipt.list_owned(ns, "nat")).delete


def node_rules() -> dict[str, tuple[Rule, ...]]:
    """Every rule shape the node planner builds (DNS, forwarding, masquerade, ingress)."""
    dport, net = Match("tcp", opts(dport="8080")), "meshctl:net-1"
    return {
        "MESH-DNS": (
            Rule(
                "MESH-DNS",
                "DNAT",
                "meshctl:dns",
                opts(to_destination="127.0.0.11:40053"),
                destination="127.0.0.11/32",
                protocol="udp",
                matches=(Match("udp", opts(dport="53")),),
            ),
        ),
        "MESH-FORWARD": (
            Rule(
                "MESH-FORWARD",
                "ACCEPT",
                net,
                out_interface="meshbr1",
                matches=(Match("conntrack", opts(ctstate="RELATED,ESTABLISHED,DNAT")),),
            ),
            Rule("MESH-FORWARD", "ACCEPT", net, in_interface="meshbr1", out_interface="meshbr1"),
            Rule("MESH-FORWARD", "DROP", net, in_interface="meshbr1", out_interface="mesh+"),
            Rule("MESH-FORWARD", "DROP", net, out_interface="meshbr1"),
        ),
        "MESH-POSTROUTING": (
            Rule("MESH-POSTROUTING", "RETURN", net, source="10.60.0.0/24", out_interface="meshbr1"),
            Rule("MESH-POSTROUTING", "MASQUERADE", net, source="10.60.0.0/24"),
            Rule(
                "MESH-POSTROUTING",
                "MASQUERADE",
                "meshctl:svc-1",
                destination="10.255.0.5",
                protocol="tcp",
                matches=(dport, Match("conntrack", opts(ctstate="DNAT"))),
            ),
        ),
        "MESH-INGRESS": (
            Rule("MESH-INGRESS", "DNAT", "meshctl:svc-1", opts(to_destination="10.255.0.5:8080"),
                 protocol="tcp", matches=(dport,)),
            Rule("MESH-INGRESS", "DNAT", "meshctl:svc-1", opts(to_destination="10.60.0.7:80"),
                 protocol="tcp",
                 matches=(dport, Match("statistic", opts(mode="random", probability=1 / 3)))),
        ),
    }  # fmt: skip


def test_every_node_rule_reads_back_equal(kernel: Any, ns: str) -> None:
    ipt = api(kernel)
    chains = node_rules()
    local = (Match("addrtype", opts(dst_type="LOCAL")),)
    jumps = (
        Rule("PREROUTING", "MESH-INGRESS", "meshctl:node", matches=local),
        Rule("OUTPUT", "MESH-INGRESS", "meshctl:node", matches=local),
        Rule("OUTPUT", "MESH-DNS", "meshctl:node"),
        Rule("POSTROUTING", "MESH-POSTROUTING", "meshctl:node"),
    )
    nat = OwnedTable({c: r for c, r in chains.items() if c != "MESH-FORWARD"}, jumps)
    ipt.apply(ns, "nat", TableChange(replace=nat.chains, ensure_jumps=nat.jumps))
    assert ipt.list_owned(ns, "nat") == nat
    forward = {"MESH-FORWARD": chains["MESH-FORWARD"]}
    ipt.apply(ns, "filter", TableChange(replace=forward))
    assert ipt.list_owned(ns, "filter").chains == forward


@pytest.mark.parametrize(
    "comment",
    ["meshctl:a b", 'meshctl:say "hi"', "meshctl:it's", "meshctl:back\\slash", "meshctl:-j x -m y"],
)
def test_comments_with_spaces_quotes_and_backslashes_round_trip(
    kernel: Any, ns: str, comment: str
) -> None:
    ipt = api(kernel)
    rule = Rule("MESH-X", "RETURN", comment, protocol="tcp", matches=(Match("tcp", opts(dport=1)),))
    jump = Rule("OUTPUT", "MESH-X", comment)
    ipt.apply(ns, "nat", TableChange(replace={"MESH-X": (rule,)}, ensure_jumps=(jump,)))
    assert ipt.list_owned(ns, "nat") == OwnedTable({"MESH-X": (rule,)}, (jump,))
    ipt.apply(ns, "nat", TableChange(delete_jumps=(jump,), delete=("MESH-X",)))
    assert ipt.list_owned(ns, "nat") == OwnedTable()


def test_create_keeps_an_existing_chain_and_missing_things_are_no_ops(kernel: Any, ns: str) -> None:
    ipt = api(kernel)
    rules = (Rule("MESH-A", "RETURN", C),)
    ipt.apply(ns, "nat", TableChange(replace={"MESH-A": rules}))
    text = whole_table(kernel, ns, "nat")
    # Creating a chain that exists leaves its rules; deleting what is not there does nothing.
    ipt.apply(ns, "nat", TableChange(create=("MESH-A",)))
    ipt.apply(
        ns,
        "nat",
        TableChange(
            delete=("MESH-NEVER-MADE",),
            delete_jumps=(Rule("OUTPUT", "MESH-A", "meshctl:node"),),
        ),
    )
    assert ipt.list_owned(ns, "nat") == OwnedTable({"MESH-A": rules})
    assert whole_table(kernel, ns, "nat") == text


def test_available(kernel: Any, ns: str) -> None:
    assert api(kernel).available(ns) is None


# ---- real kernel only: namespaces kept apart, and real packets through the rules ----------


@pytest.fixture
def real() -> Iptables:
    return Iptables()


@pytest.mark.root
def test_namespaces_never_see_each_others_tables(
    netns_factory: NetnsFactory, real: Iptables
) -> None:
    first, second = netns_factory("ipta"), netns_factory("iptb")
    a = (Rule("MESH-A", "RETURN", "meshctl:a"),)
    b = (Rule("MESH-B", "ACCEPT", "meshctl:b"),)
    # Interleave namespaces so a handle or socket kept from the last batch would show.
    real.apply(first, "nat", TableChange(replace={"MESH-A": a}))
    assert real.list_owned(second, "nat") == OwnedTable()
    real.apply(second, "nat", TableChange(replace={"MESH-B": b}))
    assert real.list_owned(first, "nat").chains == {"MESH-A": a}
    assert real.list_owned(second, "nat").chains == {"MESH-B": b}
    assert "MESH-B" not in saved(first, "nat")
    assert "MESH-A" not in saved(second, "nat")
    real.flush_owned(first, "nat")
    assert real.list_owned(second, "nat").chains == {"MESH-B": b}


@pytest.mark.root
def test_reading_a_table_never_made_neither_runs_the_tool_nor_makes_it(
    netns_factory: NetnsFactory, real: Iptables, monkeypatch: pytest.MonkeyPatch
) -> None:
    ns = netns_factory("iptnone")

    def tables() -> list[str]:
        names = subprocess.run(
            ["ip", "netns", "exec", ns, "cat", "/proc/net/ip_tables_names"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        return names.stdout.split()

    saves: list[str] = []
    original = iptables._save
    monkeypatch.setattr(iptables, "_save", lambda n, t: saves.append(t) or original(n, t))
    assert real.list_owned(ns, "nat") == OwnedTable()
    assert (saves, tables()) == ([], [])  # a task namespace where nftables runs stays so
    real.apply(ns, "nat", TableChange(replace={"MESH-A": (Rule("MESH-A", "RETURN", C),)}))
    assert real.list_owned(ns, "nat").chains == {"MESH-A": (Rule("MESH-A", "RETURN", C),)}
    assert "nat" in tables() and saves == ["nat"]


@pytest.mark.root
def test_rules_are_written_as_iptables_save_prints_them(
    netns_factory: NetnsFactory, real: Iptables
) -> None:
    ns = netns_factory("iptsave")
    rules = every_kind_of_rule("MESH-SVC-WEB")
    real.apply(ns, "nat", TableChange(create=("MESH-OTHER",), replace={"MESH-SVC-WEB": rules}))
    lines = [line for line in saved(ns, "nat").splitlines() if line.startswith("-A MESH-SVC-WEB ")]
    assert lines == [rule.render() for rule in rules]


@pytest.mark.root
def test_rules_meshctl_cannot_express_are_listed_never_fatal(
    netns_factory: NetnsFactory, real: Iptables
) -> None:
    ns = netns_factory("iptodd")
    real.apply(ns, "nat", TableChange(replace={"MESH-X": (Rule("MESH-X", "RETURN", C),)}))
    # Negations and quotes: another tool's rules, or meshctl's edited by hand.
    odd_jump = '-A OUTPUT ! -d 10.9.9.9/32 -m comment --comment "meshctl:node" -j MESH-X'
    add_foreign_lines(
        ns,
        "nat",
        "OUTPUT",
        '-A OUTPUT ! -s 10.1.1.1/32 -m comment --comment "other \\"tool\\"" -j RETURN',
        odd_jump,
    )
    negated, no_target = "-A MESH-X -p tcp -m tcp ! --dport 22 -j RETURN", "-A MESH-X -s 10.2.2.2"
    add_foreign_lines(ns, "nat", "MESH-X", negated, no_target)
    before = saved(ns, "nat")

    owned = real.list_owned(ns, "nat")

    (jump,) = owned.jumps
    assert (jump.chain, jump.target, jump.comment) == ("OUTPUT", "MESH-X", "meshctl:node")
    assert owned.chains["MESH-X"][0] == Rule("MESH-X", "RETURN", C)
    assert [rule.target for rule in owned.chains["MESH-X"]] == ["RETURN", "RETURN", ""]
    # A planner sees them unequal to what it wants: it rewrites the chain and drops the jump.
    real.apply(ns, "nat", TableChange(replace={"MESH-X": ()}, delete_jumps=(jump,)))
    assert real.list_owned(ns, "nat") == OwnedTable({"MESH-X": ()})
    assert odd_jump not in saved(ns, "nat") and "other" in saved(ns, "nat")
    real.apply(ns, "nat", TableChange(replace={"MESH-X": (Rule("MESH-X", "RETURN", C),)}))
    add_foreign_lines(ns, "nat", "OUTPUT", odd_jump)
    real.flush_owned(ns, "nat")
    assert saved(ns, "nat") == "\n".join(
        line for line in before.splitlines() if "MESH-X" not in line
    )


@pytest.mark.root
def test_a_refused_write_names_the_line_and_what_to_do(
    netns_factory: NetnsFactory, real: Iptables
) -> None:
    ns = netns_factory("iptline")
    real.apply(
        ns,
        "nat",
        TableChange(create=("MESH-B",), replace={"MESH-A": (Rule("MESH-A", "MESH-B", C),)}),
    )
    with pytest.raises(KernelError, match=r"line 3 failed \(input line 3: -X MESH-B\).*jumps"):
        real.apply(ns, "nat", TableChange(delete=("MESH-B",)))


@pytest.mark.root
def test_missing_tools_say_which_package_to_install(
    netns_factory: NetnsFactory, real: Iptables, monkeypatch: pytest.MonkeyPatch
) -> None:
    ns = netns_factory("iptmiss")
    monkeypatch.setattr(iptables, "RESTORE", "iptables-legacy-restore-not-installed")
    with pytest.raises(Unsupported, match="install Debian's iptables package"):
        real.apply(ns, "nat", TableChange(create=("MESH-A",)))
    reason = real.available(ns)
    assert reason is not None and "install Debian's iptables package" in reason
    assert "\n" not in reason
    assert real.list_owned(ns, "nat") == OwnedTable()


SERVER, CLIENT = "10.231.0.2", "10.231.0.1"


def veth_pair(client: str, server: str) -> None:
    """Join two test namespaces with a veth made inside them (never in the root namespace)."""
    subprocess.run(
        [
            "ip",
            "-n",
            client,
            "link",
            "add",
            "mtc0",
            "type",
            "veth",
            "peer",
            "name",
            "mts0",
            "netns",
            server,
        ],
        check=True,
    )
    for ns, dev, addr in ((client, "mtc0", CLIENT), (server, "mts0", SERVER)):
        subprocess.run(["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev], check=True)
        for link in (dev, "lo"):
            subprocess.run(["ip", "-n", ns, "link", "set", link, "up"], check=True)


def fetch(host: str, port: int) -> str:
    """Open a TCP connection and read what the server says until it closes."""
    with socket.create_connection((host, port), timeout=scaled(3)) as conn:
        chunks = []
        while data := conn.recv(100):
            chunks.append(data)
    return b"".join(chunks).decode().strip()


@pytest.fixture
def two_hosts(netns_factory: NetnsFactory) -> Iterator[tuple[str, str]]:
    """A client and a server namespace on one veth; the server answers its port on 8081, 8082."""
    client, server = netns_factory("cli"), netns_factory("srv")
    veth_pair(client, server)
    servers = [
        subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                server,
                "socat",
                f"TCP-LISTEN:{port},fork,reuseaddr",
                f"SYSTEM:echo {port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for port in (8081, 8082)
    ]
    try:
        for port in (8081, 8082):
            deadline = time.monotonic() + scaled(5)
            while True:
                try:
                    assert netns.run_in(server, fetch, "127.0.0.1", port) == str(port)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        yield client, server
    finally:
        for proc in servers:
            proc.kill()
            proc.wait()


def lb_change(*targets: Rule) -> TableChange:
    """PREROUTING → MESH-PREROUTING → MESH-SVC-WEB for SERVER:80/tcp, then the given rules."""
    return TableChange(
        replace={
            "MESH-PREROUTING": (
                Rule(
                    "MESH-PREROUTING",
                    "MESH-SVC-WEB",
                    C,
                    destination=SERVER,
                    protocol="tcp",
                    matches=(Match("tcp", opts(dport=80)),),
                ),
            ),
            "MESH-SVC-WEB": targets,
        },
        ensure_jumps=(Rule("PREROUTING", "MESH-PREROUTING", "meshctl:node"),),
    )


def dnat(port: int, *matches: Match) -> Rule:
    return Rule(
        "MESH-SVC-WEB",
        "DNAT",
        C,
        opts(to_destination=f"{SERVER}:{port}"),
        protocol="tcp",
        matches=matches,
    )


@pytest.mark.root
def test_dnat_rule_redirects_a_tcp_connection(real: Iptables, two_hosts: tuple[str, str]) -> None:
    client, server = two_hosts
    with pytest.raises(ConnectionRefusedError):  # nothing listens on :80 without the rule
        netns.run_in(client, fetch, SERVER, 80)
    real.apply(server, "nat", lb_change(dnat(8081)))
    assert netns.run_in(client, fetch, SERVER, 80) == "8081"
    real.flush_owned(server, "nat")
    with pytest.raises(ConnectionRefusedError):
        netns.run_in(client, fetch, SERVER, 80)


@pytest.mark.root
def test_statistic_random_spreads_connections(real: Iptables, two_hosts: tuple[str, str]) -> None:
    client, server = two_hosts
    half = Match("statistic", opts(mode="random", probability=0.5))
    real.apply(server, "nat", lb_change(dnat(8081, half), dnat(8082)))
    answers = [netns.run_in(client, fetch, SERVER, 80) for _ in range(40)]
    counts = {port: answers.count(port) for port in ("8081", "8082")}
    assert sum(counts.values()) == 40 and all(counts.values()), counts


# ---- the parser alone: iptables-save lines meshctl meets -------------------------------------


@pytest.mark.parametrize(
    ("line", "rule"),
    [
        (
            '-A MESH-S -d 10.1.0.1/32 -m comment --comment "meshctl:svc-a" -j MESH-SVC-A',
            Rule("MESH-S", "MESH-SVC-A", "meshctl:svc-a", destination="10.1.0.1"),
        ),
        (
            "-A MESH-S -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN --dport 80 -m comment "
            '--comment "meshctl:a \\"b\\" \\\\ it\\\'s" -j DNAT --to-destination 1.2.3.4 --random',
            Rule(
                "MESH-S",
                "DNAT",
                'meshctl:a "b" \\ it\'s',
                (("to-destination", "1.2.3.4"), ("random", "")),
                protocol="tcp",
                matches=(Match("tcp", (("tcp-flags", "FIN,SYN,RST,ACK SYN"), ("dport", "80"))),),
            ),
        ),
        ("-A MESH-S -m comment --comment plain -j RETURN", Rule("MESH-S", "RETURN", "plain")),
        ("-A MESH-S -j REJECT --reject-with icmp-port-unreachable", Rule("MESH-S", "REJECT")),
    ],
)
def test_parse_rule_reads_what_iptables_save_prints(line: str, rule: Rule) -> None:
    assert parse_rule(line) == rule


@pytest.mark.parametrize(
    "line",
    [
        '-A OUTPUT ! -d 10.0.0.1/32 -m comment --comment "meshctl:node" -j MESH-X',
        '-A OUTPUT -m comment --comment "meshctl:node" -g MESH-X',
        '-A OUTPUT -m comment --comment "meshctl:node" -m comment --comment "again" -j MESH-X',
        '-A OUTPUT -f -m comment --comment "meshctl:node" -j MESH-X',
        '-A OUTPUT -m comment --comment "meshctl:node"',
    ],
)
def test_parse_rule_keeps_what_a_rule_cannot_express_as_text(line: str) -> None:
    rule = parse_rule(line)
    assert rule.chain == "OUTPUT" and rule.comment == "meshctl:node"
    assert rule.matches == (Match("unparsed", (("rule", line),)),)
    assert rule != Rule("OUTPUT", "MESH-X", "meshctl:node")
