"""Prometheus metrics of one gateway instance (prometheus-client).

Per endpoint (role id + published endpoint, a bounded set): requests, bytes each way,
latency histogram (kept as plain numbers until scraped: :mod:`cmg.exchange_metrics`).
Errors by the CMG's error string. Scraped at collection time from the live state:
streams in flight, tunnels per connection point, tunnel RTT, active streams per tunnel.
Label sets stay bounded whatever clients send: a path that is not a
published endpoint counts as endpoint "-".
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from cmg.exchange_metrics import ExchangeCounts, ExchangeMetrics
from cmg.paths import parse_client_path

if TYPE_CHECKING:
    from .proxy import ClientRequestHandler
    from .routing import Routes

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class GatewayMetrics:
    def __init__(self, instance: int) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ["instance", "role", "endpoint"]
        self.instance = str(instance)
        self.exchanges = ExchangeMetrics({
            "requests": ("cmg_gateway_requests_total", "Requests forwarded or failed, per endpoint"),
            "request_bytes": ("cmg_gateway_request_bytes_total", "Request body bytes sent to the site"),
            "response_bytes": ("cmg_gateway_response_bytes_total", "Response body bytes sent to clients"),
            "duration": ("cmg_gateway_request_duration_seconds", "Time from request to the end of the response"),
        }, labels, LATENCY_BUCKETS)
        self.registry.register(self.exchanges)
        self.errors = Counter("cmg_gateway_errors_total", "Answers with a CMG error, by error string",
                              ["instance", "error"], registry=self.registry)
        self.tunnel_connects = Counter("cmg_gateway_tunnel_connects_total",
                                       "Tunnels accepted from each connection point (reconnects included)",
                                       ["instance", "connection_point"], registry=self.registry)
        self._children: dict[str, ExchangeCounts] = {}

    def _endpoint(self, path: str) -> ExchangeCounts:
        key = path.partition("?")[0]
        found = self._children.get(key)
        if found is not None:
            return found
        cp = parse_client_path(key)
        role, endpoint = ("-", "-") if cp is None or cp.role_id is None else (str(cp.role_id), cp.resource.lower())
        found = self.exchanges.labels(self.instance, role, endpoint)
        if len(self._children) < 4096:  # paths with GUIDs would grow this: cache only so many
            self._children[key] = found
        return found

    def observe(self, path: str, request_bytes: int, response_bytes: int | None, seconds: float) -> None:
        self._endpoint(path).add(True, request_bytes, response_bytes or 0, seconds)

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
