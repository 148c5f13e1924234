"""The gateway's Prometheus metrics (names are part of the public contract: ../README.md#metrics).

Several gateway processes (`HEADCT_WORKERS` > 1, or `uvicorn --workers N`): set
``PROMETHEUS_MULTIPROC_DIR`` to an empty, writable directory in the environment of the process that
starts them (it must be set before `prometheus_client` is imported, and wiped between runs; `python -m
api` wipes it). Each process then writes its values to files there and `/metrics` (any worker) merges
all of them with `MultiProcessCollector`: counters and histograms are summed over processes, the
in-flight and queue gauges are summed over live processes (``livesum``), `headct_model_ready` is the
maximum over live processes (``livemax``). A process marks itself dead at shutdown
(`mark_process_dead`), so its gauges drop out. Without the variable, the default registry is used.
"""

from __future__ import annotations

import os

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_enabled() -> bool:
    return bool(os.environ.get(MULTIPROC_ENV))


def render() -> bytes:
    """The exposition text: this process's metrics, or all gateway processes' in multiprocess mode."""
    if multiprocess_enabled():
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest(REGISTRY)


def mark_process_dead(pid: int | None = None) -> None:
    """Drop this process's live gauges from the merged view (multiprocess mode only)."""
    if multiprocess_enabled():
        multiprocess.mark_process_dead(pid if pid is not None else os.getpid())


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
INFLIGHT = Gauge(
    "headct_inflight_requests",
    "Predictions holding an in-flight slot (preprocessing or inference)",
    multiprocess_mode="livesum",
)
QUEUE_DEPTH = Gauge(
    "headct_queue_depth", "Predictions waiting for an in-flight slot", multiprocess_mode="livesum"
)
BATCH_SIZE = Histogram(
    "headct_batch_size", "Scans per Triton request sent by the gateway", buckets=(1, 2, 4, 8, 16, 32)
)
REJECTIONS = Counter("headct_rejections_total", "Requests answered with a 4xx/5xx problem", ["code"])
TRITON_ERRORS = Counter("headct_triton_errors_total", "Failed calls to Triton by gRPC status", ["code"])
TRITON_INPUTS = Counter(
    "headct_triton_inputs_total",
    "Triton calls by how the model input travelled: in_place (read by Triton on this host where the "
    "preprocessing worker wrote it), shared_memory (copied into a region Triton reads) or message",
    ["transport"],
)
MODEL_READY = Gauge(
    "headct_model_ready", "1 when Triton reports the model ready, else 0", multiprocess_mode="livemax"
)
FINDING_PROBABILITY = Histogram(
    "headct_finding_probability",
    "Served positive-class probabilities, for drift watching",
    ["finding"],
    buckets=(0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99),
)

# Priority lanes (api/inference/lanes.py): stat, routine, bulk.
PREDICTIONS = Counter(
    "headct_predictions_total",
    "Predictions (REST and gRPC) by priority lane and outcome: ok, or the problem code",
    ["lane", "outcome"],
)
PREDICTION_DURATION = Histogram(
    "headct_prediction_duration_seconds",
    "Latency of answered predictions (REST and gRPC), arrival to answer, by priority lane",
    ["lane"],
    buckets=_LATENCY_BUCKETS,
)
LANE_INFLIGHT = Gauge(
    "headct_lane_inflight_requests",
    "Predictions holding an in-flight slot, by priority lane",
    ["lane"],
    multiprocess_mode="livesum",
)
LANE_QUEUE_DEPTH = Gauge(
    "headct_lane_queue_depth",
    "Predictions waiting for an in-flight slot, by priority lane",
    ["lane"],
    multiprocess_mode="livesum",
)
LANE_REJECTIONS = Counter(
    "headct_lane_busy_total", "Predictions refused with 429 gateway_busy, by priority lane", ["lane"]
)
