"""One benchmark run: start the stack, measure every comparison side by side, return the results dict."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import platform
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import tritonclient.grpc.aio as grpc_aio

from api.inference.triton import TritonModel
from api.inference.workers import prepare_pipeline_process
from benchmarks import direct, inputs, lanes, load, memory, perf_analyzer, runtimes, scan_cpu
from benchmarks.config import BenchConfig
from benchmarks.cpu import CpuMeter, busy_fraction, machine_cpu_ticks
from benchmarks.stack import Gateway, GatewayOptions, start_gateway, start_triton
from benchmarks.stats import LatencySummary, LoadResult, bootstrap_p50_ratio_interval, ratio
from headct import contract

ROOT = Path(__file__).resolve().parent.parent


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


@dataclass
class Stack:
    triton_grpc_url: str
    gateways: dict[str, Gateway]  # "on" / "off"
    triton_pid: int

    def cpu_meter(self) -> CpuMeter:
        """CPU groups: Triton, each gateway tree, and this process with its pool workers ("client")."""
        gateway_pids = {key: g.pid for key, g in self.gateways.items()}
        groups: dict[str, tuple[int, tuple[int, ...]]] = {"triton": (self.triton_pid, ())}
        groups.update({f"gateway_{key}": (pid, ()) for key, pid in gateway_pids.items()})
        groups["client"] = (os.getpid(), (self.triton_pid, *gateway_pids.values()))
        return CpuMeter(groups)


def _merge(results: list[LoadResult], label: str) -> LoadResult:
    """Rounds of the same path -> one result (scans/s over the summed wall time)."""
    # LatencySummary keeps no raw samples: p50 = median of the rounds' p50s, tails = worst round.
    completed = sum(r.completed for r in results)
    wall = sum(r.wall_s for r in results)
    latencies = [r.latency for r in results if r.latency is not None]
    merged = None
    if latencies:
        weights = [lat.count for lat in latencies]

        def wmean(values: list[float]) -> float:
            return sum(v * w for v, w in zip(values, weights, strict=True)) / sum(weights)

        merged = LatencySummary(
            count=sum(weights),
            mean_ms=wmean([lat.mean_ms for lat in latencies]),
            p50_ms=statistics.median([lat.p50_ms for lat in latencies]),
            p90_ms=max(lat.p90_ms for lat in latencies),
            p99_ms=max(lat.p99_ms for lat in latencies),
            min_ms=min(lat.min_ms for lat in latencies),
            max_ms=max(lat.max_ms for lat in latencies),
        )
    return LoadResult(
        label=label,
        concurrency=results[0].concurrency,
        completed=completed,
        errors=sum(r.errors for r in results),
        wall_s=wall,
        latency=merged,
        error_samples=tuple(s for r in results for s in r.error_samples)[:5],
    )


async def _gateway_run(
    gateway: Gateway, body: bytes, content_type: str, *, concurrency: int, requests: int, warmup: int = 0
) -> tuple[LoadResult, list[dict[str, Any]]]:
    async with load.gateway_client(gateway.url, concurrency) as client:
        return await load.closed_loop(
            gateway.options.label,
            load.gateway_sender(client, body, content_type),
            concurrency=concurrency,
            requests=requests,
            warmup=warmup,
        )


def _stage_means(extras: list[dict[str, Any]]) -> dict[str, float]:
    keys = sorted({k for e in extras for k in e})
    return {k: round(statistics.median([float(e[k]) for e in extras if k in e]), 3) for k in keys}


async def measure_overhead(cfg: BenchConfig, stack: Stack, files: inputs.ScanFiles) -> dict[str, Any]:
    """gateway_overhead_ratio: p50 POST /v1/predict (NIfTI, c=1) ÷ (p50 in-process prepare + p50 infer).

    Interleaved request by request (gateway on, gateway off, direct prepare + infer, in rotating order),
    so a burst of background load on the shared machine hits every path alike instead of one block.
    """
    path = files.nifti_gz
    content_type = inputs.CONTENT_TYPES["nifti_gz"]
    body = path.read_bytes()
    latencies: dict[str, list[float]] = {"on": [], "off": [], "prepare": [], "infer": []}
    extras_on: list[dict[str, Any]] = []
    cpu_s: dict[str, float] = {"on": 0.0, "off": 0.0, "direct": 0.0}
    meter = stack.cpu_meter()
    image = direct.prepare_file(str(path), content_type)  # warm caches / imports once, uncounted
    triton = direct.DirectTriton(stack.triton_grpc_url)
    clients = {key: load.gateway_client(g.url, 1) for key, g in stack.gateways.items()}
    senders = {key: load.gateway_sender(clients[key], body, content_type) for key in clients}
    try:
        for key in clients:  # one uncounted request each: connection set-up, model card fetch
            await senders[key]()
        triton.infer(image)
        order = ["on", "off", "direct"]
        for _ in range(cfg.c1_requests):
            for key in order:
                meter.start()
                if key == "direct":
                    image, seconds = direct.timed_prepare(str(path), content_type)
                    latencies["prepare"].append(seconds)
                    latencies["infer"].append(triton.timed_infer(image))
                else:
                    t0 = time.perf_counter()
                    extra = await senders[key]()
                    latencies[key].append(time.perf_counter() - t0)
                    if key == "on" and extra is not None:
                        extras_on.append(extra)
                used = meter.stop()
                cpu_s[key] += used["triton"] + used["client"] + used.get(f"gateway_{key}", 0.0)
            order = order[1:] + order[:1]
    finally:
        triton.close()
        for client in clients.values():
            await client.aclose()
    summaries = {k: LatencySummary.of(v) for k, v in latencies.items()}
    direct_p50 = summaries["prepare"].p50_ms + summaries["infer"].p50_ms
    return {
        "input": files.spec.key,
        "requests_per_path": cfg.c1_requests,
        "gateway": {
            key: LoadResult(
                stack.gateways[key].options.label,
                1,
                len(latencies[key]),
                0,
                sum(latencies[key]),
                summaries[key],
            ).to_dict()
            for key in ("on", "off")
        },
        "gateway_stage_p50_ms": _stage_means(extras_on),
        "direct_prepare": summaries["prepare"].to_dict(),
        "direct_infer": summaries["infer"].to_dict(),
        "direct_p50_ms": round(direct_p50, 3),
        "ratio_batching_on": ratio(summaries["on"].p50_ms, direct_p50),
        "ratio_batching_off": ratio(summaries["off"].p50_ms, direct_p50),
        # How far the p50 ratio could move on this machine's noise: rounds resampled as pairs.
        "ratio_ci90": {
            key: bootstrap_p50_ratio_interval(latencies[key], [latencies["prepare"], latencies["infer"]])
            for key in ("on", "off")
        },
        # CPU-seconds per scan of all our processes, per path (noise-robust companion of the ratio).
        "cpu_s_per_scan": {k: round(v / cfg.c1_requests, 4) for k, v in cpu_s.items()},
        "cpu_ratio_batching_on": ratio(cpu_s["on"], cpu_s["direct"]),
    }


async def measure_throughput(
    cfg: BenchConfig, stack: Stack, files: inputs.ScanFiles, pool: ProcessPoolExecutor, workers: int
) -> dict[str, Any]:
    """Gateway (batching on / off) vs the best direct path, same concurrency, rounds interleaved."""
    path = files.nifti_gz
    content_type = inputs.CONTENT_TYPES["nifti_gz"]
    body = path.read_bytes()
    c = cfg.throughput_concurrency
    runs: dict[str, list[LoadResult]] = {"on": [], "off": [], "direct": []}
    stages: dict[str, list[dict[str, Any]]] = {"on": [], "off": [], "direct": []}
    cpu_s: dict[str, float] = {"on": 0.0, "off": 0.0, "direct": 0.0}
    scans: dict[str, int] = {"on": 0, "off": 0, "direct": 0}
    busy: dict[str, list[float]] = {"on": [], "off": [], "direct": []}
    meter = stack.cpu_meter()
    client = grpc_aio.InferenceServerClient(url=stack.triton_grpc_url)
    try:
        send_direct = direct.direct_sender(pool, client, path, content_type)
        order = ["on", "off", "direct"]
        for round_index in range(cfg.throughput_rounds):
            warm = 2 if round_index == 0 else 0
            for key in order:
                meter.start()
                machine_before = machine_cpu_ticks()
                if key == "direct":
                    result, extras = await load.closed_loop(
                        "direct", send_direct, concurrency=c, requests=cfg.throughput_requests, warmup=warm
                    )
                else:
                    result, extras = await _gateway_run(
                        stack.gateways[key],
                        body,
                        content_type,
                        concurrency=c,
                        requests=cfg.throughput_requests,
                        warmup=warm,
                    )
                used = meter.stop()
                if (fraction := busy_fraction(machine_before, machine_cpu_ticks())) is not None:
                    busy[key].append(fraction)
                # The path's own processes: Triton + the client side (+ the gateway tree it goes through).
                cpu_s[key] += used["triton"] + used["client"] + used.get(f"gateway_{key}", 0.0)
                scans[key] += result.completed + warm
                runs[key].append(result)
                stages[key].extend(extras)
            order = order[1:] + order[:1]  # rotate: no path always runs first (or after the same one)
            log(
                f"  round {round_index + 1}: "
                + ", ".join(f"{k} {v[-1].throughput:.2f} scans/s" for k, v in runs.items())
            )
    finally:
        await client.close()
    merged = {
        k: _merge(v, "direct" if k == "direct" else stack.gateways[k].options.label) for k, v in runs.items()
    }
    return {
        "input": files.spec.key,
        "concurrency": c,
        "direct_pool_workers": workers,
        "results": {k: v.to_dict() for k, v in merged.items()},
        # Per-stage p50 under load: where a slower path loses its time (CPU share vs waiting).
        "stage_p50_ms": {k: _stage_means(v) for k, v in stages.items()},
        # Noise-robust view: CPU-seconds our processes burned per scan (Triton + client + gateway tree).
        "cpu_s_per_scan": {k: round(cpu_s[k] / scans[k], 4) if scans[k] else None for k in cpu_s},
        # Whether each path kept the cores busy (all tenants counted): near 1 for both means the
        # throughput ratio is down to CPU-seconds per scan, plus noise.
        "machine_busy_fraction": {k: round(statistics.mean(v), 3) if v else None for k, v in busy.items()},
        "cpu_per_scan_ratio": ratio(
            cpu_s["on"] / scans["on"] if scans["on"] else None,
            cpu_s["direct"] / scans["direct"] if scans["direct"] else None,
        ),
        "gateway_throughput_ratio": ratio(merged["on"].throughput, merged["direct"].throughput),
        "gateway_throughput_ratio_batching_off": ratio(merged["off"].throughput, merged["direct"].throughput),
        "batching_throughput_ratio": ratio(merged["on"].throughput, merged["off"].throughput),
    }


async def measure_sweep(cfg: BenchConfig, stack: Stack, files: inputs.ScanFiles) -> list[dict[str, Any]]:
    """Full mode: batching on / off at each extra concurrency (1 and 8 come from the runs above)."""
    body = files.nifti_gz.read_bytes()
    rows = []
    for c in cfg.sweep:
        for key in ("on", "off"):
            result, _ = await _gateway_run(
                stack.gateways[key],
                body,
                inputs.CONTENT_TYPES["nifti_gz"],
                concurrency=c,
                requests=c * cfg.sweep_requests_per_client,
                warmup=min(c, 2),
            )
            rows.append(result.to_dict())
            log(f"  sweep c={c} {key}: {result.throughput:.2f} scans/s")
    return rows


async def measure_uploads(cfg: BenchConfig, stack: Stack, files: inputs.ScanFiles) -> list[dict[str, Any]]:
    """Same scan as DICOM zip, NIfTI.gz and raw (uncompressed) NIfTI: bytes on the wire, decode, total."""
    rows = []
    for fmt in ("dicom_zip", "nifti_gz", "nifti_raw"):
        path = files.path(fmt)
        body = path.read_bytes()
        result, extras = await _gateway_run(
            stack.gateways["on"],
            body,
            inputs.CONTENT_TYPES[fmt],
            concurrency=1,
            requests=cfg.upload_requests,
            warmup=1,
        )
        stages = _stage_means(extras)
        rows.append(
            {
                "format": fmt,
                "bytes": len(body),
                "mb": round(len(body) / 1e6, 3),
                "gateway_p50_ms": result.latency.p50_ms if result.latency else None,
                "decode_p50_ms": stages.get("decode"),
                "preprocess_p50_ms": stages.get("preprocess"),
                "errors": result.errors,
                "error_samples": list(result.error_samples),
            }
        )
        log(f"  upload {fmt}: {len(body) / 1e6:.1f} MB, decode {stages.get('decode')} ms")
    return rows


async def measure_rss(cfg: BenchConfig, stack: Stack, files: inputs.ScanFiles) -> dict[str, Any]:
    """Peak RSS of the gateway tree while it serves `rss_concurrency` DICOM zips at once."""
    gateway = stack.gateways["on"]
    body = files.dicom_zip.read_bytes()
    before_rss, before_pss, _ = memory.tree_memory_kib(gateway.pid)
    with memory.TreeMemorySampler(gateway.pid) as sampler:
        result, extras = await _gateway_run(
            gateway, body, "application/zip", concurrency=cfg.rss_concurrency, requests=cfg.rss_concurrency
        )
    peak = sampler.peak
    return {
        "input": files.spec.key,
        "input_shape": list(files.spec.shape),
        "zip_mb": round(len(body) / 1e6, 1),
        "concurrency": cfg.rss_concurrency,
        "idle_rss_mb": round(before_rss / 1024, 1),
        "idle_pss_mb": round(before_pss / 1024, 1),
        "peak_rss_mb": round(peak.rss_mb, 1),
        "peak_pss_mb": round(peak.pss_mb, 1),
        "processes": peak.processes,
        "samples": peak.samples,
        # The gateway process first, then its workers: peak memory grows with the worker count
        # (HEADCT_PREPROCESS_WORKERS, default = CPU count, at most 8), one decoded series per worker.
        "per_process_peak_rss_mb": [
            round(peak.per_process_rss_mb.get(gateway.pid, 0.0), 1),
            *sorted(
                (round(v, 1) for pid, v in peak.per_process_rss_mb.items() if pid != gateway.pid),
                reverse=True,
            ),
        ],
        "preprocess_workers": gateway.options.preprocess_workers,
        "requests": result.to_dict(),
        "stage_p50_ms": _stage_means(extras),
    }


async def _parity(stack: Stack, files: inputs.ScanFiles) -> dict[str, Any]:
    """Gateway vs direct path give the same probabilities for the same file (a benchmark that compares
    two paths must first show they compute the same thing)."""
    content_type = inputs.CONTENT_TYPES["nifti_gz"]
    image = direct.prepare_file(str(files.nifti_gz), content_type)
    direct_probs = direct.infer_probabilities(stack.triton_grpc_url, image)
    async with httpx.AsyncClient(base_url=stack.gateways["on"].url, timeout=600) as client:
        response = await client.post(
            "/v1/predict", content=files.nifti_gz.read_bytes(), headers={"Content-Type": content_type}
        )
    response.raise_for_status()
    gw_probs = np.array([f["probability"] for f in response.json()["findings"]], dtype=np.float64)
    return {"gateway_vs_direct_max_abs_prob_delta": float(np.max(np.abs(gw_probs - direct_probs)))}


async def _measure_all(
    cfg: BenchConfig, stack: Stack, scan: inputs.ScanFiles, rss_scan: inputs.ScanFiles
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    # The direct baseline preprocesses (here and in its pool) with the process set-up of the gateway's
    # workers, so the ratios measure the gateway, not a thread setting either side could use.
    prepare_pipeline_process()
    out["parity"] = await _parity(stack, scan)
    log(f"parity: {out['parity']}")
    log("gateway overhead at concurrency 1")
    out["overhead"] = await measure_overhead(cfg, stack, scan)
    log(f"  ratio {out['overhead']['ratio_batching_on']}")
    log("model input to Triton: gRPC message vs shared memory")
    out["input_transport"] = await measure_input_transport(stack, scan, cfg.c1_requests)
    log(f"throughput at concurrency {cfg.throughput_concurrency}")
    workers = max(1, os.cpu_count() or 1)
    with ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=prepare_pipeline_process,
    ) as pool:
        out["throughput"] = await measure_throughput(cfg, stack, scan, pool, workers)
    out["sweep"] = await measure_sweep(cfg, stack, scan) if cfg.sweep else []
    log("upload formats")
    out["uploads"] = await measure_uploads(cfg, stack, scan)
    log(f"peak RSS with {cfg.rss_concurrency} concurrent {rss_scan.spec.key} zips")
    out["memory"] = await measure_rss(cfg, stack, rss_scan)
    log(f"  peak RSS {out['memory']['peak_rss_mb']} MB (PSS {out['memory']['peak_pss_mb']} MB)")
    return out


async def measure_input_transport(stack: Stack, files: inputs.ScanFiles, rounds: int) -> dict[str, float]:
    """The `triton_input_wall` lever: wall seconds of one Triton call for one scan's model input sent
    in the gRPC message (before) vs read by Triton where it lies in shared memory (after, as a
    preprocessing worker's result slot; api/inference/triton_shm.py), interleaved call by call."""
    content_type = inputs.CONTENT_TYPES["nifti_gz"]
    image = np.ascontiguousarray(
        direct.prepare_file(str(files.nifti_gz), content_type)[np.newaxis], np.float16
    )
    url = stack.triton_grpc_url
    message = TritonModel(url, contract.DEFAULT_MODEL_NAME, "", 60.0, 1, shared_memory="off")
    in_place = TritonModel(url, contract.DEFAULT_MODEL_NAME, "", 60.0, 1, shared_memory_regions=0)
    slot = SharedMemory(create=True, size=image.nbytes)
    in_slot: np.ndarray = np.ndarray(image.shape, dtype=image.dtype, buffer=slot.buf)
    in_slot[...] = image
    in_place.share_input_memory("benchmark", {slot.name: slot})
    seconds: dict[str, list[float]] = {"before": [], "after": []}
    try:
        for model in (message, in_place):
            await model.card()
            await model.infer_batch(in_slot)  # uncounted: connection, registration
        if not in_place.input_in_shared_memory:
            raise RuntimeError("Triton did not map the benchmark's shared memory")
        for _ in range(rounds):
            for key, model in (("before", message), ("after", in_place)):
                started = time.perf_counter()
                await model.infer_batch(in_slot)
                seconds[key].append(time.perf_counter() - started)
    finally:
        await message.close()
        await in_place.close()
        del in_slot
        slot.close()
        slot.unlink()
    before, after = statistics.median(seconds["before"]), statistics.median(seconds["after"])
    return {"before_s": round(before, 5), "after_s": round(after, 5), "speedup": round(before / after, 2)}


def _preprocess_bench(quick: bool) -> dict[str, Any]:
    try:
        from benchmarks import preprocess_bench  # helper-8's module
    except ImportError as error:
        return {"skipped": f"benchmarks.preprocess_bench unavailable: {error}"}
    try:
        return dict(preprocess_bench.run(quick=quick))
    except Exception as error:  # reported in the JSON; the other figures are still worth having
        return {"skipped": f"preprocess_bench.run failed: {type(error).__name__}: {error}"}


def blas_kernels() -> dict[str, Any]:
    """The BLAS libraries loaded here (numpy's and scipy's OpenBLAS) with the kernels they chose, and
    the OPENBLAS_* variables that steer them (`make bench` unsets the core-type ones)."""
    import scipy.linalg  # noqa: F401  (loads scipy's OpenBLAS, the one preprocessing uses)
    from threadpoolctl import threadpool_info

    return {
        "libraries": [
            {
                "library": Path(str(info.get("filepath", ""))).name,
                "version": info.get("version"),
                "architecture": info.get("architecture"),
            }
            for info in threadpool_info()
            if info.get("user_api") == "blas"
        ],
        "env": {name: value for name, value in sorted(os.environ.items()) if name.startswith("OPENBLAS_")},
    }


def environment() -> dict[str, Any]:
    from importlib import metadata

    versions = {}
    for package in (
        "numpy",
        "scipy",
        "onnxruntime",
        "torch",
        "tritonclient",
        "nvidia-pytriton",
        "fastapi",
        "uvicorn",
    ):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "cpu_count": os.cpu_count(),
        "blas": blas_kernels(),
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
    }


