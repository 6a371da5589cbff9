"""Prometheus metrics of one gateway instance (prometheus-client).

Per endpoint (role id + published endpoint, a bounded set): requests, bytes each way,
latency histogram. Errors by the CMG's error string. Scraped at collection time from
the live state: streams in flight, tunnels per connection point, tunnel RTT, active
streams per tunnel. Label sets stay bounded whatever clients send: a path that is not a
published endpoint counts as endpoint "-".
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from typing import TYPE_CHECKING, Iterable

from prometheus_client import CollectorRegistry, Counter
from prometheus_client import metrics as prometheus_metrics
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from cmg.paths import parse_client_path

if TYPE_CHECKING:
    from .proxy import ClientRequestHandler
    from .routing import Routes

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


_BOUNDS = (*LATENCY_BUCKETS, math.inf)
_LE = tuple(floatToGoString(bound) for bound in _BOUNDS)
# The per-endpoint families: (name, help, kind); the three counters, then the histogram.
_REQUESTS = ("cmg_gateway_requests", "Requests forwarded or failed, per endpoint")
_REQUEST_BYTES = ("cmg_gateway_request_bytes", "Request body bytes sent to the site")
_RESPONSE_BYTES = ("cmg_gateway_response_bytes", "Response body bytes sent to clients")
_LATENCY = ("cmg_gateway_request_duration_seconds", "Time from request to the end of the response")


class _EndpointTraffic:
    """One endpoint's counts, plain numbers: what prometheus_client's labelled Counter and
    Histogram children would hold, without their locks and checks on every request."""

    __slots__ = ("labels", "created", "requests", "request_bytes", "response_bytes", "buckets", "seconds")

    def __init__(self, labels: dict[str, str]) -> None:
        self.labels = labels
        self.created = time.time()
        self.requests = 0
        self.request_bytes = 0
        self.response_bytes = 0
        self.buckets = [0] * len(_BOUNDS)
        self.seconds = 0.0


class _EndpointFamilies(Collector):
    """Exposes the per-endpoint traffic exactly as prometheus_client's Counter and
    Histogram would (``_total``, ``_bucket``, ``_count``, ``_sum``, ``_created``)."""

    def __init__(self, traffic: dict[tuple[str, str, str], _EndpointTraffic]) -> None:
        self._traffic = traffic

    def describe(self) -> Iterable[Metric]:
        return [Metric(name, doc, "counter") for name, doc in (_REQUESTS, _REQUEST_BYTES, _RESPONSE_BYTES)] + [
            Metric(*_LATENCY, "histogram")]

    def collect(self) -> Iterable[Metric]:
        created = getattr(prometheus_metrics, "_use_created", True)
        endpoints = list(self._traffic.values())
        for (name, doc), field in ((_REQUESTS, "requests"), (_REQUEST_BYTES, "request_bytes"),
                                   (_RESPONSE_BYTES, "response_bytes")):
            metric = Metric(name, doc, "counter")
            for t in endpoints:
                metric.add_sample(name + "_total", t.labels, float(getattr(t, field)))
                if created:
                    metric.add_sample(name + "_created", t.labels, t.created)
            yield metric
        name = _LATENCY[0]
        metric = Metric(*_LATENCY, "histogram")
        for t in endpoints:
            total = 0.0
            for le, count in zip(_LE, t.buckets):
                total += count
                metric.add_sample(name + "_bucket", {**t.labels, "le": le}, total)
            metric.add_sample(name + "_count", t.labels, total)
            metric.add_sample(name + "_sum", t.labels, t.seconds)
            if created:
                metric.add_sample(name + "_created", t.labels, t.created)
        yield metric


class GatewayMetrics:
    def __init__(self, instance: int) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.instance = str(instance)
        self._traffic: dict[tuple[str, str, str], _EndpointTraffic] = {}
        self.registry.register(_EndpointFamilies(self._traffic))
        self.errors = Counter("cmg_gateway_errors_total", "Answers with a CMG error, by error string",
                              ["instance", "error"], registry=self.registry)
        self.tunnel_connects = Counter("cmg_gateway_tunnel_connects_total",
                                       "Tunnels accepted from each connection point (reconnects included)",
                                       ["instance", "connection_point"], registry=self.registry)
        self._children: dict[str, _EndpointTraffic] = {}

    def _endpoint(self, path: str) -> _EndpointTraffic:
        key = path.partition("?")[0]
        found = self._children.get(key)
        if found is not None:
            return found
        cp = parse_client_path(key)
        role, endpoint = ("-", "-") if cp is None or cp.role_id is None else (str(cp.role_id), cp.resource.lower())
        labels = (self.instance, role, endpoint)
        found = self._traffic.get(labels)
        if found is None:
            found = self._traffic[labels] = _EndpointTraffic({"instance": self.instance, "role": role,
                                                              "endpoint": endpoint})
        if len(self._children) < 4096:  # paths with GUIDs would grow this: cache only so many
            self._children[key] = found
        return found

    def observe(self, path: str, request_bytes: int, response_bytes: int | None, seconds: float) -> None:
        t = self._endpoint(path)
        t.requests += 1
        if request_bytes:
            t.request_bytes += request_bytes
        if response_bytes:
            t.response_bytes += response_bytes
        t.buckets[bisect_left(_BOUNDS, seconds)] += 1
        t.seconds += seconds

    def error(self, name: str) -> None:
        self.errors.labels(self.instance, name).inc()

    def watch(self, routes: "Routes", handler: "ClientRequestHandler") -> None:
        self.registry.register(_LiveState(self.instance, routes, handler))


class _LiveState(Collector):
    def __init__(self, instance: str, routes: "Routes", handler: "ClientRequestHandler") -> None:
        self._instance = instance
        self._routes = routes
        self._handler = handler

    def collect(self) -> Iterable[Metric]:
        in_flight = GaugeMetricFamily("cmg_gateway_streams_in_flight", "Client requests in progress",
                                      labels=["instance"])
        in_flight.add_metric([self._instance], self._handler.in_flight)
        tunnels = GaugeMetricFamily("cmg_gateway_tunnels", "Connected tunnels per connection point",
                                    labels=["instance", "connection_point"])
        rtt = GaugeMetricFamily("cmg_gateway_tunnel_rtt_seconds", "Last measured tunnel round-trip time",
                                labels=["instance", "connection_point"])
        streams = GaugeMetricFamily("cmg_gateway_tunnel_streams", "Open streams per tunnel",
                                    labels=["instance", "connection_point"])
        counts: dict[str, int] = {}
        for link in self._routes.links:
            counts[link.name] = counts.get(link.name, 0) + 1
            if link.session.rtt is not None:
                rtt.add_metric([self._instance, link.name], link.session.rtt)
            streams.add_metric([self._instance, link.name], link.session.open_streams)
        for name, n in counts.items():
            tunnels.add_metric([self._instance, name], n)
        yield in_flight
        yield tunnels
        yield rtt
        yield streams
