"""Namespaces against the fake and the real kernel: create, list, delete, all idempotent."""

from __future__ import annotations

import pytest

from kernel.errors import NotFound
from tests.conformance.conftest import KernelUnderTest


def test_create_list_delete(kernel: KernelUnderTest) -> None:
    ns = kernel.new_ns("life")
    assert kernel.netns.exists(ns)
    assert ns in kernel.netns.list_namespaces()
    assert kernel.netns.list_namespaces(prefix=ns) == [ns]
    kernel.netns.delete(ns)
    assert not kernel.netns.exists(ns)
    assert ns not in kernel.netns.list_namespaces()


def test_create_and_delete_twice_are_no_ops(kernel: KernelUnderTest) -> None:
    ns = kernel.new_ns("twice")
    kernel.links.ensure_bridge(ns, "meshbr0")
    kernel.netns.create(ns)  # exists: must keep what is inside
    assert kernel.links.get_link(ns, "meshbr0") is not None
    kernel.netns.delete(ns)
    kernel.netns.delete(ns)
    assert not kernel.netns.exists(ns)


def test_a_recreated_namespace_starts_empty(kernel: KernelUnderTest) -> None:
    ns = kernel.new_ns("again")
    kernel.links.ensure_bridge(ns, "meshbr0")
    kernel.netns.delete(ns)
    kernel.netns.create(ns)
    try:
        assert [link.name for link in kernel.links.list_links(ns)] == ["lo"]
    finally:
        kernel.netns.delete(ns)


def test_verbs_in_a_missing_namespace_raise_not_found_and_create_nothing(
    kernel: KernelUnderTest,
) -> None:
    ns = kernel.new_ns("gone")
    kernel.netns.delete(ns)
    with pytest.raises(NotFound, match=f"network namespace {ns} does not exist"):
        kernel.links.get_link(ns, "lo")
    with pytest.raises(NotFound):
        kernel.sysctl.get(ns, "net.ipv4.ip_forward")
    assert not kernel.netns.exists(ns)
