"""Prometheus metrics of the data-plane servers (RESP and HTTP).

One :class:`ServiceMetrics` holds its own ``CollectorRegistry`` (not prometheus-client's
process-global one, so that tests and embedded nodes can build as many as they like without
duplicate-registration errors). The servers of one node share an instance, so the HTTP
``/metrics`` endpoint exposes the RESP server's counters too; :data:`METRICS` is the
process-wide default they use when given none.

Label values are bounded: ``command`` is a known command or route name (unknown commands are
counted as ``UNKNOWN``, never by the client's text) and ``code`` is ``OK``, a ``VEC_ERR_*``
code, or ``ERR`` for protocol-level errors.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

__all__ = ["LATENCY_BUCKETS_S", "METRICS", "OK", "ServiceMetrics"]

OK = "OK"

# Sub-millisecond resolution matters: an L0 cache hit answers in tens of microseconds.
LATENCY_BUCKETS_S = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
)


class ServiceMetrics:
    """Counters and histograms of requests, by transport (``resp``/``http``), command and
    result code."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.requests = Counter(
            "streamvec_requests",
            "Data-plane requests by transport, command and result code.",
            ["transport", "command", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "streamvec_request_seconds",
            "Data-plane request latency, from parsed request to encoded reply.",
            ["transport", "command"],
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.protocol_errors = Counter(
            "streamvec_resp_protocol_errors",
            "RESP connections closed because of a malformed frame.",
            registry=self.registry,
        )
        self.connections = Gauge(
            "streamvec_resp_connections",
            "Open RESP client connections.",
            registry=self.registry,
        )
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)

    def observe(self, transport: str, command: str, code: str, seconds: float) -> None:
        """Count one request and record its latency."""
        self.requests.labels(transport, command, code).inc()
        self.latency.labels(transport, command).observe(seconds)

    def exposition(self) -> tuple[bytes, str]:
        """The Prometheus text exposition of every metric, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


METRICS = ServiceMetrics()