def run(
    cfg: BenchConfig, repository: Path, results_dir: Path, model_name: str = contract.DEFAULT_MODEL_NAME
) -> dict[str, Any]:
    started = time.monotonic()
    results: dict[str, Any] = {
        "mode": cfg.mode,
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    results["environment"] = environment()
    log(f"inputs ({cfg.scan.key}, {cfg.rss_scan.key}) in {inputs.CACHE_DIR}")
    scan = inputs.ensure_scan(cfg.scan)
    rss_scan = inputs.ensure_scan(cfg.rss_scan)
    log_dir = ROOT / "build" / "bench-logs"
    log("starting tritonserver and two gateways (batching on / off) on free ports")
    triton = start_triton(repository, log_dir, model_name)
    gateways: dict[str, Gateway] = {}
    try:
        grpc_url = f"127.0.0.1:{triton.ports.grpc}"
        for key, batching in (("on", True), ("off", False)):
            gateways[key] = start_gateway(
                GatewayOptions(batching=batching), grpc_url, log_dir / f"gateway-{key}.log", model_name
            )
        for gateway in gateways.values():
            gateway.server.wait_ready()
        results["gateway_options"] = {k: g.options.environment() for k, g in gateways.items()}
        assert triton.process is not None
        stack = Stack(grpc_url, gateways, triton.process.pid)
        results.update(asyncio.run(_measure_all(cfg, stack, scan, rss_scan)))
        log(f"STAT latency under bulk saturation ({lanes.BULK_FACTOR}x capacity in bulk clients)")
        results["lanes"] = lanes.measure_beside(grpc_url, scan, log_dir, model_name, cfg.lane_probes)
        log(f"  stat_latency_ratio {results['lanes']['stat_latency_ratio']}")
        log("perf_analyzer against Triton directly")
        results["perf_analyzer"] = perf_analyzer.run(
            grpc_url, model_name, results_dir, quick=cfg.mode == "quick"
        )
    finally:
        for gateway in gateways.values():
            gateway.server.stop()
        triton.stop()
    log("CPU per scan by input kind, decoding levers, physical limits (benchmarks.scan_cpu)")
    results["scan_cpu"] = scan_cpu.run(quick=cfg.mode == "quick")
    results["scan_cpu"]["levers"]["triton_input_wall"] = results.pop("input_transport")
    log("preprocessing: production vs MONAI reference (benchmarks.preprocess_bench)")
    results["preprocess"] = _preprocess_bench(quick=cfg.mode == "quick")
    log("ONNX Runtime vs PyTorch eager")
    results["runtimes"] = runtimes.run(cfg.mode == "quick", repository, model_name, inputs.CACHE_DIR)
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    results["environment"]["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return results
