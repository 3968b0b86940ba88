"""The controller's Prometheus metrics (docs/metrics.md lists every name; a unit test holds the
two together).

Metrics the controller measures itself (pass durations, kernel calls, programming latency,
health transitions) are prometheus_client objects; those counted on hot paths or in parts
that must not depend on this library (DNS, the informer, the supervisor) are plain counters
(meshctl.stats) that a collector reads at scrape time. Each controller has its own registry.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from meshctl.stats import Counts
from meshctl.stats import Histogram as PlainHistogram

if TYPE_CHECKING:
    from meshctl.controller.liveness import Liveness
    from meshctl.dns.forwarder import Forwarder
    from meshctl.dns.server import DnsStats
    from meshctl.store.informer import Informer

# No `_created` series beside every counter and histogram: they double the output for nothing
# a dashboard uses.
prometheus_client.disable_created_metrics()

PASS_KINDS = ("orchestrate", "dns", "router", "node", "lb", "tasks", "pass")
PASS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# From a change reaching the controller to the kernel holding it (kube-proxy's, made finer:
# here a change takes milliseconds, not seconds).
PROGRAMMING_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)


@dataclass
class Sources:
    """What the collector reads at scrape time; None (or the default) where there is none."""

    dns: DnsStats | None = None
    forwarder: Forwarder | None = None
    informer: Informer | None = None
    liveness: Liveness | None = None
    tasks: Callable[[], Mapping[str, int]] = field(default=lambda: {})
    restarts: Callable[[], int] = field(default=lambda: 0)
    leader: Callable[[], bool] = field(default=lambda: False)


class Metrics:
    """One controller's metrics and their registry."""

    def __init__(self, sources: Sources | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.reconcile = Histogram(
            "meshctl_reconcile_duration_seconds",
            "Time a reconcile pass and each of its parts took, by kind "
            "(orchestrate, dns, router, node, lb, tasks, pass) and result (success, error).",
            ["kind", "result"],
            buckets=PASS_BUCKETS,
            registry=r,
        )
        self.programming = Histogram(
            "meshctl_network_programming_duration_seconds",
            "Time from a store change reaching the controller to the pass that applied it to "
            "the kernel (kube-proxy's network_programming_duration_seconds).",
            buckets=PROGRAMMING_BUCKETS,
            registry=r,
        )
        self.kernel_operations = Counter(
            "meshctl_kernel_operations",
            "Calls into the kernel, by subsystem, op (read, write) and result "
            "(ok, not_found, error).",
            ["subsystem", "op", "result"],
            registry=r,
        )
        self.health_transitions = Counter(
            "meshctl_task_health_transitions",
            "Health changes of this node's tasks, by the state entered.",
            ["to"],
            registry=r,
        )
        self.sources = sources or Sources()  # may be set later: read at every scrape
        r.register(_Collector(self))

    def kernel_operation(self, subsystem: str, op: str, result: str) -> None:
        self.kernel_operations.labels(subsystem, op, result).inc()

    def exposition(self) -> bytes:
        """The text format Prometheus scrapes."""
        return generate_latest(self.registry)


def _counter(name: str, doc: str, labels: list[str], counts: Counts | None) -> Metric:
    family = CounterMetricFamily(name, doc, labels=labels)
    for values, count in counts.items() if counts is not None else []:
        family.add_metric(list(values), count)
    return family


def _histograms(name: str, doc: str, label: str, by: Mapping[str, PlainHistogram]) -> Metric:
    family = HistogramMetricFamily(name, doc, labels=[label])
    for value, histogram in dict(by).items():
        family.add_metric([value], histogram.cumulative(), histogram.sum)
    return family


class _Collector:
    """The families read from plain counters at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        yield from self._dns()
        yield from self._store()
        yield from self._controller()

    def _dns(self) -> Iterator[Metric]:
        s = self.metrics.sources
        dns = s.dns
        yield _counter(
            "meshctl_dns_requests",
            "DNS queries the embedded server received, by protocol and query type.",
            ["proto", "type"],
            dns.requests if dns else None,
        )
        yield _counter(
            "meshctl_dns_responses",
            "DNS replies sent, by rcode and source (local, forward, overload).",
            ["rcode", "source"],
            dns.responses if dns else None,
        )
        yield _histograms(
            "meshctl_dns_request_duration_seconds",
            "Time from a DNS query's arrival to its reply, by query type.",
            "type",
            dns.durations if dns else {},
        )
        forwarder = s.forwarder
        yield _counter(
            "meshctl_dns_upstream_requests",
            "Queries forwarded to each upstream resolver.",
            ["to"],
            forwarder.sent if forwarder else None,
        )
        yield _counter(
            "meshctl_dns_upstream_failures",
            "Forwarded queries an upstream did not answer usefully, by upstream and reason "
            "(timeout, error, malformed, SERVFAIL, REFUSED); the next upstream is tried.",
            ["to", "reason"],
            forwarder.failures if forwarder else None,
        )

    def _store(self) -> Iterator[Metric]:
        informer = self.metrics.sources.informer
        yield _counter(
            "meshctl_store_watch_relists",
            "Times the controller listed the store again: its watch fell behind the store's "
            "compaction, or the store was out of reach (reconnects).",
            ["reason"],
            informer.relists if informer else None,
        )
        lag = GaugeMetricFamily(
            "meshctl_store_watch_lag_seconds",
            "Seconds since the controller's copy of the store was last known to hold "
            "everything in it (grows while the store is out of reach).",
        )
        reachable = GaugeMetricFamily(
            "meshctl_store_reachable", "1 while the controller's watch reaches the store."
        )
        if informer is not None:
            lag.add_metric([], max(0.0, time.monotonic() - informer.current_at))
            reachable.add_metric([], 1.0 if informer.connected else 0.0)
        yield lag
        yield reachable

    def _controller(self) -> Iterator[Metric]:
        s = self.metrics.sources
        tasks = GaugeMetricFamily(
            "meshctl_tasks", "Tasks assigned to this node, by state.", labels=["state"]
        )
        for state, count in sorted(s.tasks().items()):
            tasks.add_metric([state], count)
        yield tasks
        restarts = CounterMetricFamily(
            "meshctl_task_restarts", "Task processes this controller started again."
        )
        restarts.add_metric([], s.restarts())
        yield restarts
        leader = GaugeMetricFamily(
            "meshctl_leader", "1 while this controller holds the leader key (places tasks)."
        )
        leader.add_metric([], 1.0 if s.leader() else 0.0)
        yield leader
        healthy = GaugeMetricFamily(
            "meshctl_controller_healthy", "1 while /healthz answers 200 (see docs/metrics.md)."
        )
        ready = GaugeMetricFamily("meshctl_controller_ready", "1 once /readyz answers 200.")
        last = GaugeMetricFamily(
            "meshctl_reconcile_last_success_timestamp_seconds",
            "Unix time of the last pass that converged (0: none yet).",
        )
        if s.liveness is not None:
            healthy.add_metric([], 1.0 if s.liveness.health()[0] else 0.0)
            ready.add_metric([], 1.0 if s.liveness.ready()[0] else 0.0)
            last.add_metric([], s.liveness.last_success)
        yield healthy
        yield ready
        yield last
