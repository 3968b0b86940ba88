"""kernel.nftables against the fake and the real kernel: meshctl's table `ip meshctl`, and no other.

Each form of rule meshctl writes must read back as written (the canonical form planners diff
by equality); a transaction applies wholly or not at all; another tool's table comes out of
every meshctl operation unchanged. Foreign state is installed with `nft` on the real kernel and
`add_foreign` in the fake.
"""

from __future__ import annotations

import subprocess
from typing import Any

import pytest

from kernel import nftables
from kernel.errors import KernelError
from kernel.nftables_rules import Chain, Hook, NftChange, NftSet, NftTable, table_change

SERVICES = NftSet("type ipv4_addr : verdict", map=True)
REFUSED = NftSet("type ipv4_addr")
DNS_HOOK = Hook("filter", "output", -300)

# One table holding every form of rule and element meshctl writes (the LB and the DNS tables).
TABLE = NftTable(
    chains={
        "prerouting": Chain(("ip daddr vmap @services",), Hook("nat", "prerouting", -100)),
        "postrouting": Chain(("ct status dnat masquerade",), Hook("nat", "postrouting", 100)),
        "input": Chain(
            (
                "ip daddr @no-endpoints reject with tcp reset",
                "ip daddr @no-endpoints reject with icmp port-unreachable",
            ),
            Hook("filter", "input", 0),
        ),
        "service-a": Chain(
            ("numgen inc mod 2 vmap { 0 : goto endpoint-a1, 1 : goto endpoint-a2 }",)
        ),
        "service-b": Chain(("goto endpoint-b1",)),
        "endpoint-a1": Chain(("dnat to 10.0.0.11",)),
        "endpoint-a2": Chain(("dnat to 10.0.0.12",)),
        "endpoint-b1": Chain(("dnat to 10.0.0.13",)),
        "dns": Chain(
            (
                "ip daddr 127.0.0.11 udp dport 53 notrack udp dport set 40001",
                "ip daddr 127.0.0.11 tcp dport 53 notrack tcp dport set 40002",
                "ip saddr 127.0.0.11 udp sport 40001 notrack udp sport set 53",
                "ip saddr 127.0.0.11 tcp sport 40002 notrack tcp sport set 53",
            ),
            DNS_HOOK,
        ),
    },
    sets={
        "services": NftSet(
            SERVICES.declare,
            True,
            {"10.0.1.100": "goto service-a", "10.0.1.101": "goto service-b"},
        ),
        "no-endpoints": NftSet(REFUSED.declare, False, {"10.0.1.102": ""}),
    },
)


# The conformance kernel fixture's real case alone, for what only a real kernel can show.
real_only = pytest.mark.parametrize(
    "kernel", [pytest.param("real", marks=pytest.mark.root)], indirect=True
)


def api(kernel: Any) -> Any:
    return kernel.nftables


def same(a: NftTable, b: NftTable) -> bool:
    """Equal as planners compare them: nothing to change from one to the other."""
    return table_change(a, b).empty and table_change(b, a).empty


def add_foreign(kernel: Any, ns: str) -> str:
    """Another tool's table in ns; returns what must stay unchanged."""
    text = (
        "table ip other {\n\tchain c {\n\t\ttype filter hook input priority 0; policy accept;"
        "\n\t\tip saddr 10.9.9.9 drop\n\t}\n}"
    )
    if kernel.is_fake:
        kernel.nftables.add_foreign(ns, "other", text)
        return text
    subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=text, text=True, check=True)
    return foreign(kernel, ns)


