"""Metrics, /healthz and /readyz without root: the documented names, the plain counters behind
them, the liveness rules, the kernel call counting, and the endpoints over real HTTP."""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from kernel.errors import NotFound
from kernel.system import fake_kernel
from meshctl.controller.counted import counted
from meshctl.controller.endpoints import Endpoints, parse_address
from meshctl.controller.liveness import Liveness
from meshctl.controller.metrics import Metrics, Sources
from meshctl.dns.forwarder import Forwarder
from meshctl.dns.server import DnsStats
from meshctl.dns.wire import query_type, rcode_name
from meshctl.model import ValidationError
from meshctl.stats import Histogram
from tests.conftest import scaled

DOC = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"


def exposed(metrics: Metrics) -> dict[str, str]:
    """Family name → type, from the # TYPE lines of a scrape."""
    text = metrics.exposition().decode()
    return dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))


def documented() -> dict[str, str]:
    """Name → type from the table in docs/metrics.md."""
    return dict(re.findall(r"^\| `(meshctl_[a-z_]+)` \| (\w+) \|", DOC.read_text(), re.M))


def test_every_exposed_metric_is_documented_and_every_documented_one_exposed() -> None:
    assert exposed(Metrics()) == documented()
    assert len(documented()) >= 15


def test_names_follow_prometheus_conventions() -> None:
    for name, kind in exposed(Metrics()).items():
        assert name.startswith("meshctl_"), name
        assert name.endswith("_total") == (kind == "counter"), name
        if kind == "histogram":
            assert name.endswith("_seconds"), name


def wire_query(qtype: int) -> bytes:
    return (
        b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x03web\x00"
        + qtype.to_bytes(2, "big")
        + b"\x00\x01"
    )  # noqa: E501


def test_dns_counts_come_out_by_type_rcode_and_upstream() -> None:
    stats = DnsStats()
    forwarder = Forwarder(["10.0.0.53"])
    query = wire_query(28)
    assert query_type(query) == "AAAA"
    assert query_type(wire_query(99)) == "other"
    assert query_type(b"\x00" * 5) == "other"
    reply = b"\x12\x34\x81\x83" + bytes(8)
    assert rcode_name(reply) == "NXDOMAIN"
    stats.requests.inc("udp", "AAAA")
    stats.answered(reply, "local", "AAAA", 0.0)
    forwarder.sent.inc("10.0.0.53:53")
    forwarder.failures.inc("10.0.0.53:53", "timeout")
    text = Metrics(Sources(dns=stats, forwarder=forwarder)).exposition().decode()
    assert 'meshctl_dns_requests_total{proto="udp",type="AAAA"} 1.0' in text
    assert 'meshctl_dns_responses_total{rcode="NXDOMAIN",source="local"} 1.0' in text
    assert 'meshctl_dns_request_duration_seconds_count{type="AAAA"} 1.0' in text
    assert 'meshctl_dns_upstream_failures_total{reason="timeout",to="10.0.0.53:53"} 1.0' in text


def test_a_plain_histogram_counts_at_or_below_each_bound() -> None:
    histogram = Histogram((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 3.0):
        histogram.observe(value)
    assert histogram.cumulative() == [("0.1", 2), ("1.0", 3), ("+Inf", 4)]
    assert histogram.count == 4 and histogram.sum == pytest.approx(3.65)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_healthz_fails_while_a_change_waits_longer_than_the_bound() -> None:
    clock = Clock()
    live = Liveness(20.0, clock)
    assert live.health() == (True, "")
    live.changed()
    clock.now += 19
    assert live.health()[0]
    clock.now += 2
    healthy, why = live.health()
    assert not healthy and why == "a store change has waited 21.0s for a pass (bound 20s)"
    covered = live.begin()
    clock.now += 0.5
    assert live.end(covered, "") == [pytest.approx(21.5)]
    assert live.health() == (True, "")


def test_healthz_fails_while_the_last_pass_failed_and_readyz_waits_for_a_converged_one() -> None:
    clock = Clock()
    live = Liveness(20.0, clock)
    assert live.ready() == (False, "the first pass has not converged yet")
    live.end(live.begin(), "network front fails on this node: no address")
    assert live.health() == (False, "network front fails on this node: no address")
    assert not live.ready()[0] and "no address" in live.ready()[1]
    live.begin()
    live.failed("iptables-legacy-restore: exit 1")
    assert live.health() == (False, "the last pass failed: iptables-legacy-restore: exit 1")
    live.end(live.begin(), "")
    assert live.health() == (True, "") and live.ready() == (True, "")
    live.begin()
    clock.now += 25
    assert live.health() == (False, "a pass has been running for 25.0s (bound 20s)")
    assert live.ready() == (True, "")  # ready once: a later problem is for /healthz


def test_a_change_that_arrives_during_a_pass_waits_for_the_next() -> None:
    clock = Clock()
    live = Liveness(20.0, clock)
    live.changed()
    covered = live.begin()
    live.changed()
    assert len(live.end(covered, "")) == 1
    clock.now += 21
    assert not live.health()[0]


def test_kernel_calls_are_counted_by_subsystem_op_and_result() -> None:
    calls: list[tuple[str, str, str]] = []
    kernel = counted(fake_kernel(ipvs=False), lambda *call: calls.append(call))
    kernel.netns.create("ns1")
    assert kernel.netns.exists("ns1")
    with pytest.raises(NotFound):
        kernel.links.set_up("ns1", "missing0")
    assert calls == [
        ("netns", "write", "ok"),
        ("netns", "read", "ok"),
        ("links", "write", "not_found"),
    ]


def test_metrics_addresses_are_checked() -> None:
    assert parse_address("127.0.0.1:9323") == ("127.0.0.1", 9323)
    assert parse_address("[::1]:9323") == ("::1", 9323)
    assert parse_address(":9323") == ("", 9323)
    for bad in ("localhost:9323", "127.0.0.1", "127.0.0.1:99999", "[::1]", "1.2.3.4:x"):
        with pytest.raises(ValidationError, match="invalid --metrics-addr"):
            parse_address(bad)


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=scaled(5)) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_the_endpoints_answer_over_http() -> None:
    live = Liveness(20.0)
    metrics = Metrics(Sources(liveness=live))
    endpoints = Endpoints("127.0.0.1:0", metrics, live)
    endpoints.start()
    try:
        base = f"http://127.0.0.1:{endpoints.port}"
        assert get(f"{base}/healthz") == (200, "ok\n")
        assert get(f"{base}/readyz") == (503, "the first pass has not converged yet\n")
        live.end(live.begin(), "network front fails on this node: no address")
        assert get(f"{base}/healthz") == (503, "network front fails on this node: no address\n")
        code, text = get(f"{base}/metrics")
        assert code == 200 and "meshctl_controller_healthy 0.0" in text
        assert get(f"{base}/nothing")[0] == 404
        taken = Endpoints(f"127.0.0.1:{endpoints.port}", metrics, live)
        with pytest.raises(Exception, match="cannot serve metrics on 127.0.0.1:.*--metrics-addr"):
            taken.start()
    finally:
        endpoints.stop()


def test_the_dashboard_queries_only_documented_metrics() -> None:
    import json

    dashboard = json.loads((DOC.parent / "grafana-dashboard.json").read_text())
    names = set(documented())
    used = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            for name in re.findall(r"meshctl_[a-z_]+", target["expr"]):
                base = re.sub(r"_(bucket|sum|count)$", "", name)
                assert name in names or base in names, (panel["title"], name)
                used.add(base if base in names else name)
    assert len(used) >= 12
