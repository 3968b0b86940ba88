"""Plain counters for hot paths and for parts that must not depend on the metrics library.

The DNS server counts every query and the informer every re-list here, with nothing more than
an integer add or a bisect per observation; meshctl.controller.metrics turns them into Prometheus
families when /metrics is scraped. Writers are one thread each; a scrape copies what it reads
(a dict copy is atomic under the GIL), so a count is at worst one observation behind.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence

# CoreDNS's request-duration buckets: 0.25 ms doubling to about 8 s.
DNS_BUCKETS: tuple[float, ...] = tuple(0.00025 * 2**i for i in range(16))


class Histogram:
    """Counts of observations at or below each bound (Prometheus' `le`), their sum and count."""

    __slots__ = ("bounds", "counts", "count", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one: above every bound
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, int]]:
        """(le, observations at or below it) for every bound and +Inf, as exposition wants."""
        out, total = [], 0
        for bound, count in zip((*self.bounds, float("inf")), list(self.counts), strict=True):
            total += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), total))
        return out


class Counts:
    """Counts by a label tuple (DNS type and protocol, an upstream and why it failed...)."""

    __slots__ = ("by",)

    def __init__(self) -> None:
        self.by: dict[tuple[str, ...], int] = {}

    def inc(self, *labels: str) -> None:
        self.by[labels] = self.by.get(labels, 0) + 1

    def items(self) -> list[tuple[tuple[str, ...], int]]:
        return list(dict(self.by).items())
