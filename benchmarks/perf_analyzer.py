"""Triton's own perf_analyzer against the tritonserver directly: the server-side latency breakdown
(queue / compute input / compute infer / compute output) with no gateway and no preprocessing.

The binary ships in tritonclient[all]==2.51.0 (``.venv/bin/perf_analyzer``); it needs libb64 (apt
``libb64-0d``) and libcudart.so.12 (``nvidia-cuda-runtime-cu12``) even on a CPU host. When it cannot
run, the benchmark records why instead of failing. Inputs are zeros: perf_analyzer's default random
bytes are NaN/inf as FP16, which the model rightly rejects, and a ViT's cost does not depend on values.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

#: CSV columns (µs) of perf_analyzer's `-f` report that we keep, under our names (ms).
_COLUMNS = {
    "Client Send": "client_send_ms",
    "Network+Server Send/Recv": "network_ms",
    "Server Queue": "server_queue_ms",
    "Server Compute Input": "server_compute_input_ms",
    "Server Compute Infer": "server_compute_infer_ms",
    "Server Compute Output": "server_compute_output_ms",
    "Client Recv": "client_recv_ms",
    "p50 latency": "p50_ms",
    "p99 latency": "p99_ms",
    "Avg latency": "avg_ms",
}


def _binary() -> Path:
    return Path(sys.executable).parent / "perf_analyzer"


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    import sysconfig

    cudart = Path(sysconfig.get_paths()["purelib"]) / "nvidia" / "cuda_runtime" / "lib"
    if cudart.is_dir():
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(cudart), env.get("LD_LIBRARY_PATH")]))
    return env


def parse_csv(path: Path) -> list[dict[str, float]]:
    rows = []
    with path.open() as handle:
        for row in csv.DictReader(handle):
            parsed: dict[str, float] = {"concurrency": float(row["Concurrency"])}
            parsed["inferences_per_s"] = float(row["Inferences/Second"])
            for column, name in _COLUMNS.items():
                if column in row and row[column] not in (None, ""):
                    parsed[name] = round(float(row[column]) / 1000.0, 3)
            rows.append(parsed)
    return rows


def run(grpc_url: str, model_name: str, out_dir: Path, quick: bool) -> dict[str, Any]:
    binary = _binary()
    if not binary.is_file():
        return {"skipped": f"{binary} not found (needs tritonclient[all]==2.51.0)"}
    env = _environment()
    probe = subprocess.run([str(binary), "--version"], env=env, capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        reason = (probe.stderr or probe.stdout).strip().splitlines()
        return {"skipped": f"perf_analyzer does not run here: {reason[0] if reason else probe.returncode}"}
    out_csv = out_dir / "perf_analyzer.csv"
    # Longer windows on a retry: on a shared machine perf_analyzer's stability check (latency and
    # throughput of 3 consecutive windows within the given %) often fails on short windows.
    intervals_ms = (3000, 6000) if quick else (4000, 8000)
    failures: list[dict[str, Any]] = []
    for interval_ms in intervals_ms:
        out_csv.unlink(missing_ok=True)  # never report (or commit) a previous run's table
        command = [
            str(binary),
            "-m",
            model_name,
            "-u",
            grpc_url,
            "-i",
            "grpc",
            "-b",
            "1",
            "--concurrency-range",
            "1:1" if quick else "1:4:1",
            "--measurement-interval",
            str(interval_ms),
            "--input-data",
            "zero",
            "--max-trials",
            "6",
            # Lenient (default 10 %): an unstable figure, reported with its p99, beats none here.
            "--stability-percentage",
            "100",
            "-f",
            str(out_csv),
        ]
        try:
            done = subprocess.run(
                command, env=env, capture_output=True, text=True, timeout=120 if quick else 600
            )
        except subprocess.TimeoutExpired:
            failures.append({"interval_ms": interval_ms, "error": "timed out"})
            continue
        if done.returncode == 0 and out_csv.is_file():
            return {
                "command": " ".join(command[1:]),
                "input": "zero FP16 [1,3,96,96,96]",
                "rows": parse_csv(out_csv),
                "failed_attempts": failures,
            }
        tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
        failures.append({"interval_ms": interval_ms, "rc": done.returncode, "log_tail": tail})
    return {"skipped": "perf_analyzer found no stable measurement (shared machine)", "attempts": failures}
