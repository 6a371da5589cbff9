"""Per-request Prometheus metrics kept as plain numbers and exposed when scraped.

The gateway and the connection point count every exchange per endpoint: requests (and,
at the connection point, failures), body bytes each way, and a latency histogram.
prometheus-client's ``Counter`` and ``Histogram`` take a lock and several calls per
update: 2.6 us per request in the gateway and 3.2 in the connection point
(docs/performance.md, "Ninth round"). Both processes update their metrics from one thread, the event loop's,
so here one exchange is one call that adds to plain attributes, and a ``Collector``
turns the totals into the same families when ``/metrics`` is scraped. The families are
prometheus-client's own (``CounterMetricFamily``, ``HistogramMetricFamily``), so the
exposition is the library's: the same names, labels, samples and ``_created`` times as
``Counter`` and ``Histogram`` give (``tests/test_exchange_metrics.py`` compares them).
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterable, Sequence

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

__all__ = ["ExchangeCounts", "ExchangeMetrics"]

_INF = float("inf")


class ExchangeCounts:
    """The totals of one label set (one endpoint)."""

    __slots__ = ("labels", "requests", "failed", "request_bytes", "response_bytes", "seconds", "buckets",
                 "created", "_bounds")

    def __init__(self, labels: tuple[str, ...], bounds: tuple[float, ...]) -> None:
        self.labels = labels
        self.requests = 0
        self.failed = 0
        self.request_bytes = 0
        self.response_bytes = 0
        self.seconds = 0.0
        self._bounds = bounds
        self.buckets = [0] * len(bounds)  # per bucket, not cumulative; the last is +Inf
        self.created = time.time()

    def add(self, ok: bool, request_bytes: int, response_bytes: int, seconds: float) -> None:
        """One finished exchange."""
        self.requests += 1
        if not ok:
            self.failed += 1
        self.request_bytes += request_bytes
        self.response_bytes += response_bytes
        self.seconds += seconds
        # The first bucket whose upper bound is >= seconds, as Histogram.observe picks it.
        self.buckets[bisect_left(self._bounds, seconds)] += 1


class ExchangeMetrics(Collector):
    """The per-endpoint families of one process, registered in its registry.

    ``names`` maps each family to (name, help): ``requests``, ``failed`` (optional),
    ``request_bytes``, ``response_bytes`` (counters, named without ``_total`` as
    ``Counter`` takes them) and ``duration`` (the histogram).
    """

    def __init__(self, names: dict[str, tuple[str, str]], labelnames: Sequence[str],
                 buckets: Sequence[float]) -> None:
        bounds = [float(b) for b in buckets]
        if bounds[-1] != _INF:
            bounds.append(_INF)
        self._bounds = tuple(bounds)
        self._names = names
        self._labelnames = list(labelnames)
        self._counts: dict[tuple[str, ...], ExchangeCounts] = {}

    def labels(self, *values: str) -> ExchangeCounts:
        """The totals for one label set (made on first use, as ``Counter.labels`` does)."""
        counts = self._counts.get(values)
        if counts is None:
            if len(values) != len(self._labelnames):
                raise ValueError(f"expected {len(self._labelnames)} label values, got {len(values)}")
            counts = self._counts[values] = ExchangeCounts(values, self._bounds)
        return counts

    def collect(self) -> Iterable[Metric]:
        labelnames = self._labelnames
        counters = {
            key: CounterMetricFamily(name, doc, labels=labelnames)
            for key, (name, doc) in self._names.items() if key != "duration"
        }
        name, doc = self._names["duration"]
        duration = HistogramMetricFamily(name, doc, labels=labelnames)
        les = [floatToGoString(b) for b in self._bounds]  # type: ignore[no-untyped-call]
        for counts in list(self._counts.values()):
            values = list(counts.labels)
            created = counts.created
            for key, family in counters.items():
                family.add_metric(values, getattr(counts, key), created=created)
            running = 0
            cumulative = []
            for le, n in zip(les, counts.buckets):
                running += n
                cumulative.append((le, running))
            duration.add_metric(values, cumulative, counts.seconds)
            duration.samples.append(Sample(name + "_created", dict(zip(labelnames, values)), created))
        yield from counters.values()
        yield duration
