"""The gateway's per-endpoint metrics expose what prometheus_client's own Counter and
Histogram would for the same requests (they are counted in plain numbers instead)."""

import re

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from gateway.metrics import LATENCY_BUCKETS, GatewayMetrics

MP = "/CCM_Proxy_MutualAuth/72057594037927939/CCM_System/request"
REQUESTS = [
    (MP, 0, 1024, 0.003),
    (MP + "?x=1", 10, 1024, 0.03),
    ("/CCM_Proxy_MutualAuth/72057594037927939/ccm_system/other", 0, None, 0.001),  # same endpoint
    ("/CCM_Proxy_ServerAuth/72057594037927940/SMS_DP_SMSPKG$/abc", 5, 0, 400.0),
    ("/not/a/cmg/path", 0, None, 0.0025),
    (MP, 7, 99, 2.5),
]


def _reference(instance: str) -> bytes:
    """The same requests counted the way gateway/metrics.py used to: prometheus_client objects."""
    registry = CollectorRegistry(auto_describe=True)
    labels = ["instance", "role", "endpoint"]
    requests = Counter("cmg_gateway_requests_total", "Requests forwarded or failed, per endpoint", labels,
                       registry=registry)
    request_bytes = Counter("cmg_gateway_request_bytes_total", "Request body bytes sent to the site", labels,
                            registry=registry)
    response_bytes = Counter("cmg_gateway_response_bytes_total", "Response body bytes sent to clients", labels,
                             registry=registry)
    latency = Histogram("cmg_gateway_request_duration_seconds", "Time from request to the end of the response",
                        labels, buckets=LATENCY_BUCKETS, registry=registry)
    errors = Counter("cmg_gateway_errors_total", "Answers with a CMG error, by error string", ["instance", "error"],
                     registry=registry)
    Counter("cmg_gateway_tunnel_connects_total", "Tunnels accepted from each connection point (reconnects included)",
            ["instance", "connection_point"], registry=registry)
    endpoints = {MP: ("72057594037927939", "ccm_system"), MP + "?x=1": ("72057594037927939", "ccm_system"),
                 REQUESTS[2][0]: ("72057594037927939", "ccm_system"),
                 REQUESTS[3][0]: ("72057594037927940", "sms_dp_smspkg$"), "/not/a/cmg/path": ("-", "-")}
    for path, sent, received, seconds in REQUESTS:
        values = (instance, *endpoints[path])
        # The four children of an endpoint were made together, on its first request.
        children = [family.labels(*values) for family in (requests, request_bytes, response_bytes, latency)]
        children[0].inc()
        if sent:
            children[1].inc(sent)
        if received:
            children[2].inc(received)
        children[3].observe(seconds)
    errors.labels(instance, "CMGService_BadGateway").inc()
    return generate_latest(registry)


def _without_timestamps(text: bytes) -> str:
    return re.sub(r"(_created\{[^}]*\}) \S+", r"\1 T", text.decode())


def test_exposition_matches_prometheus_client_objects() -> None:
    metrics = GatewayMetrics(3)
    empty = _without_timestamps(generate_latest(metrics.registry))
    assert "cmg_gateway_requests_total counter" in empty
    for path, sent, received, seconds in REQUESTS:
        metrics.observe(path, sent, received, seconds)
    metrics.error("CMGService_BadGateway")
    assert _without_timestamps(generate_latest(metrics.registry)) == _without_timestamps(_reference("3"))


def test_empty_exposition_matches_prometheus_client_objects() -> None:
    registry = CollectorRegistry(auto_describe=True)
    labels = ["instance", "role", "endpoint"]
    Counter("cmg_gateway_requests_total", "Requests forwarded or failed, per endpoint", labels, registry=registry)
    Counter("cmg_gateway_request_bytes_total", "Request body bytes sent to the site", labels, registry=registry)
    Counter("cmg_gateway_response_bytes_total", "Response body bytes sent to clients", labels, registry=registry)
    Histogram("cmg_gateway_request_duration_seconds", "Time from request to the end of the response", labels,
              buckets=LATENCY_BUCKETS, registry=registry)
    Counter("cmg_gateway_errors_total", "Answers with a CMG error, by error string", ["instance", "error"],
            registry=registry)
    Counter("cmg_gateway_tunnel_connects_total", "Tunnels accepted from each connection point (reconnects included)",
            ["instance", "connection_point"], registry=registry)
    assert generate_latest(GatewayMetrics(0).registry) == generate_latest(registry)


def test_exposition_without_created_series() -> None:
    from prometheus_client import disable_created_metrics, enable_created_metrics

    disable_created_metrics()
    try:
        metrics = GatewayMetrics(3)
        for path, sent, received, seconds in REQUESTS:
            metrics.observe(path, sent, received, seconds)
        metrics.error("CMGService_BadGateway")
        text = generate_latest(metrics.registry)
        assert b"_created" not in text
        assert text == _reference("3")
    finally:
        enable_created_metrics()
