"""kernel.nftables_rules without a kernel: nft's JSON read into canonical rules, the text of a
transaction in the order the kernel needs, and the checks that keep it inside `ip meshctl`."""

from __future__ import annotations

import json

import pytest

from kernel.nftables_rules import (
    Chain,
    Hook,
    NftChange,
    NftSet,
    NftTable,
    parse_table,
    table_change,
    transaction_lines,
    validate,
)

# What nft 1.0.6 printed (-j) for a table meshctl wrote, cut to one object of each kind.
LISTING = {
    "nftables": [
        {"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
        {"table": {"family": "ip", "name": "meshctl", "handle": 1}},
        {"map": {"family": "ip", "name": "services", "table": "meshctl", "type": "ipv4_addr",
                 "handle": 7, "map": "verdict",
                 "elem": [["10.9.0.1", {"goto": {"target": "svc-web"}}]]}},
        {"set": {"family": "ip", "name": "no-endpoints", "table": "meshctl",
                 "type": "ipv4_addr", "handle": 8, "elem": ["10.9.0.2"]}},
        {"chain": {"family": "ip", "table": "meshctl", "name": "svc-web", "handle": 1}},
        {"chain": {"family": "ip", "table": "meshctl", "name": "input", "handle": 6,
                   "type": "filter", "hook": "input", "prio": 0, "policy": "accept"}},
        {"rule": {"family": "ip", "table": "meshctl", "chain": "svc-web", "handle": 10, "expr": [
            {"vmap": {"key": {"numgen": {"mode": "inc", "mod": 2, "offset": 0}},
                      "data": {"set": [[0, {"goto": {"target": "ep-1"}}],
                                       [1, {"goto": {"target": "ep-2"}}]]}}}]}},
        {"rule": {"family": "ip", "table": "meshctl", "chain": "input", "handle": 11, "expr": [
            {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}},
                       "right": "@no-endpoints"}},
            {"reject": {"type": "tcp reset"}}]}},
        {"rule": {"family": "ip", "table": "meshctl", "chain": "input", "handle": 12, "expr": [
            {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "eth0"}},
            {"queue": {"num": 3}}]}},
    ]
}  # fmt: skip


def test_nft_json_reads_as_the_rules_nft_prints() -> None:
    table = parse_table(json.dumps(LISTING))

    assert table.chains["svc-web"] == Chain(
        ("numgen inc mod 2 vmap { 0 : goto ep-1, 1 : goto ep-2 }",)
    )
    (refuse, other) = table.chains["input"].rules
    assert table.chains["input"].hook == Hook("filter", "input", 0)
    assert refuse == "ip daddr @no-endpoints reject with tcp reset"
    # An expression meshctl never writes: a rule that equals none it wants.
    assert other.startswith("unparsed ")
    assert table.sets["services"] == NftSet("", True, {"10.9.0.1": "goto svc-web"})
    assert table.sets["no-endpoints"] == NftSet("", False, {"10.9.0.2": ""})


def test_a_transaction_declares_before_it_fills_and_deletes_last() -> None:
    held = NftTable(
        chains={"a": Chain(("goto b",)), "b": Chain(("dnat to 10.0.0.1",)), "gone": Chain()},
        sets={"m": NftSet("type ipv4_addr : verdict", True, {"10.0.1.1": "goto a"})},
    )
    desired = NftTable(
        chains={"a": Chain(("goto c",)), "b": held.chains["b"], "c": Chain(("dnat to 10.0.0.2",))},
        sets={"m": NftSet("type ipv4_addr : verdict", True, {"10.0.1.2": "goto a"})},
    )

    change = table_change(desired, held)
    lines = list(transaction_lines(change))

    assert change.new == frozenset({"c"})  # flushed: only the chain the table holds
    assert lines == [
        "table ip meshctl {",
        "chain a {  }",
        "chain c {  }",
        "}",
        "delete element ip meshctl m { 10.0.1.1 }",
        "flush chain ip meshctl a",
        "table ip meshctl {",
        "chain a { goto c; }",
        "chain c { dnat to 10.0.0.2; }",
        "}",
        "add element ip meshctl m { 10.0.1.2 : goto a }",
        "flush chain ip meshctl gone",
        "delete chain ip meshctl gone",
    ]
    assert table_change(desired, desired).empty


@pytest.mark.parametrize(
    "change",
    [
        NftChange(replace={"a": Chain(("accept; flush ruleset",))}),
        NftChange(replace={"a": Chain(("accept # ",))}),
        NftChange(delete=("x\nflush ruleset",)),
        NftChange(add_sets={"s": NftSet("type ipv4_addr; flags interval")}),
        NftChange(add_elements={"s": {"10.0.0.1": "goto a }\nflush ruleset"}}),
    ],
)
def test_text_that_could_end_a_command_is_refused(change: NftChange) -> None:
    with pytest.raises(ValueError):
        validate(change)
