"""The connection point's traffic accounting: Prometheus metrics and the periodic
``ProxyTrafficStateDetails`` report in SMS_Cloud_ProxyConnector.log, per endpoint.

The real connection point reports, per endpoint, every 5 minutes: TotalRequests,
TotalRequestsWithBearerToken, FailedRequests, MaxConcurrentRequests. The report counts
since the previous report; the metrics count since start.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from cmg.exchange_metrics import ExchangeCounts, ExchangeMetrics

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


@dataclass
class _Window:
    total: int = 0
    bearer: int = 0
    failed: int = 0
    concurrent: int = 0
    max_concurrent: int = 0


class ConnectorTraffic:
    def __init__(self, name: str) -> None:
        self.name = name
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ["connection_point", "role", "endpoint"]
        # Per endpoint, kept as plain numbers until scraped (cmg.exchange_metrics).
        self.exchanges = ExchangeMetrics({
            "requests": ("cmg_connector_requests_total", "Requests forwarded to the site, per endpoint"),
            "failed": ("cmg_connector_failed_requests_total",
                       "Requests the site failed (5xx, no answer, timeout), per endpoint"),
            "request_bytes": ("cmg_connector_request_bytes_total", "Request body bytes sent to the site"),
            "response_bytes": ("cmg_connector_response_bytes_total", "Response body bytes from the site"),
            "duration": ("cmg_connector_request_duration_seconds", "Time to forward a request and its answer"),
        }, labels, LATENCY_BUCKETS)
        self.registry.register(self.exchanges)
        self.reconnects = Counter("cmg_connector_tunnel_connects_total", "Tunnels opened to each instance",
                                  ["connection_point", "instance"], registry=self.registry)
        self.in_flight = 0
        self._window: dict[str, _Window] = {}
        self._children: dict[tuple[int, str], ExchangeCounts] = {}

    def _labels(self, role_id: int, endpoint: str) -> ExchangeCounts:
        key = (role_id, endpoint)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = self.exchanges.labels(self.name, str(role_id), endpoint.lower())
        return found

    def begin(self, endpoint: str, bearer: bool) -> None:
        w = self._window.get(endpoint)
        if w is None:
            w = self._window[endpoint] = _Window()
        w.total += 1
        if bearer:
            w.bearer += 1
        w.concurrent += 1
        w.max_concurrent = max(w.max_concurrent, w.concurrent)
        self.in_flight += 1

    def end(self, role_id: int, endpoint: str, ok: bool, request_bytes: int, response_bytes: int,
            seconds: float) -> None:
        self.in_flight -= 1
        w = self._window.get(endpoint)
        if w is not None:
            w.concurrent -= 1
            if not ok:
                w.failed += 1
        self._labels(role_id, endpoint).add(ok, request_bytes, response_bytes, seconds)

    def report(self, log: logging.Logger) -> None:
        """One ProxyTrafficStateDetails line per endpoint with traffic since the last report."""
        window, self._window = self._window, {}
        for endpoint, w in sorted(window.items()):
            log.info("ProxyTrafficStateDetails: EndpointName: %s TotalRequests: %d TotalRequestsWithBearerToken: %d "
                     "FailedRequests: %d MaxConcurrentRequests: %d",
                     endpoint, w.total, w.bearer, w.failed, w.max_concurrent)
            if w.concurrent:  # still in flight: they count in the next window too
                self._window[endpoint] = _Window(concurrent=w.concurrent, max_concurrent=w.concurrent)

    def watch(self, tunnels: Callable[[], Iterable[tuple[int, float | None]]]) -> None:
        """Live gauges: ``tunnels()`` yields (instance, rtt seconds or None) per connected tunnel."""
        self.registry.register(_Live(self, tunnels))


class _Live(Collector):
    def __init__(self, traffic: ConnectorTraffic, tunnels: Callable[[], Iterable[tuple[int, float | None]]]) -> None:
        self._t = traffic
        self._tunnels = tunnels

    def collect(self) -> Iterable[Metric]:
        name = self._t.name
        up = GaugeMetricFamily("cmg_connector_tunnels", "Connected tunnels per instance",
                               labels=["connection_point", "instance"])
        rtt = GaugeMetricFamily("cmg_connector_tunnel_rtt_seconds", "Last measured tunnel round-trip time",
                                labels=["connection_point", "instance"])
        for instance, seconds in self._tunnels():
            up.add_metric([name, str(instance)], 1)
            if seconds is not None:
                rtt.add_metric([name, str(instance)], seconds)
        flight = GaugeMetricFamily("cmg_connector_streams_in_flight", "Requests being forwarded",
                                   labels=["connection_point"])
        flight.add_metric([name], self._t.in_flight)
        yield up
        yield rtt
        yield flight
