"""A stateful in-memory kernel implementing the same protocols as the real one.

The conformance suite (tests/conformance) runs against both, so the fake cannot drift from the
truth. Controllers and planners are unit-tested against it without root.
"""