def foreign(kernel: Any, ns: str) -> str:
    if kernel.is_fake:
        return str(kernel.nftables.tables(ns)["other"])
    done = subprocess.run(["ip", "netns", "exec", ns, "nft", "list", "table", "ip", "other"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return done.stdout


def test_what_a_transaction_writes_reads_back_equal(kernel: Any) -> None:
    nft, ns = api(kernel), kernel.new_ns("nft")
    assert nft.list_table(ns) == NftTable()

    nft.apply(ns, table_change(TABLE, NftTable()))

    held = nft.list_table(ns)
    assert held.chains == TABLE.chains
    assert {n: (s.map, dict(s.elements)) for n, s in held.sets.items()} == {
        n: (s.map, dict(s.elements)) for n, s in TABLE.sets.items()
    }
    assert table_change(TABLE, held).empty


def test_a_chain_declared_new_that_exists_keeps_its_rules_first(kernel: Any) -> None:
    """`new` skips the flush: a planner sets it only for chains the table does not hold."""
    nft, ns = api(kernel), kernel.new_ns("nft")
    nft.apply(ns, NftChange(replace={"a": Chain(("counter",))}))
    nft.apply(ns, NftChange(replace={"a": Chain(("accept",))}, new=frozenset({"a"})))
    assert nft.list_table(ns).chains["a"] == Chain(("counter", "accept"))
    nft.apply(ns, NftChange(replace={"a": Chain(("accept",))}))
    assert nft.list_table(ns).chains["a"] == Chain(("accept",))


def test_a_partial_change_rewrites_only_what_it_names(kernel: Any) -> None:
    nft, ns = api(kernel), kernel.new_ns("nft")
    nft.apply(ns, table_change(TABLE, NftTable()))
    chains = dict(TABLE.chains)
    chains["service-b"] = Chain(
        ("numgen inc mod 2 vmap { 0 : goto endpoint-b1, 1 : goto endpoint-b2 }",)
    )
    chains["endpoint-b2"] = Chain(("dnat to 10.0.0.14",))
    del chains["service-a"], chains["endpoint-a1"], chains["endpoint-a2"]
    services = {"10.0.1.101": "goto service-b", "10.0.1.103": "goto service-b"}
    desired = NftTable(
        chains,
        {**TABLE.sets, "services": NftSet(SERVICES.declare, True, services)},
    )

    change = table_change(desired, nft.list_table(ns))

    assert set(change.replace) == {"service-b", "endpoint-b2"}
    assert set(change.delete) == {"service-a", "endpoint-a1", "endpoint-a2"}
    assert change.delete_elements == {"services": ("10.0.1.100",)}
    assert change.add_elements == {"services": {"10.0.1.103": "goto service-b"}}
    nft.apply(ns, change)
    assert same(nft.list_table(ns), desired)


def test_a_refused_transaction_changes_nothing(kernel: Any) -> None:
    nft, ns = api(kernel), kernel.new_ns("nft")
    nft.apply(ns, table_change(TABLE, NftTable()))
    before = nft.list_table(ns)
    broken = NftChange(
        replace={
            "service-c": Chain(("goto endpoint-nowhere",)),
            "endpoint-c1": Chain(("dnat to 10.0.0.20",)),
        },
        add_elements={"services": {"10.0.1.110": "goto service-c"}},
    )

    with pytest.raises(KernelError):
        nft.apply(ns, broken)

    assert nft.list_table(ns) == before


def test_a_refused_first_transaction_leaves_no_table(kernel: Any) -> None:
    nft, ns = api(kernel), kernel.new_ns("nft")
    with pytest.raises(KernelError):
        nft.apply(ns, NftChange(replace={"a": Chain(("goto nowhere",))}))
    assert nft.list_table(ns) == NftTable()
    if not kernel.is_fake:
        assert not nftables._has_table(ns)


@pytest.mark.parametrize(
    "change",
    [
        NftChange(replace={"a": Chain(("accept; delete table ip other",))}),
        NftChange(replace={"a b": Chain(())}),
        NftChange(add_elements={"services": {"10.0.0.1": "goto a\nflush ruleset"}}),
    ],
    ids=["rule", "name", "element"],
)
def test_a_change_that_could_leave_the_table_is_refused_before_nft_runs(
    kernel: Any, change: NftChange
) -> None:
    nft, ns = api(kernel), kernel.new_ns("nft")
    kept = add_foreign(kernel, ns)
    with pytest.raises(ValueError):
        nft.apply(ns, change)
    assert foreign(kernel, ns) == kept
    assert nft.list_table(ns) == NftTable()


def test_other_tables_are_never_touched(kernel: Any) -> None:
    nft, ns = api(kernel), kernel.new_ns("nft")
    kept = add_foreign(kernel, ns)

    nft.apply(ns, table_change(TABLE, NftTable()))
    nft.apply(ns, table_change(NftTable(), nft.list_table(ns)))
    nft.delete_table(ns)
    nft.delete_table(ns)  # none left: nothing to do

    assert foreign(kernel, ns) == kept
    assert nft.list_table(ns) == NftTable()


@real_only  # another tool's edit of meshctl's table is a real-kernel case
def test_a_rule_added_by_hand_reads_as_drift_and_is_rewritten(kernel: Any) -> None:
    nft, ns = api(kernel), kernel.new_ns("nft")
    nft.apply(ns, table_change(TABLE, NftTable()))
    subprocess.run(["ip", "netns", "exec", ns, "nft", "insert", "rule", "ip", "meshctl",
                    "endpoint-b1", "meta", "mark", "set", "7"], check=True)  # fmt: skip

    change = table_change(TABLE, nft.list_table(ns))

    assert set(change.replace) == {"endpoint-b1"}
    nft.apply(ns, change)
    assert table_change(TABLE, nft.list_table(ns)).empty


@real_only
def test_missing_nft_says_which_package_to_install(
    kernel: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    nft, ns = api(kernel), kernel.new_ns("nft")
    monkeypatch.setattr(nftables, "NFT", "nft-not-installed")
    reason = nft.available(ns)
    assert reason is not None and "install Debian's nftables package" in reason
    assert "\n" not in reason
