"""Targets, the one-line contract summary, REPORT.md and the PNG plots, from the results dict.

The results dict (what `benchmarks.suite.run` returns, saved as latest.json) is read once into the
typed `BenchResults` below; the summary, the report and the plots are built from that.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

#: The keys of `make bench-quick`'s last line (shared/api-contract.md), in contract order.
CONTRACT_KEYS = (
    "gateway_overhead_ratio",
    "gateway_overhead_ci90_high",
    "gateway_throughput_ratio",
    "batching_throughput_ratio",
    "preprocess_speedup",
    "preprocess_max_abs_prob_delta",
    "gateway_peak_rss_mb",
    "stat_latency_ratio",
    "dicom_zip_cpu_s",
    "nifti_gz_cpu_s",
)


@dataclass(frozen=True)
class Target:
    key: str
    op: str  # "<=" or ">=", or "" for a figure without a target
    threshold: float | None
    meaning: str

    def check(self, value: float | None) -> str:
        """ "pass", "MISS", "n/a" (not measured) or "info" (no target)."""
        if not self.op or self.threshold is None:
            return "info"
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "n/a"
        ok = value <= self.threshold if self.op == "<=" else value >= self.threshold
        return "pass" if ok else "MISS"

    @property
    def text(self) -> str:
        return f"{self.op} {self.threshold:g}" if self.op and self.threshold is not None else "—"


TARGETS: tuple[Target, ...] = (
    Target(
        "gateway_overhead_ratio",
        "<=",
        1.08,
        "p50 of POST /v1/predict (NIfTI.gz, one request at a time) ÷ (p50 in-process "
        "decode+validate+preprocess "
        "of the same file + p50 direct Triton gRPC inference of the same tensor): what HTTP, spooling, "
        "scheduling and JSON add to one scan's latency (issue 14: <= 1.08 in `make bench`).",
    ),
    Target(
        "gateway_overhead_ci90_high",
        "<=",
        1.15,
        "Upper bound of the 90 % bootstrap interval of `gateway_overhead_ratio` (rounds resampled as "
        "pairs): how high this machine's noise could have put it (issue 14: <= 1.15 in "
        "`make bench-quick`).",
    ),
    Target(
        "gateway_throughput_ratio",
        ">=",
        0.95,
        "Gateway scans/s (batching on) at concurrency 8 ÷ scans/s of the best direct path at concurrency 8 "
        "(decode+preprocess in a process pool of one worker per core, async gRPC straight to Triton).",
    ),
    Target(
        "batching_throughput_ratio",
        "",
        None,
        "Gateway scans/s with gateway micro-batching on ÷ off, concurrency 8 (no target: >1 means batching "
        "pays for its delay on this hardware).",
    ),
    Target(
        "preprocess_speedup",
        ">=",
        20.0,
        "MONAI reference preprocessing time ÷ production preprocessing time on the same volumes, one core "
        "(benchmarks/preprocess_bench.py).",
    ),
    Target(
        "preprocess_max_abs_prob_delta",
        "<=",
        0.01,
        "Largest absolute Δ probability between the model fed by production preprocessing and by the MONAI "
        "reference on the same volumes: the speed-up must not change findings.",
    ),
    Target(
        "gateway_peak_rss_mb",
        "<=",
        1098.0,
        "Peak RSS summed over the gateway and all its child processes while it serves 8 concurrent DICOM "
        "zips (sampled from /proc every 50 ms; shared pages count once per process, so this over-states "
        "real use; PSS is reported beside it). Target: no worse than before issue 14 (1098 MB in "
        "`make bench` on 512x512x200; `make bench-quick` sends half the slices).",
    ),
    Target(
        "stat_latency_ratio",
        "<=",
        1.5,
        "p50 of STAT scans (NIfTI.gz, one at a time) while bulk clients 4x the gateway's in-flight slots "
        "saturate it ÷ p50 of the same STAT scans on the idle gateway (benchmarks/lanes.py); STAT must "
        "also get 0 refusals.",
    ),
    Target(
        "dicom_zip_cpu_s",
        "<=",
        0.35,
        "CPU seconds on one core to decode + validate + preprocess a 1 mm 512x512x200 head sent as a DICOM "
        "zip with deflated members (benchmarks/scan_cpu.py; the stored-member zip is in its table).",
    ),
    Target(
        "nifti_gz_cpu_s",
        "<=",
        0.25,
        "The same for the same head as NIfTI.gz.",
    ),
)


#: Levers whose before/after needs a process or an old code path of its own: how they were measured.
LEVERS_MEASURED_APART: tuple[str, ...] = (
    "Workers' heap reuse (glibc `mallopt`, api/inference/workers.py): decoding + preprocessing the "
    "512x512x200 DICOM zip again took ~60,000 page faults and 170-240 ms of system CPU per scan "
    "before, 100-700 faults and 30-90 ms after (a process per setting, the zip 5 times each; this "
    "machine under load, 2026-12-05).",
    "Kept datasets without their members' bytes (api/ingest/dicom.py `_parse_member`): decoding the "
    "512x512x200 DICOM zip peaks at 424 MB traced (tracemalloc) before, 319 MB after; a worker's VmHWM "
    "529 MB before, 432 MB after.",
    "Preprocessing through BLAS's pointer interface and window + area resize slab by slab "
    "(headct/preprocess): CPU new/old 0.78 (1 mm NIfTI), 0.78 (1 mm DICOM), 0.78 (5 mm), paired "
    "medians of 15 runs with the old and the new module in one process; the model input bit for bit "
    "the same (tests/unit/test_preprocess_blas.py).",
    "The volume built where its stored values were read (api/ingest/volume_memory.py; a worker's memory "
    "reused scan after scan, the plane statistics gathered while it is written): the worker's function "
    "`prepare_scan`, the code before (a942c17) and after in alternating processes, median CPU s of 5 "
    "scans, two rounds, 2026-12-06: 1 mm DICOM zip 0.363 / 0.344 -> 0.343 / 0.326, NIfTI.gz 0.332 / "
    "0.329 -> 0.251 / 0.254, 0.8 mm DICOM zip 0.392 / 0.395 -> 0.371 / 0.383; the process's VmHWM 424 "
    "-> 369, 468 -> 369 and 426 -> 387 MB.",
    "The head check's erosion as shifted ANDs (api/ingest/validation.py `eroded`) instead of scipy's "
    "`minimum_filter`, the same mask: 1 vs 15 ms on a 128x128x100 sample; validate on the 1 mm NIfTI.gz "
    "13.5 -> 5.9 ms (median of 7, 2026-12-06).",
    "A NIfTI's plane statistics from its stored 16-bit values just before each plane is widened "
    "(api/ingest/nifti.py), not from the widened float32: widening + statistics of the 1 mm head 19.3 "
    "-> 16.6 ms (medians of 12, alternated in one process, 2026-12-06).",
    "The model input computed straight into the worker's shared-memory result slot (`slot_array`): "
    "a 5.3 MB copy (~0.5 ms) less per scan; side by side with the gateway before, at concurrency 1 on "
    "the 5 mm NIfTI.gz (150 requests each, both orders), the p50s differ by 0.1 ms, below what this "
    "machine resolves (the first-started gateway alone was 1-3.5 ms slower). Tried and not kept: "
    "removing the upload while Triton runs instead of after (~0.7 ms of unlinking): +0.3 ms p50 and "
    "+0.2 ms in the infer stage (100 requests each, both orders), the unlinking thread competing with "
    "Triton for the cores.",
)


# ---- the results, typed ------------------------------------------------------------------------
# Each class holds the keys of one JSON object of the results, under the same names, with the values as
# they are there (None where a key is missing): rendering keeps ints and floats apart (`_fmt`).

_D = TypeVar("_D")
JsonObject = dict[str, Any]


def _read(cls: type[_D], data: JsonObject | None, **parsed: Any) -> _D:
    """`cls` from the JSON object `data`: each field its value there (None where missing), except the
    fields given in `parsed` (already converted by the caller)."""
    data = data or {}
    return cls(**{f.name: parsed[f.name] if f.name in parsed else data.get(f.name) for f in fields(cls)})


@dataclass(frozen=True)
class Latency:
    p50_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    count: int | None = None

    @classmethod
    def from_json(cls, data: JsonObject | None) -> Latency:
        return _read(cls, data)


@dataclass(frozen=True)
class LoadRun:
    """One closed-loop load run (`benchmarks.stats.LoadResult.to_dict`)."""

    label: str | None = None
    concurrency: int | None = None
    scans_per_s: float | None = None
    completed: int | None = None
    errors: int | None = None
    latency: Latency = field(default_factory=Latency)

    @classmethod
    def from_json(cls, data: JsonObject | None) -> LoadRun:
        return _read(cls, data, latency=Latency.from_json((data or {}).get("latency")))


def _runs(data: JsonObject | None) -> dict[str, LoadRun]:
    """Load runs by path key ("on", "off", "direct"); empty entries left out."""
    return {key: LoadRun.from_json(run) for key, run in (data or {}).items() if run}


@dataclass(frozen=True)
class Overhead:
    """Concurrency 1: gateway vs in-process preparation + direct Triton inference."""

    input: str | None
    ratio_batching_on: float | None
    ratio_batching_off: float | None
    gateway: dict[str, LoadRun]
    gateway_stage_p50_ms: dict[str, float]
    direct_prepare: Latency | None
    direct_infer: Latency | None
    direct_p50_ms: float | None
    cpu_s_per_scan: dict[str, float]
    cpu_ratio_batching_on: float | None
    ratio_ci90: dict[str, list[float]]

    @classmethod
    def from_json(cls, data: JsonObject) -> Overhead:
        def latency(key: str) -> Latency | None:
            return Latency.from_json(data[key]) if data.get(key) else None

        return _read(
            cls,
            data,
            gateway=_runs(data.get("gateway")),
            gateway_stage_p50_ms=data.get("gateway_stage_p50_ms") or {},
            direct_prepare=latency("direct_prepare"),
            direct_infer=latency("direct_infer"),
            cpu_s_per_scan=data.get("cpu_s_per_scan") or {},
            ratio_ci90=data.get("ratio_ci90") or {},
        )

    def gateway_p50_ms(self, key: str = "on") -> float | None:
        run = self.gateway.get(key)
        return run.latency.p50_ms if run else None


@dataclass(frozen=True)
class Throughput:
    """Concurrency N: gateway (batching on / off) vs the direct path, interleaved."""

    concurrency: int | None
    direct_pool_workers: int | None
    results: dict[str, LoadRun]
    gateway_throughput_ratio: float | None
    gateway_throughput_ratio_batching_off: float | None
    batching_throughput_ratio: float | None
    cpu_s_per_scan: dict[str, float]
    cpu_per_scan_ratio: float | None
    machine_busy_fraction: dict[str, float]
    stage_p50_ms: dict[str, dict[str, float]]

    @classmethod
    def from_json(cls, data: JsonObject) -> Throughput:
        return _read(
            cls,
            data,
            results=_runs(data.get("results")),
            cpu_s_per_scan=data.get("cpu_s_per_scan") or {},
            machine_busy_fraction=data.get("machine_busy_fraction") or {},
            stage_p50_ms=data.get("stage_p50_ms") or {},
        )


@dataclass(frozen=True)
class Upload:
    format: str | None
    mb: float | None
    gateway_p50_ms: float | None
    decode_p50_ms: float | None
    preprocess_p50_ms: float | None
    errors: int | None


@dataclass(frozen=True)
class Memory:
    """Gateway RSS / PSS while it serves concurrent DICOM zips."""

    input: str | None
    zip_mb: float | None
    concurrency: int | None
    idle_rss_mb: float | None
    peak_rss_mb: float | None
    peak_pss_mb: float | None
    processes: int | None
    samples: int | None
    per_process_peak_rss_mb: list[float] | None
    preprocess_workers: int | None
    requests: LoadRun
    stage_p50_ms: dict[str, float]

    @classmethod
    def from_json(cls, data: JsonObject) -> Memory:
        return _read(
            cls,
            data,
            requests=LoadRun.from_json(data.get("requests")),
            stage_p50_ms=data.get("stage_p50_ms") or {},
        )


@dataclass(frozen=True)
class LanePhase:
    """One phase of the priority-lane measurement: the probes, and the bulk load beside them."""

    bulk_clients: int | None
    bulk_priority: str | None
    probe_priority: str | None
    answered: int | None
    refused: dict[str, int]
    latency: Latency
    stage_p50_ms: dict[str, float]
    bulk_scans_per_s: float | None

    @classmethod
    def from_json(cls, data: JsonObject | None) -> LanePhase:
        data = data or {}
        probes = data.get("probes") or {}
        return _read(
            cls,
            data,
            answered=probes.get("answered"),
            refused=probes.get("refused") or {},
            latency=Latency.from_json(probes.get("latency")),
            stage_p50_ms=probes.get("stage_p50_ms") or {},
        )


@dataclass(frozen=True)
class Lanes:
    """STAT under bulk saturation, with lanes and without (benchmarks/lanes.py)."""

    input: str | None
    bulk_factor: int | None
    idle: LanePhase
    lanes: LanePhase
    no_lanes: LanePhase
    stat_latency_ratio: float | None
    stat_p99_ratio: float | None
    no_lanes_latency_ratio: float | None
    stat_refused: int | None

    @classmethod
    def from_json(cls, data: JsonObject) -> Lanes:
        phases = {key: LanePhase.from_json(data.get(key)) for key in ("idle", "lanes", "no_lanes")}
        return _read(cls, data, **phases)


@dataclass(frozen=True)
class ScanCpu:
    """CPU per scan by input kind, the decoding levers and the physical limits (benchmarks/scan_cpu.py)."""

    input: str | None
    per_kind: dict[str, Any]
    levers: dict[str, Any]
    limits: dict[str, Any]
    decoded_mb_s_per_core: dict[str, Any]

    @classmethod
    def from_json(cls, data: JsonObject) -> ScanCpu:
        return _read(
            cls,
            data,
            per_kind=data.get("per_kind") or {},
            levers=data.get("levers") or {},
            limits=data.get("limits") or {},
            decoded_mb_s_per_core=data.get("decoded_mb_s_per_core") or {},
        )

    def cpu_s(self, kind: str) -> float | None:
        row = self.per_kind.get(kind) or {}
        return row.get("cpu_s")


@dataclass(frozen=True)
class PerfRow:
    """One perf_analyzer concurrency level (the columns REPORT.md shows, in its order)."""

    concurrency: float | None
    inferences_per_s: float | None
    p50_ms: float | None
    p99_ms: float | None
    server_queue_ms: float | None
    server_compute_input_ms: float | None
    server_compute_infer_ms: float | None
    server_compute_output_ms: float | None
    network_ms: float | None


@dataclass(frozen=True)
class PerfAnalyzer:
    skipped: str | None = None
    command: str | None = None
    input: str | None = None
    rows: list[PerfRow] = field(default_factory=list)

    @classmethod
    def from_json(cls, data: JsonObject | None) -> PerfAnalyzer:
        return _read(cls, data, rows=[_read(PerfRow, row) for row in (data or {}).get("rows", [])])


@dataclass(frozen=True)
class Preprocess:
    """benchmarks/preprocess_bench.py: the two contract figures, and every scalar it reported, in order."""

    skipped: str | None = None
    preprocess_speedup: float | None = None
    preprocess_max_abs_prob_delta: float | None = None
    scalars: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: JsonObject | None) -> Preprocess:
        # Scalars only; per-case and decode tables stay in latest.json under "preprocess".
        scalars = {k: v for k, v in (data or {}).items() if isinstance(v, int | float | str | bool)}
        return _read(cls, data, scalars=scalars)


@dataclass(frozen=True)
class RuntimeRow:
    batch: int
    torch_eager_p50_ms: float
    onnxruntime_p50_ms: float
    ort_speedup: float
    max_abs_prob_delta: float


@dataclass(frozen=True)
class RuntimeModel:
    """ONNX Runtime vs torch eager for one model: rows per batch size, or why it was skipped."""

    skipped: str | None
    rows: list[RuntimeRow]

    @classmethod
    def from_json(cls, data: JsonObject | list[JsonObject] | None) -> RuntimeModel:
        if isinstance(data, dict) and data.get("skipped"):
            return cls(data["skipped"], [])
        return cls(
            None, [RuntimeRow(**{f.name: row[f.name] for f in fields(RuntimeRow)}) for row in data or []]
        )


#: The models `benchmarks/runtimes.py` compares, in report order.
RUNTIME_MODELS = ("demo", "vitb")


@dataclass(frozen=True)
class Runtimes:
    threads: int | None
    models: dict[str, RuntimeModel]

    @classmethod
    def from_json(cls, data: JsonObject) -> Runtimes:
        return cls(data.get("threads"), {m: RuntimeModel.from_json(data.get(m)) for m in RUNTIME_MODELS})


@dataclass(frozen=True)
class Environment:
    cpu_count: int | None = None
    load_avg_at_start: list[float] | None = None
    load_avg_at_end: list[float] | None = None
    blas: JsonObject | None = None

    def blas_sentence(self) -> str | None:
        """Which kernels each BLAS of the benchmark process ran, and who chose them."""
        libraries = (self.blas or {}).get("libraries") or []
        if not libraries:
            return None
        kernels = ", ".join(f"{lib.get('library')}: {lib.get('architecture')}" for lib in libraries)
        forced = ((self.blas or {}).get("env") or {}).get("OPENBLAS_CORETYPE")
        chooser = f"forced by OPENBLAS_CORETYPE={forced}" if forced else "OpenBLAS's own choice for this CPU"
        return f"BLAS kernels ({chooser}): {kernels}."


@dataclass(frozen=True)
class Parity:
    """Gateway and direct path on the same file."""

    gateway_vs_direct_max_abs_prob_delta: float | None


@dataclass(frozen=True)
class BenchResults:
    """The whole results dict; a section the run did not measure is None (or empty)."""

    mode: str | None
    started_utc: str | None
    elapsed_s: float | None
    environment: Environment
    overhead: Overhead | None
    parity: Parity | None
    throughput: Throughput | None
    sweep: list[LoadRun]
    uploads: list[Upload]
    memory: Memory | None
    perf_analyzer: PerfAnalyzer
    preprocess: Preprocess
    runtimes: Runtimes | None
    lanes: Lanes | None
    scan_cpu: ScanCpu | None

    @classmethod
    def from_json(cls, results: JsonObject) -> BenchResults:
        def section(key: str, parse: Any) -> Any:
            return parse(results[key]) if results.get(key) else None

        return cls(
            mode=results.get("mode"),
            started_utc=results.get("started_utc"),
            elapsed_s=results.get("elapsed_s"),
            environment=_read(Environment, results.get("environment")),
            overhead=section("overhead", Overhead.from_json),
            parity=section("parity", lambda data: _read(Parity, data)),
            throughput=section("throughput", Throughput.from_json),
            sweep=[LoadRun.from_json(run) for run in results.get("sweep") or []],
            uploads=[_read(Upload, upload) for upload in results.get("uploads") or []],
            memory=section("memory", Memory.from_json),
            perf_analyzer=PerfAnalyzer.from_json(results.get("perf_analyzer")),
            preprocess=Preprocess.from_json(results.get("preprocess")),
            runtimes=section("runtimes", Runtimes.from_json),
            lanes=section("lanes", Lanes.from_json),
            scan_cpu=section("scan_cpu", ScanCpu.from_json),
        )

    def latency_runs(self) -> list[LoadRun]:
        """Every gateway load run (c1, c8, sweep), for the concurrency table and plots."""
        runs = [
            self.overhead.gateway[k] for k in ("on", "off") if self.overhead and k in self.overhead.gateway
        ]
        if self.throughput:
            runs += [
                self.throughput.results[k] for k in ("on", "off", "direct") if k in self.throughput.results
            ]
        runs.extend(self.sweep)
        return sorted(runs, key=lambda r: (r.label, r.concurrency))


def _round(value: Any, digits: int = 4) -> Any:
    if not isinstance(value, float):
        return value
    # Tiny figures (a Δprobability of 1e-7) keep 3 significant digits instead of rounding to 0.
    return float(f"{value:.3g}") if value != 0 and abs(value) < 1e-3 else round(value, digits)


def _first(values: list[float] | None) -> float | None:
    return values[0] if values else None


def _figures(res: BenchResults) -> dict[str, Any]:
    """The contract figures (CONTRACT_KEYS), raw."""
    ov, tp, mem, pre = res.overhead, res.throughput, res.memory, res.preprocess
    return {
        "gateway_overhead_ratio": ov.ratio_batching_on if ov else None,
        "gateway_overhead_ci90_high": ov.ratio_ci90["on"][1] if ov and "on" in ov.ratio_ci90 else None,
        "gateway_throughput_ratio": tp.gateway_throughput_ratio if tp else None,
        "batching_throughput_ratio": tp.batching_throughput_ratio if tp else None,
        "preprocess_speedup": pre.preprocess_speedup,
        "preprocess_max_abs_prob_delta": pre.preprocess_max_abs_prob_delta,
        "gateway_peak_rss_mb": mem.peak_rss_mb if mem else None,
        "stat_latency_ratio": res.lanes.stat_latency_ratio if res.lanes else None,
        "dicom_zip_cpu_s": res.scan_cpu.cpu_s("dicom_zip_deflated") if res.scan_cpu else None,
        "nifti_gz_cpu_s": res.scan_cpu.cpu_s("nifti_gz") if res.scan_cpu else None,
    }


def summary(results: JsonObject) -> dict[str, Any]:
    """The contract line: the six ratios/figures, pass/miss per target and what the inputs were."""
    res = BenchResults.from_json(results)
    figures = _figures(res)
    out: dict[str, Any] = {key: _round(figures[key]) for key in CONTRACT_KEYS}
    out["targets"] = {t.key: t.check(figures[t.key]) for t in TARGETS if t.op}
    out["mode"] = res.mode
    out["gateway_peak_rss_input"] = res.memory.input if res.memory else None
    out["gateway_peak_pss_mb"] = res.memory.peak_pss_mb if res.memory else None
    out["perf_analyzer"] = "skipped" if res.perf_analyzer.skipped else "ran"
    out["elapsed_s"] = res.elapsed_s
    # A shared machine: the load average tells how much the other tenants disturbed this run.
    out["load_avg_1m"] = [_first(res.environment.load_avg_at_start), _first(res.environment.load_avg_at_end)]
    return out


# ---- REPORT.md ---------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if value != 0 and abs(value) < 1e-3:
            return f"{value:.{digits}g}"
        return f"{value:.1f}" if abs(value) >= 100 else f"{value:.{digits}f}"
    return str(value)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return lines


_THROUGHPUT_PATHS = (("on", "gateway batching on"), ("off", "gateway batching off"), ("direct", "direct"))


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def _latency_row(name: str, latency: Latency | None) -> list[Any]:
    lat = latency or Latency()
    return [name, lat.p50_ms, lat.p90_ms, lat.p99_ms, lat.count]


def _stage_list(stages: dict[str, Any]) -> str:
    return ", ".join(f"{k} {float(v):.0f}" for k, v in stages.items())


def _overhead_diagnostics(ov: Overhead) -> list[str]:
    stages = ov.gateway_stage_p50_ms
    gw = ov.gateway_p50_ms("on")
    if not (stages and gw is not None and ov.direct_p50_ms):
        return []
    cpu = sum(float(stages.get(k, 0.0)) for k in ("decode", "validate", "preprocess"))
    inner = sum(float(v) for k, v in stages.items() if k != "total")
    prepare = (ov.direct_prepare.p50_ms if ov.direct_prepare else None) or 0.0
    infer = (ov.direct_infer.p50_ms if ov.direct_infer else None) or 0.0
    total = float(stages.get("total", inner))
    out = [
        f"Overhead: the gateway's own decode+validate+preprocess p50s sum to {cpu:.0f} ms vs "
        f"{prepare:.0f} ms in-process; its infer stage {stages.get('infer', 0):.0f} ms vs {infer:.0f} ms "
        f"direct; queue {stages.get('queue', 0):.1f} ms. Inside the handler but outside the stages "
        f"(its `total` p50 minus the stage p50s) ≈ {total - inner:.0f} ms: receiving and spooling the "
        "upload, the readiness check, and handing the file to a worker process and the tensor back. "
        f"Outside the handler (client p50 minus `total`) ≈ {gw - total:.0f} ms: HTTP parsing, "
        "routing, JSON. p50s of parts do not add up exactly to the p50 of their sum."
    ]
    per_scan = ov.cpu_s_per_scan
    if per_scan:
        out.append(
            f"CPU-seconds per scan at concurrency 1: gateway on {per_scan.get('on')}, off "
            f"{per_scan.get('off')}, direct {per_scan.get('direct')} (on÷direct "
            f"{_fmt(ov.cpu_ratio_batching_on, 3)}): the CPU the gateway path adds, at any load."
        )
    off = ov.gateway_p50_ms("off")
    if off is not None:
        out.append(
            "Noise check: at concurrency 1 micro-batching cannot change latency by more than its few-ms "
            f"delay, yet the batching on/off p50s differ by {abs(gw - off):.0f} ms "
            f"({abs(gw - off) / off:.0%}): that is the run-to-run noise of this machine."
        )
    return out


def _throughput_diagnostics(tp: Throughput) -> list[str]:
    if not tp.results:
        return []
    on, off, direct = (
        tp.results[k].scans_per_s if k in tp.results else None for k in ("on", "off", "direct")
    )
    out = [
        f"Throughput at concurrency {tp.concurrency}: gateway batching on {on} scans/s, off "
        f"{off}, direct {direct} (on÷direct {_fmt(tp.gateway_throughput_ratio, 3)}, "
        f"off÷direct {_fmt(tp.gateway_throughput_ratio_batching_off, 3)}). Both paths are "
        "CPU-bound on the same cores (one preprocessing process per core plus Triton's ONNX Runtime), "
        "so the ratio mostly measures how well each keeps the cores busy."
    ]
    per_scan = tp.cpu_s_per_scan
    if per_scan:
        out.append(
            "CPU-seconds per scan (Triton + client + gateway processes; robust to other tenants' load): "
            f"gateway on {per_scan.get('on')}, off {per_scan.get('off')}, "
            f"direct {per_scan.get('direct')} "
            f"(on÷direct {_fmt(tp.cpu_per_scan_ratio, 3)}). With the cores saturated, throughput "
            "on a quiet machine is ≈ cores ÷ CPU-seconds per scan."
        )
    busy = tp.machine_busy_fraction
    if busy:
        out.append(
            "Machine CPU busy while each path ran (all processes on it): "
            + ", ".join(f"{name} {_pct(busy.get(key))}" for key, name in _THROUGHPUT_PATHS)
            + ". A path that leaves cores idle loses throughput to waiting, not to work."
        )
    for key, name in _THROUGHPUT_PATHS:
        stage = tp.stage_p50_ms.get(key)
        if stage:
            out.append(f"Stage p50s under load, {name} (ms): {_stage_list(stage)}.")
    return out


def _environment_diagnostics(env: Environment) -> list[str]:
    if env.load_avg_at_start is None:
        return []
    return [
        f"Load average (1/5/15 min) at start {env.load_avg_at_start} on {env.cpu_count} "
        "cores (what other tenants were using before the run: near or above the core count, expect "
        f"wider intervals); at end {env.load_avg_at_end}, which includes the run's own load."
    ]


def diagnostics(results: JsonObject) -> list[str]:
    """Sentences that locate where a ratio comes from (computed from this run's own numbers)."""
    return _diagnostics(BenchResults.from_json(results))


def _diagnostics(res: BenchResults) -> list[str]:
    out: list[str] = []
    if res.overhead:
        out += _overhead_diagnostics(res.overhead)
    if res.throughput:
        out += _throughput_diagnostics(res.throughput)
    return out + _environment_diagnostics(res.environment)


def _header_section(res: BenchResults) -> list[str]:
    return [
        "# HeadCT-Serve benchmark report",
        "",
        f"Mode **{res.mode}**, started {res.started_utc}, "
        f"{res.elapsed_s} s. "
        f"Machine: {res.environment.cpu_count} CPU cores, load average at start "
        f"{res.environment.load_avg_at_start} (shared machine: read the ratios, not the "
        "absolute numbers). Generated by `python -m benchmarks`; raw data in `latest.json`.",
        *(["", blas] if (blas := res.environment.blas_sentence()) else []),
        "",
        "All inputs are SYNTHETIC head CTs (atlas-based, `demo/synthetic_head.py`), served by the "
        "synthetic demo model; not for clinical use.",
    ]


def _targets_section(res: BenchResults, notes: dict[str, str] | None) -> list[str]:
    s = {key: _round(value) for key, value in _figures(res).items()}
    rows = [
        [
            f"`{target.key}`",
            _fmt(s.get(target.key), 4),
            target.text,
            target.check(s.get(target.key)),
            target.meaning + (f" {notes[target.key]}" if notes and target.key in notes else ""),
        ]
        for target in TARGETS
    ]
    return ["", "## Targets", "", *_table(["figure", "value", "target", "status", "what it means"], rows)]


def _latency_section(ov: Overhead, parity: Parity | None) -> list[str]:
    lines = [
        "",
        "## Latency of one scan (concurrency 1)",
        "",
        f"Input `{ov.input}` as NIfTI.gz. Gateway stage p50s come from the response's "
        "`timings_ms`; whatever the client sees beyond their sum is HTTP, upload spooling and JSON.",
        "",
    ]
    gateway = {key: run.latency for key, run in ov.gateway.items()}
    lines += _table(
        ["path", "p50 ms", "p90 ms", "p99 ms", "n"],
        [
            _latency_row("gateway, batching on", gateway.get("on")),
            _latency_row("gateway, batching off", gateway.get("off")),
            _latency_row("direct: decode+validate+preprocess in-process", ov.direct_prepare),
            _latency_row("direct: Triton gRPC infer", ov.direct_infer),
            ["direct: sum of p50s", ov.direct_p50_ms, None, None, None],
        ],
    )
    stages = ov.gateway_stage_p50_ms
    if stages:
        lines += [
            "",
            "Gateway stages (p50 ms, batching on): "
            + ", ".join(f"{k} {_fmt(v)}" for k, v in stages.items())
            + ".",
        ]
    lines += ["", f"Overhead ratio with batching off: {_fmt(ov.ratio_batching_off, 4)}."]
    if ov.ratio_ci90:
        lines += [
            "90 % bootstrap intervals of the overhead ratio (rounds resampled as pairs; how far this "
            "machine's noise can move the p50 ratio): "
            + "; ".join(
                f"batching {key} [{_fmt(low, 3)}, {_fmt(high, 3)}]"
                for key, (low, high) in ov.ratio_ci90.items()
            )
            + "."
        ]
    if parity:
        lines += [
            "Gateway and direct path agree: max |Δprobability| = "
            f"{_fmt(parity.gateway_vs_direct_max_abs_prob_delta)} on the same file."
        ]
    return lines


def _throughput_section(tp: Throughput) -> list[str]:
    lines = [
        "",
        f"## Throughput at concurrency {tp.concurrency}",
        "",
        f"Paths interleaved round by round; direct pool: {tp.direct_pool_workers} worker processes.",
        "",
    ]
    rows = []
    for key, name in (
        ("on", "gateway, batching on"),
        ("off", "gateway, batching off"),
        ("direct", "direct (pool + gRPC)"),
    ):
        r = tp.results.get(key) or LoadRun()
        rows.append([name, r.scans_per_s, r.latency.p50_ms, r.latency.p99_ms, r.completed, r.errors])
    lines += _table(["path", "scans/s", "p50 ms", "p99 ms", "ok", "errors"], rows)
    off_ratio = _fmt(tp.gateway_throughput_ratio_batching_off, 4)
    return [*lines, "", f"Gateway with batching off ÷ direct: {off_ratio}."]


def _concurrency_section(runs: list[LoadRun]) -> list[str]:
    lines = [
        "",
        "## Latency and throughput against concurrency",
        "",
        "![latency](latency_vs_concurrency.png)",
        "![throughput](throughput_vs_concurrency.png)",
        "",
    ]
    return lines + _table(
        ["path", "concurrency", "scans/s", "p50 ms", "p90 ms", "p99 ms", "errors"],
        [
            [
                r.label,
                r.concurrency,
                r.scans_per_s,
                r.latency.p50_ms,
                r.latency.p90_ms,
                r.latency.p99_ms,
                r.errors,
            ]
            for r in runs
        ],
    )


def _uploads_section(uploads: list[Upload]) -> list[str]:
    lines = ["", "## Upload cost of the same scan", "", "Gateway (batching on), concurrency 1.", ""]
    return lines + _table(
        ["format", "MB on the wire", "gateway p50 ms", "decode p50 ms", "preprocess p50 ms", "errors"],
        [[u.format, u.mb, u.gateway_p50_ms, u.decode_p50_ms, u.preprocess_p50_ms, u.errors] for u in uploads],
    )


def _memory_section(mem: Memory) -> list[str]:
    return [
        "",
        "## Gateway memory",
        "",
        f"{mem.concurrency} concurrent `{mem.input}` DICOM zips "
        f"({mem.zip_mb} MB each). "
        f"Idle RSS {mem.idle_rss_mb} MB; peak RSS {mem.peak_rss_mb} MB (PSS "
        f"{mem.peak_pss_mb} MB) over up to {mem.processes} processes, "
        f"{mem.samples} samples. "
        f"Requests: {mem.requests.completed} ok, {mem.requests.errors} errors, "
        f"p50 {mem.requests.latency.p50_ms} ms. Stage p50s (ms): " + _stage_list(mem.stage_p50_ms) + ". "
        f"Peak RSS per process (the gateway first, then its {mem.preprocess_workers} "
        "preprocessing workers and multiprocessing's resource tracker): "
        f"{mem.per_process_peak_rss_mb} MB; each worker holds one decoded series at a "
        "time, so the peak grows with HEADCT_PREPROCESS_WORKERS (default: CPU count, at most 8).",
    ]


_PERF_COLUMNS = {
    "concurrency": "concurrency",
    "infer/s": "inferences_per_s",
    "p50 ms": "p50_ms",
    "p99 ms": "p99_ms",
    "server queue ms": "server_queue_ms",
    "compute input ms": "server_compute_input_ms",
    "compute infer ms": "server_compute_infer_ms",
    "compute output ms": "server_compute_output_ms",
    "network ms": "network_ms",
}


def _perf_analyzer_section(pa: PerfAnalyzer) -> list[str]:
    lines = ["", "## perf_analyzer (Triton alone, server-side breakdown)", ""]
    if pa.skipped:
        return [*lines, f"Skipped: {pa.skipped}."]
    lines += [f"`perf_analyzer {pa.command}`, input {pa.input}.", ""]
    rows = sorted(pa.rows, key=lambda row: float(row.concurrency or 0))
    return lines + _table(
        list(_PERF_COLUMNS), [[getattr(row, name) for name in _PERF_COLUMNS.values()] for row in rows]
    )


def _preprocess_section(pre: Preprocess) -> list[str]:
    lines = ["", "## Preprocessing: production vs MONAI reference", ""]
    if pre.skipped:
        return [*lines, f"Skipped: {pre.skipped}."]
    lines += ["From `benchmarks/preprocess_bench.py` (per-case detail in `latest.json`):", ""]
    return lines + _table(["figure", "value"], [[f"`{k}`", v] for k, v in pre.scalars.items()])


def _runtimes_section(rt: Runtimes) -> list[str]:
    lines = [
        "",
        "## ONNX Runtime vs PyTorch eager (CPU)",
        "",
        f"{rt.threads} threads each; same graph and inputs.",
        "",
    ]
    rows: list[list[Any]] = []
    for name, model in rt.models.items():
        if model.skipped:
            rows.append([name, "skipped", model.skipped, None, None, None])
            continue
        rows += [
            [name, r.batch, r.torch_eager_p50_ms, r.onnxruntime_p50_ms, r.ort_speedup, r.max_abs_prob_delta]
            for r in model.rows
        ]
    return lines + _table(
        ["model", "batch", "torch eager p50 ms", "ORT p50 ms", "ORT speed-up", "max abs Δp"], rows
    )


_GPU_SECTION = [
    "",
    "## GPU",
    "",
    "`benchmarks/gpu_bench.py` (full-size ViT-B, bf16, SDPA, batch 1–64) is prepared for "
    "an H200; no GPU figures are reported here unless `gpu.json` sits beside this report.",
]


def _lanes_section(lanes: Lanes) -> list[str]:
    def row(name: str, phase: LanePhase) -> list[Any]:
        refused = ", ".join(f"{code} {n}" for code, n in phase.refused.items()) or "0"
        return [
            name,
            phase.bulk_clients,
            phase.answered,
            refused,
            phase.latency.p50_ms,
            phase.latency.p99_ms,
            _stage_list(phase.stage_p50_ms),
            phase.bulk_scans_per_s,
        ]

    header = ["phase", "bulk clients", "probes answered", "probes refused", "p50 ms", "p99 ms"]
    rows = [
        row("idle (STAT probes)", lanes.idle),
        row("bulk saturation, lanes (STAT probes)", lanes.lanes),
        row("bulk saturation, no lanes (all routine)", lanes.no_lanes),
    ]
    return [
        "",
        "## STAT under bulk saturation (priority lanes)",
        "",
        f"Input `{lanes.input}` as NIfTI.gz; one gateway with 4 in-flight slots, "
        f"{lanes.bulk_factor}x as many closed-loop bulk clients (each honours Retry-After), STAT probes "
        "one at a time among them. "
        f"`stat_latency_ratio` {_fmt(lanes.stat_latency_ratio)} (p99 ÷ idle p50: "
        f"{_fmt(lanes.stat_p99_ratio)}); the same load without lanes: {_fmt(lanes.no_lanes_latency_ratio)}.",
        "",
        *_table([*header, "probe stage p50s (ms)", "bulk scans/s"], rows),
    ]


def _scan_cpu_section(cpu: ScanCpu) -> list[str]:
    kinds = [
        [
            kind,
            row.get("file_mb"),
            row.get("cpu_s"),
            _fmt(row.get("target_s")),
            row.get("status") or "—",
            _stage_list({k: 1000 * v for k, v in (row.get("stages_s") or {}).items()}),
            cpu.decoded_mb_s_per_core.get(kind),
        ]
        for kind, row in cpu.per_kind.items()
    ]
    levers = [
        [name, lever.get("before_s"), lever.get("after_s"), lever.get("speedup")]
        for name, lever in cpu.levers.items()
    ]
    limits = cpu.limits
    return [
        "",
        "## CPU per scan, by input kind",
        "",
        f"Input `{cpu.input}`; decode + validate + preprocess in one process with BLAS single-threaded, "
        "as a preprocessing worker runs it; median CPU seconds (benchmarks/scan_cpu.py).",
        "",
        *_table(["input", "file MB", "CPU s", "target", "status", "stages (ms)", "decoded MB/s"], kinds),
        "",
        "Levers, old way vs new way on the same bytes (CPU seconds per scan; `result_transfer_wall`: wall "
        "seconds in the gateway, one worker; `triton_input_wall`: wall seconds of one Triton call, the "
        "model input in the gRPC message vs read in place from shared memory). Levers measured apart "
        "(they need a process or an old code path of their own) are listed below the table.",
        "",
        *_table(["lever", "before", "after", "speed-up"], levers),
        "",
        *[f"- {line}" for line in LEVERS_MEASURED_APART],
        "",
        f"Physical limits on this core for the {_fmt(limits.get('pixels_mb'))} MB of int16 pixels: memcpy "
        f"{_fmt(limits.get('memcpy_mb_s'))} MB/s, zlib inflate {_fmt(limits.get('zlib_inflate_mb_s'))} MB/s, "
        f"ISA-L inflate {_fmt(limits.get('isal_inflate_mb_s'))} MB/s.",
    ]


def render_markdown(results: JsonObject, notes: dict[str, str] | None = None) -> str:
    res = BenchResults.from_json(results)
    lines = _header_section(res) + _targets_section(res, notes)
    diag = _diagnostics(res)
    if diag:
        lines += ["", "## Where the ratios come from", ""] + [f"- {sentence}" for sentence in diag]
    if res.overhead:
        lines += _latency_section(res.overhead, res.parity)
    if res.throughput:
        lines += _throughput_section(res.throughput)
    runs = res.latency_runs()
    if runs:
        lines += _concurrency_section(runs)
    if res.uploads:
        lines += _uploads_section(res.uploads)
    if res.memory:
        lines += _memory_section(res.memory)
    if res.lanes:
        lines += _lanes_section(res.lanes)
    if res.scan_cpu:
        lines += _scan_cpu_section(res.scan_cpu)
    lines += ["", "## Stage breakdown", "", "![stages](stage_breakdown.png)"]
    lines += _perf_analyzer_section(res.perf_analyzer) + _preprocess_section(res.preprocess)
    if res.runtimes:
        lines += _runtimes_section(res.runtimes)
    return "\n".join(lines + _GPU_SECTION) + "\n"


# ---- plots -------------------------------------------------------------------------------------


def _series(
    runs: list[LoadRun], label: str | None, value: Callable[[LoadRun], float | None]
) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in runs:
        v = value(r)
        if r.label == label and v is not None:
            xs.append(r.concurrency)
            ys.append(v)
    return xs, ys


def _save(
    fig: Any, ax: Any, path: Path, *, xlabel: str = "concurrency (closed loop)", grid: bool = True
) -> Path:
    """Finish one figure (x label, light grid) and write it as a PNG."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    if grid:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_latency(runs: list[LoadRun], labels: list[Any], path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    palette = plt.get_cmap("tab10")
    for index, label in enumerate(labels):  # one colour per path, one line style per percentile
        for pct, style in (("p50_ms", "-o"), ("p90_ms", "--^"), ("p99_ms", ":s")):
            xs, ys = _series(runs, label, lambda r, p=pct: getattr(r.latency, p))
            if xs:
                ax.plot(xs, ys, style, color=palette(index), label=f"{label} {pct[:-3]}")
    ax.set_ylabel("latency per scan (ms)")
    ax.set_title("Latency percentiles against concurrency")
    ax.legend(fontsize=7)
    return _save(fig, ax, path)


def _plot_throughput(runs: list[LoadRun], labels: list[Any], path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in labels:
        xs, ys = _series(runs, label, lambda r: r.scans_per_s)
        if xs:
            ax.plot(xs, ys, "-o", label=label)
    ax.set_ylabel("scans / s")
    ax.set_title("Throughput against concurrency")
    ax.legend(fontsize=8)
    return _save(fig, ax, path)


def _stage_bars(ov: Overhead) -> dict[str, list[tuple[str, float]]]:
    """Stacked segments (name, p50 ms) per bar: the gateway's stages in pipeline order, the direct path."""
    stages = ov.gateway_stage_p50_ms
    gateway_total = ov.gateway_p50_ms("on") or 0.0
    pipeline = ("decode", "validate", "preprocess", "queue", "infer")  # the order a scan goes through
    parts = [(k, float(stages[k])) for k in pipeline if k in stages]
    parts += [(k, float(v)) for k, v in stages.items() if k not in pipeline and k != "total"]
    other = max(0.0, gateway_total - sum(v for _, v in parts))
    return {
        "gateway (c=1)": [*parts, ("upload+worker hand-over+http", other)],
        "direct (c=1)": [
            ("decode+validate+preprocess", (ov.direct_prepare.p50_ms if ov.direct_prepare else None) or 0.0),
            ("infer (direct gRPC)", (ov.direct_infer.p50_ms if ov.direct_infer else None) or 0.0),
        ],
    }


def _plot_stage_breakdown(ov: Overhead, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.2))
    bars = _stage_bars(ov)
    colors = plt.get_cmap("tab10")
    names = list(dict.fromkeys(name for segs in bars.values() for name, _ in segs))
    for y, segs in enumerate(bars.values()):
        left = 0.0
        for name, width in segs:
            ax.barh(
                y,
                width,
                left=left,
                color=colors(names.index(name) % 10),
                label=name if y == 0 or name not in [n for n, _ in bars["gateway (c=1)"]] else None,
            )
            left += width
    ax.set_yticks(range(len(bars)), list(bars))
    ax.set_title("Where one scan's time goes")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=4)
    return _save(fig, ax, path, xlabel="p50 ms", grid=False)


def write_plots(results: JsonObject, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # headless: files only

    res = BenchResults.from_json(results)
    written: list[Path] = []
    runs = res.latency_runs()
    if runs:
        labels = sorted({r.label for r in runs})
        written.append(_plot_latency(runs, labels, out_dir / "latency_vs_concurrency.png"))
        written.append(_plot_throughput(runs, labels, out_dir / "throughput_vs_concurrency.png"))
    if res.overhead and res.overhead.gateway_stage_p50_ms:
        written.append(_plot_stage_breakdown(res.overhead, out_dir / "stage_breakdown.png"))
    return written


def write_all(results: JsonObject, out_dir: Path) -> dict[str, Any]:
    """latest.json, REPORT.md and the plots; returns the contract summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    line = summary(results)
    results = {**results, "summary": line}
    (out_dir / "latest.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    write_plots(results, out_dir)
    (out_dir / "REPORT.md").write_text(render_markdown(results))
    return line
