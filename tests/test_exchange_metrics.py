"""cmg.exchange_metrics: per-request counts kept as plain numbers expose exactly what
prometheus-client's Counter and Histogram expose for the same observations."""

from __future__ import annotations

import re

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from cmg.exchange_metrics import ExchangeMetrics

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
LABELS = ["connection_point", "role", "endpoint"]
# One exchange each: (labels, ok, request bytes, response bytes, seconds); seconds on a
# bucket's bound, between bounds, past the last bound, and zero.
EXCHANGES = [
    (("CP1", "72057594037927939", "ccm_system"), True, 0, 1024, 0.0003),
    (("CP1", "72057594037927939", "ccm_system"), True, 512, 2048, 0.001),
    (("CP1", "72057594037927939", "ccm_system"), False, 0, 0, 0.0011),
    (("CP1", "72057594037927939", "sms_mp"), True, 256 * 1024, 17, 2.5),
    (("CP1", "72057594037927937", "sms_dp_smspkg$"), False, 0, 104857600, 301.0),
    (("CP2", "72057594037927939", "ccm_system"), True, 0, 0, 0.0),
]


def _library(registry: CollectorRegistry) -> None:
    requests = Counter("cmg_connector_requests_total", "Requests", LABELS, registry=registry)
    failed = Counter("cmg_connector_failed_requests_total", "Failed", LABELS, registry=registry)
    req_b = Counter("cmg_connector_request_bytes_total", "Request bytes", LABELS, registry=registry)
    resp_b = Counter("cmg_connector_response_bytes_total", "Response bytes", LABELS, registry=registry)
    duration = Histogram("cmg_connector_request_duration_seconds", "Duration", LABELS, buckets=BUCKETS,
                         registry=registry)
    for labels, ok, sent, received, seconds in EXCHANGES:
        requests.labels(*labels).inc()
        failed.labels(*labels).inc(0 if ok else 1)
        req_b.labels(*labels).inc(sent)
        resp_b.labels(*labels).inc(received)
        duration.labels(*labels).observe(seconds)


def _ours(registry: CollectorRegistry) -> ExchangeMetrics:
    metrics = ExchangeMetrics({
        "requests": ("cmg_connector_requests_total", "Requests"),
        "failed": ("cmg_connector_failed_requests_total", "Failed"),
        "request_bytes": ("cmg_connector_request_bytes_total", "Request bytes"),
        "response_bytes": ("cmg_connector_response_bytes_total", "Response bytes"),
        "duration": ("cmg_connector_request_duration_seconds", "Duration"),
    }, LABELS, BUCKETS)
    registry.register(metrics)
    for labels, ok, sent, received, seconds in EXCHANGES:
        metrics.labels(*labels).add(ok, sent, received, seconds)
    return metrics


def _created_times(text: str) -> list[float]:
    return [float(v) for v in re.findall(r"^\S+_created\{[^}]*\} (\S+)$", text, re.M)]


def test_the_exposition_is_the_librarys() -> None:
    library, ours = CollectorRegistry(), CollectorRegistry()
    _library(library)
    _ours(ours)
    expected = generate_latest(library).decode()
    got = generate_latest(ours).decode()
    # Everything but the creation times, line for line and in order.
    strip = re.compile(r"^(\S+_created\{[^}]*\}) \S+$", re.M)
    assert strip.sub(r"\1 T", got) == strip.sub(r"\1 T", expected)
    assert len(_created_times(got)) == len(_created_times(expected)) == 5 * 4
    assert 'cmg_connector_request_duration_seconds_bucket{connection_point="CP1",endpoint="sms_dp_smspkg$",le="+Inf",role="72057594037927937"} 1.0' in got


def test_each_label_set_is_created_once_with_its_time() -> None:
    registry = CollectorRegistry()
    metrics = _ours(registry)
    first = metrics.labels("CP1", "72057594037927939", "ccm_system")
    assert metrics.labels("CP1", "72057594037927939", "ccm_system") is first
    assert (first.requests, first.failed, first.request_bytes, first.response_bytes) == (3, 1, 512, 3072)
    assert first.buckets[0] == 2 and first.buckets[1] == 1  # 0.0003 and 0.001 (on the bound), 0.0011
    times = set(_created_times(generate_latest(registry).decode()))
    assert first.created in times
    with pytest.raises(ValueError):
        metrics.labels("CP1", "72057594037927939")
