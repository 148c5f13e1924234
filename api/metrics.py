"""The gateway's Prometheus metrics (names are part of the public contract: ../README.md#metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# Seconds; CT requests span ~50 ms (cached, small) to a minute (huge series on a busy node).
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120)

REQUESTS = Counter("headct_requests_total", "HTTP requests by route and status", ["route", "status"])
REQUEST_DURATION = Histogram(
    "headct_request_duration_seconds", "End-to-end request latency", ["route"], buckets=_LATENCY_BUCKETS
)
STAGE_DURATION = Histogram(
    "headct_stage_duration_seconds",
    "Time per pipeline stage (decode, validate, preprocess, queue, infer)",
    ["stage"],
    buckets=_LATENCY_BUCKETS,
)
INFLIGHT = Gauge("headct_inflight_requests", "Predict requests being handled now")
QUEUE_DEPTH = Gauge("headct_queue_depth", "Predict requests waiting for a preprocessing or inference slot")
BATCH_SIZE = Histogram(
    "headct_batch_size", "Scans per Triton request sent by the gateway", buckets=(1, 2, 4, 8, 16, 32)
)
REJECTIONS = Counter("headct_rejections_total", "Requests answered with a 4xx/5xx problem", ["code"])
TRITON_ERRORS = Counter("headct_triton_errors_total", "Failed calls to Triton by gRPC status", ["code"])
MODEL_READY = Gauge("headct_model_ready", "1 when Triton reports the model ready, else 0")
FINDING_PROBABILITY = Histogram(
    "headct_finding_probability",
    "Served positive-class probabilities, for drift watching",
    ["finding"],
    buckets=(0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99),
)
