"""When demoting a manager would harm the store (meshctl.commands.cluster_roles): pure rules."""

from __future__ import annotations

from meshctl.commands.cluster_roles import demotion_refusal


def test_the_last_manager_is_never_demoted() -> None:
    refusal = demotion_refusal("node1", ["node1"], {"node1"})
    assert refusal is not None and "node node1 is the last manager" in refusal
    assert demotion_refusal("node1", [], set()) is not None  # its member already gone


def test_the_managers_left_must_make_a_quorum() -> None:
    three = ["node1", "node2", "node3"]
    assert demotion_refusal("node3", three, set(three)) is None
    # node1 lost: node3 leaving would leave node2 alone of two.
    refusal = demotion_refusal("node3", three, {"node2", "node3"})
    assert refusal is not None and "2 managers of which 1 answer" in refusal
    assert "\n" not in refusal
    # Demoting the lost one instead leaves two that answer.
    assert demotion_refusal("node1", three, {"node2", "node3"}) is None
    five = [f"node{i}" for i in range(1, 6)]
    assert demotion_refusal("node5", five, {"node3", "node4", "node5"}) is not None
    assert demotion_refusal("node5", five, {"node2", "node3", "node4", "node5"}) is None
