"""STAT latency under bulk saturation (`stat_latency_ratio`), with and without priority lanes.

One gateway with production-like admission (`LANE_GATEWAY`: 4 in-flight slots, bulk may hold 3) in
front of the run's Triton. Three phases, one after the other, on the same clinical NIfTI:

1. idle: STAT scans one at a time, nothing else running -> the idle p50;
2. lanes: ``BULK_FACTOR`` x the slots in bulk clients (closed loop, each honours Retry-After on 429 like
   ``headct batch``), and STAT scans one at a time among them -> their p50 / p99 and refusals;
3. no lanes (the FIFO before lanes, for comparison): the same load, but bulk clients and probes all send
   as routine.

``stat_latency_ratio`` = phase-2 STAT p50 ÷ idle p50 (target ≤ 1.5, and 0 STAT refusals).

    python -m benchmarks.lanes [--quick]     # this measurement alone (own Triton + gateway)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from benchmarks import inputs
from benchmarks.config import FULL, QUICK
from benchmarks.stack import GatewayOptions, start_gateway, start_triton
from benchmarks.stats import LatencySummary, ratio
from headct import contract

ROOT = Path(__file__).resolve().parent.parent
BULK_FACTOR = 4  # bulk clients per in-flight slot: "concurrency >= 4x capacity"
LANE_GATEWAY = GatewayOptions(batching=True, max_inflight=4, max_queue=8)
FILL_S = 3.0  # bulk load runs this long before the first probe
PROBE_GAP_S = 0.3  # between probes: each finds the queues as the bulk clients keep them
_HEADERS = {"Content-Type": inputs.CONTENT_TYPES["nifti_gz"]}


@dataclass
class Probes:
    """The probe scans of one phase: latencies of the answered ones and the status of the others."""

    latencies: list[float] = field(default_factory=list)
    refused: dict[str, int] = field(default_factory=dict)
    stages: list[dict[str, float]] = field(default_factory=list)  # the answers' timings_ms

    def to_dict(self) -> dict[str, Any]:
        latency = LatencySummary.of(self.latencies).to_dict() if self.latencies else None
        keys = sorted({key for stages in self.stages for key in stages})
        stage_p50 = {
            key: round(statistics.median(s[key] for s in self.stages if key in s), 1) for key in keys
        }
        return {
            "answered": len(self.latencies),
            "refused": self.refused,
            "latency": latency,
            "stage_p50_ms": stage_p50,
        }


async def _probe(client: httpx.AsyncClient, body: bytes, priority: str, probes: Probes) -> None:
    started = time.perf_counter()
    response = await client.post("/v1/predict", content=body, params={"priority": priority}, headers=_HEADERS)
    if response.status_code == 200:
        probes.latencies.append(time.perf_counter() - started)
        probes.stages.append(response.json()["timings_ms"])
    else:
        code = str(response.json().get("code", response.status_code))
        probes.refused[code] = probes.refused.get(code, 0) + 1


async def _bulk_client(
    url: str, body: bytes, priority: str, stop: asyncio.Event, tally: dict[str, int]
) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        while not stop.is_set():
            response = await client.post(
                "/v1/predict",
                content=body,
                params={"priority": priority},
                headers=_HEADERS,
            )
            key = str(response.status_code)
            tally[key] = tally.get(key, 0) + 1
            if response.status_code in (429, 503):
                await asyncio.sleep(float(response.headers.get("Retry-After", "1")))


async def _phase(url: str, body: bytes, probes_n: int, *, bulk: str | None, probe: str) -> dict[str, Any]:
    """`probes_n` probes sent as `probe`, one at a time, while (if `bulk`) the bulk clients run."""
    stop = asyncio.Event()
    tally: dict[str, int] = {}
    clients = BULK_FACTOR * LANE_GATEWAY.max_inflight if bulk else 0
    tasks = [asyncio.create_task(_bulk_client(url, body, bulk, stop, tally)) for _ in range(clients) if bulk]
    started = time.perf_counter()
    probes = Probes()
    try:
        if tasks:
            await asyncio.sleep(FILL_S)
        async with httpx.AsyncClient(base_url=url, timeout=600) as client:
            for _ in range(probes_n):
                await _probe(client, body, probe, probes)
                await asyncio.sleep(PROBE_GAP_S)
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    wall = time.perf_counter() - started
    return {
        "bulk_clients": clients,
        "bulk_priority": bulk,
        "probe_priority": probe,
        "probes": probes.to_dict(),
        "bulk_statuses": tally,
        "bulk_scans_per_s": round(tally.get("200", 0) / wall, 3) if tasks else None,
    }


def _p(phase: dict[str, Any], key: str) -> float | None:
    latency = phase["probes"]["latency"]
    return latency[key] if latency else None


async def measure_lanes(url: str, files: inputs.ScanFiles, probes_n: int) -> dict[str, Any]:
    """The three phases against the gateway at `url` (configured as `LANE_GATEWAY`)."""
    body = files.nifti_gz.read_bytes()
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:  # warm: card, connections
        await _probe(client, body, "stat", Probes())
    idle = await _phase(url, body, probes_n, bulk=None, probe="stat")
    lanes = await _phase(url, body, probes_n, bulk="bulk", probe="stat")
    fifo = await _phase(url, body, probes_n, bulk="routine", probe="routine")
    idle_p50 = _p(idle, "p50_ms")
    return {
        "input": files.spec.key,
        "gateway": LANE_GATEWAY.environment(),
        "bulk_factor": BULK_FACTOR,
        "idle": idle,
        "lanes": lanes,
        "no_lanes": fifo,
        "stat_latency_ratio": ratio(_p(lanes, "p50_ms"), idle_p50) if idle_p50 else None,
        "stat_p99_ratio": ratio(_p(lanes, "p99_ms"), idle_p50) if idle_p50 else None,
        "no_lanes_latency_ratio": ratio(_p(fifo, "p50_ms"), idle_p50) if idle_p50 else None,
        "stat_refused": sum(lanes["probes"]["refused"].values()),
    }


def measure_beside(
    triton_grpc_url: str, files: inputs.ScanFiles, log_dir: Path, model_name: str, probes_n: int
) -> dict[str, Any]:
    """Start the lane gateway in front of a running Triton, measure, stop it."""
    gateway = start_gateway(LANE_GATEWAY, triton_grpc_url, log_dir / "gateway-lanes.log", model_name)
    try:
        gateway.server.wait_ready()
        return asyncio.run(measure_lanes(gateway.url, files, probes_n))
    finally:
        gateway.server.stop()


def run_alone(quick: bool, repository: Path, model_name: str) -> dict[str, Any]:
    """This measurement with its own Triton and gateway (`python -m benchmarks.lanes`)."""
    log_dir = ROOT / "build" / "bench-logs"
    triton = start_triton(repository, log_dir, model_name)
    try:
        grpc_url = f"127.0.0.1:{triton.ports.grpc}"
        probes = (QUICK if quick else FULL).lane_probes
        return measure_beside(grpc_url, inputs.ensure_scan(QUICK.scan), log_dir, model_name, probes)
    finally:
        triton.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.lanes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 probes per phase instead of 20")
    parser.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--model-name", default=contract.DEFAULT_MODEL_NAME)
    args = parser.parse_args(argv)
    print(json.dumps(run_alone(args.quick, args.repository, args.model_name), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
