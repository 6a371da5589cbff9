"""CMGService.log: the CMG's own log, with its per-URI traffic summaries.

Each summary line has the real shape::

    RequestUri: /CCM_Proxy_MutualAuth/72057594037927939/CCM_System/request RequestCount: 5
    RequestSize: 1234 Bytes ResponseCount: 5 ResponseSize: 4567 Bytes AverageElapsedTime: 12 ms

URIs are summarised without their query string (policy GUIDs would make every URI unique).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .metrics import GatewayMetrics


@dataclass
class _Totals:
    requests: int = 0
    request_bytes: int = 0
    responses: int = 0
    response_bytes: int = 0
    elapsed_ms: float = 0.0


class TrafficSummary:
    """Counts traffic per URI between two summaries."""

    MAX_URIS = 10_000  # a client inventing URIs cannot grow this without bound

    def __init__(self, log: logging.Logger, metrics: GatewayMetrics | None = None) -> None:
        self._log = log
        self._metrics = metrics
        self._totals: dict[str, _Totals] = {}

    def record(self, uri: str, request_bytes: int, response_bytes: int | None, elapsed_ms: float) -> None:
        if self._metrics is not None:
            self._metrics.observe(uri, request_bytes, response_bytes, elapsed_ms / 1000)
        uri = uri.partition("?")[0]
        t = self._totals.get(uri)
        if t is None:
            if len(self._totals) >= self.MAX_URIS:
                uri = "(other)"
                t = self._totals.setdefault(uri, _Totals())
            else:
                t = self._totals[uri] = _Totals()
        t.requests += 1
        t.request_bytes += request_bytes
        if response_bytes is not None:
            t.responses += 1
            t.response_bytes += response_bytes
        t.elapsed_ms += elapsed_ms

    def refused(self, error: str) -> None:
        """An answer with a CMG error (the metrics count them by name)."""
        if self._metrics is not None:
            self._metrics.error(error)

    def flush(self) -> None:
        totals, self._totals = self._totals, {}
        for uri, t in sorted(totals.items()):
            avg = int(t.elapsed_ms / t.requests) if t.requests else 0
            self._log.info(
                "RequestUri: %s RequestCount: %d RequestSize: %d Bytes ResponseCount: %d "
                "ResponseSize: %d Bytes AverageElapsedTime: %d ms",
                uri, t.requests, t.request_bytes, t.responses, t.response_bytes, avg,
            )
