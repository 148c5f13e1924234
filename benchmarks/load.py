"""Closed-loop load generation (asyncio): N clients send back-to-back until a request budget is spent.

A closed loop (each client waits for its answer before sending the next) measures what a fixed number of
callers get: latency at that concurrency and the scans/s it sustains, with no unbounded queue build-up.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from benchmarks.stats import LatencySummary, LoadResult

#: One request; returns per-request extras (e.g. the gateway's stage timings) or None; raises on failure.
Sender = Callable[[], Awaitable[dict[str, Any] | None]]


async def closed_loop(
    label: str, send: Sender, *, concurrency: int, requests: int, warmup: int = 0
) -> tuple[LoadResult, list[dict[str, Any]]]:
    """Run `warmup` uncounted requests, then `requests` counted ones, `concurrency` at a time."""
    if warmup:
        await _drive(send, concurrency=min(concurrency, warmup), requests=warmup)
    started = time.perf_counter()
    latencies, extras, errors = await _drive(send, concurrency=concurrency, requests=requests)
    wall = time.perf_counter() - started
    result = LoadResult(
        label=label,
        concurrency=concurrency,
        completed=len(latencies),
        errors=len(errors),
        wall_s=wall,
        latency=LatencySummary.of(latencies) if latencies else None,
        error_samples=tuple(sorted(set(errors))[:5]),
    )
    return result, extras


async def _drive(
    send: Sender, *, concurrency: int, requests: int
) -> tuple[list[float], list[dict[str, Any]], list[str]]:
    remaining = requests
    latencies: list[float] = []
    extras: list[dict[str, Any]] = []
    errors: list[str] = []

    async def client() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1  # single-threaded event loop: no lock needed
            t0 = time.perf_counter()
            try:
                extra = await send()
            except Exception as error:  # a failed request is counted, never silently dropped
                errors.append(f"{type(error).__name__}: {str(error)[:200]}")
                continue
            latencies.append(time.perf_counter() - t0)
            if extra is not None:
                extras.append(extra)

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return latencies, extras, errors


class GatewayRequestError(RuntimeError):
    pass


def gateway_sender(client: httpx.AsyncClient, body: bytes, content_type: str) -> Sender:
    """POST /v1/predict with `body`; returns the response's `timings_ms` (the gateway's own stage clock)."""

    async def send() -> dict[str, Any] | None:
        response = await client.post("/v1/predict", content=body, headers={"Content-Type": content_type})
        if response.status_code != 200:
            raise GatewayRequestError(f"HTTP {response.status_code}: {response.text[:200]}")
        timings = response.json().get("timings_ms")
        return dict(timings) if isinstance(timings, dict) else None

    return send


def gateway_client(url: str, concurrency: int) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=url,
        timeout=httpx.Timeout(600.0),
        limits=httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=concurrency + 2),
    )
