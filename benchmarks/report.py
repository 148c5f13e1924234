"""Targets, the one-line contract summary, REPORT.md and the PNG plots, from the results dict."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: The keys of `make bench-quick`'s last line (shared/api-contract.md), in contract order.
CONTRACT_KEYS = (
    "gateway_overhead_ratio",
    "gateway_throughput_ratio",
    "batching_throughput_ratio",
    "preprocess_speedup",
    "preprocess_max_abs_prob_delta",
    "gateway_peak_rss_mb",
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
        1.15,
        "p50 of POST /v1/predict (NIfTI.gz, one request at a time) ÷ (p50 in-process "
        "decode+validate+preprocess "
        "of the same file + p50 direct Triton gRPC inference of the same tensor): what HTTP, spooling, "
        "scheduling and JSON add to one scan's latency.",
    ),
    Target(
        "gateway_throughput_ratio",
        ">=",
        0.9,
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
        2500.0,
        "Peak RSS summed over the gateway and all its child processes while it serves 8 concurrent DICOM "
        "zips (sampled from /proc every 50 ms; shared copy-on-write pages count once per process, so this "
        "over-states real use; PSS is reported beside it).",
    ),
)


def _get(results: dict[str, Any], *path: str) -> Any:
    """`results[path[0]][path[1]]...`, or None where missing; a digit string indexes a list."""
    node: Any = results
    for key in path:
        if isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
        elif isinstance(node, dict) and key in node:
            node = node[key]
        else:
            return None
    return node


def _round(value: Any, digits: int = 4) -> Any:
    if not isinstance(value, float):
        return value
    # Tiny figures (a Δprobability of 1e-7) keep 3 significant digits instead of rounding to 0.
    return float(f"{value:.3g}") if value != 0 and abs(value) < 1e-3 else round(value, digits)


def summary(results: dict[str, Any]) -> dict[str, Any]:
    """The contract line: the six ratios/figures, pass/miss per target and what the inputs were."""
    figures = {
        "gateway_overhead_ratio": _get(results, "overhead", "ratio_batching_on"),
        "gateway_throughput_ratio": _get(results, "throughput", "gateway_throughput_ratio"),
        "batching_throughput_ratio": _get(results, "throughput", "batching_throughput_ratio"),
        "preprocess_speedup": _get(results, "preprocess", "preprocess_speedup"),
        "preprocess_max_abs_prob_delta": _get(results, "preprocess", "preprocess_max_abs_prob_delta"),
        "gateway_peak_rss_mb": _get(results, "memory", "peak_rss_mb"),
    }
    out: dict[str, Any] = {key: _round(figures[key]) for key in CONTRACT_KEYS}
    out["targets"] = {t.key: t.check(figures[t.key]) for t in TARGETS if t.op}
    out["mode"] = results.get("mode")
    out["gateway_peak_rss_input"] = _get(results, "memory", "input")
    out["gateway_peak_pss_mb"] = _get(results, "memory", "peak_pss_mb")
    out["perf_analyzer"] = "skipped" if _get(results, "perf_analyzer", "skipped") else "ran"
    out["elapsed_s"] = results.get("elapsed_s")
    # A shared machine: the load average tells how much the other tenants disturbed this run.
    out["load_avg_1m"] = [
        _get(results, "environment", "load_avg_at_start", "0"),
        _get(results, "environment", "load_avg_at_end", "0"),
    ]
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


def _latency_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every gateway load result (c1, c8, sweep) as flat rows, for the concurrency table and plots."""
    rows = []
    for key in ("on", "off"):
        c1 = _get(results, "overhead", "gateway", key)
        if c1:
            rows.append(c1)
    for key in ("on", "off", "direct"):
        c8 = _get(results, "throughput", "results", key)
        if c8:
            rows.append(c8)
    rows.extend(results.get("sweep") or [])
    return sorted(rows, key=lambda r: (r["label"], r["concurrency"]))


_THROUGHPUT_PATHS = (("on", "gateway batching on"), ("off", "gateway batching off"), ("direct", "direct"))


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def _values(mapping: dict[str, Any] | None, *keys: str) -> list[Any]:
    """`mapping[key]` for each key, None where missing (a table row from a results dict)."""
    return [(mapping or {}).get(key) for key in keys]


def _latency_row(name: str, latency: dict[str, Any] | None) -> list[Any]:
    return [name, *_values(latency, "p50_ms", "p90_ms", "p99_ms", "count")]


def diagnostics(results: dict[str, Any]) -> list[str]:
    """Sentences that locate where a ratio comes from (computed from this run's own numbers)."""
    out: list[str] = []
    ov = results.get("overhead") or {}
    stages = ov.get("gateway_stage_p50_ms") or {}
    gw = _get(ov, "gateway", "on", "latency", "p50_ms")
    if stages and gw is not None and ov.get("direct_p50_ms"):
        cpu = sum(float(stages.get(k, 0.0)) for k in ("decode", "validate", "preprocess"))
        inner = sum(float(v) for k, v in stages.items() if k != "total")
        prepare = _get(ov, "direct_prepare", "p50_ms") or 0.0
        infer = _get(ov, "direct_infer", "p50_ms") or 0.0
        total = float(stages.get("total", inner))
        out.append(
            f"Overhead: the gateway's own decode+validate+preprocess p50s sum to {cpu:.0f} ms vs "
            f"{prepare:.0f} ms in-process; its infer stage {stages.get('infer', 0):.0f} ms vs {infer:.0f} ms "
            f"direct; queue {stages.get('queue', 0):.1f} ms. Inside the handler but outside the stages "
            f"(its `total` p50 minus the stage p50s) ≈ {total - inner:.0f} ms: receiving and spooling the "
            "upload, the readiness check, and handing the file to a worker process and the tensor back. "
            f"Outside the handler (client p50 minus `total`) ≈ {gw - total:.0f} ms: HTTP parsing, "
            "routing, JSON. p50s of parts do not add up exactly to the p50 of their sum."
        )
        per_scan = ov.get("cpu_s_per_scan") or {}
        if per_scan:
            out.append(
                f"CPU-seconds per scan at concurrency 1: gateway on {per_scan.get('on')}, off "
                f"{per_scan.get('off')}, direct {per_scan.get('direct')} (on÷direct "
                f"{_fmt(ov.get('cpu_ratio_batching_on'), 3)}): the CPU the gateway path adds, at any load."
            )
        off = _get(ov, "gateway", "off", "latency", "p50_ms")
        if off is not None:
            out.append(
                "Noise check: at concurrency 1 micro-batching cannot change latency by more than its few-ms "
                f"delay, yet the batching on/off p50s differ by {abs(gw - off):.0f} ms "
                f"({abs(gw - off) / off:.0%}): that is the run-to-run noise of this machine."
            )
    tp = results.get("throughput") or {}
    if tp.get("results"):
        on, off_tp, direct_tp = (_get(tp, "results", k, "scans_per_s") for k in ("on", "off", "direct"))
        out.append(
            f"Throughput at concurrency {tp.get('concurrency')}: gateway batching on {on} scans/s, off "
            f"{off_tp}, direct {direct_tp} (on÷direct {_fmt(tp.get('gateway_throughput_ratio'), 3)}, "
            f"off÷direct {_fmt(tp.get('gateway_throughput_ratio_batching_off'), 3)}). Both paths are "
            "CPU-bound on the same cores (one preprocessing process per core plus Triton's ONNX Runtime), "
            "so the ratio mostly measures how well each keeps the cores busy."
        )
        per_scan = tp.get("cpu_s_per_scan") or {}
        if per_scan:
            out.append(
                "CPU-seconds per scan (Triton + client + gateway processes; robust to other tenants' load): "
                f"gateway on {per_scan.get('on')}, off {per_scan.get('off')}, "
                f"direct {per_scan.get('direct')} "
                f"(on÷direct {_fmt(tp.get('cpu_per_scan_ratio'), 3)}). With the cores saturated, throughput "
                "on a quiet machine is ≈ cores ÷ CPU-seconds per scan."
            )
        busy = tp.get("machine_busy_fraction") or {}
        if busy:
            out.append(
                "Machine CPU busy while each path ran (all processes on it): "
                + ", ".join(f"{name} {_pct(busy.get(key))}" for key, name in _THROUGHPUT_PATHS)
                + ". A path that leaves cores idle loses throughput to waiting, not to work."
            )
        for key, name in _THROUGHPUT_PATHS:
            stage = _get(tp, "stage_p50_ms", key)
            if stage:
                listed = ", ".join(f"{k} {float(v):.0f}" for k, v in stage.items())
                out.append(f"Stage p50s under load, {name} (ms): {listed}.")
    env = results.get("environment") or {}
    if env.get("load_avg_at_start") is not None:
        out.append(
            f"Load average (1/5/15 min) at start {env.get('load_avg_at_start')} on {env.get('cpu_count')} "
            "cores (what other tenants were using before the run: near or above the core count, expect "
            f"wider intervals); at end {env.get('load_avg_at_end')}, which includes the run's own load."
        )
    return out


def render_markdown(results: dict[str, Any], notes: dict[str, str] | None = None) -> str:
    s = summary(results)
    lines = [
        "# HeadCT-Serve benchmark report",
        "",
        f"Mode **{results.get('mode')}**, started {results.get('started_utc')}, "
        f"{results.get('elapsed_s')} s. "
        f"Machine: {_get(results, 'environment', 'cpu_count')} CPU cores, load average at start "
        f"{_get(results, 'environment', 'load_avg_at_start')} (shared machine: read the ratios, not the "
        "absolute numbers). Generated by `python -m benchmarks`; raw data in `latest.json`.",
        "",
        "All inputs are SYNTHETIC head CTs (atlas-based, `export/demo/synthetic_head.py`), served by the "
        "synthetic demo model; not for clinical use.",
        "",
        "## Targets",
        "",
    ]
    rows = []
    for target in TARGETS:
        rows.append(
            [
                f"`{target.key}`",
                _fmt(s.get(target.key), 4),
                target.text,
                target.check(s.get(target.key)),
                target.meaning + (f" {notes[target.key]}" if notes and target.key in notes else ""),
            ]
        )
    lines += _table(["figure", "value", "target", "status", "what it means"], rows)

    diag = diagnostics(results)
    if diag:
        lines += ["", "## Where the ratios come from", ""] + [f"- {sentence}" for sentence in diag]

    ov = results.get("overhead") or {}
    if ov:
        lines += [
            "",
            "## Latency of one scan (concurrency 1)",
            "",
            f"Input `{ov.get('input')}` as NIfTI.gz. Gateway stage p50s come from the response's "
            "`timings_ms`; whatever the client sees beyond their sum is HTTP, upload spooling and JSON.",
            "",
        ]
        lines += _table(
            ["path", "p50 ms", "p90 ms", "p99 ms", "n"],
            [
                _latency_row("gateway, batching on", _get(ov, "gateway", "on", "latency")),
                _latency_row("gateway, batching off", _get(ov, "gateway", "off", "latency")),
                _latency_row("direct: decode+validate+preprocess in-process", ov.get("direct_prepare")),
                _latency_row("direct: Triton gRPC infer", ov.get("direct_infer")),
                ["direct: sum of p50s", ov.get("direct_p50_ms"), None, None, None],
            ],
        )
        stages = ov.get("gateway_stage_p50_ms") or {}
        if stages:
            lines += [
                "",
                "Gateway stages (p50 ms, batching on): "
                + ", ".join(f"{k} {_fmt(v)}" for k, v in stages.items())
                + ".",
            ]
        lines += ["", f"Overhead ratio with batching off: {_fmt(ov.get('ratio_batching_off'), 4)}."]
        interval = ov.get("ratio_ci90") or {}
        if interval:
            lines += [
                "90 % bootstrap intervals of the overhead ratio (rounds resampled as pairs; how far this "
                "machine's noise can move the p50 ratio): "
                + "; ".join(
                    f"batching {key} [{_fmt(low, 3)}, {_fmt(high, 3)}]"
                    for key, (low, high) in interval.items()
                )
                + "."
            ]
        parity = results.get("parity") or {}
        if parity:
            lines += [
                f"Gateway and direct path agree: max |Δprobability| = "
                f"{_fmt(parity.get('gateway_vs_direct_max_abs_prob_delta'))} on the same file."
            ]

    tp = results.get("throughput") or {}
    if tp:
        lines += [
            "",
            f"## Throughput at concurrency {tp.get('concurrency')}",
            "",
            f"Paths interleaved round by round; direct pool: {tp.get('direct_pool_workers')} "
            "worker processes.",
            "",
        ]
        trows = []
        for key, name in (
            ("on", "gateway, batching on"),
            ("off", "gateway, batching off"),
            ("direct", "direct (pool + gRPC)"),
        ):
            r = _get(tp, "results", key) or {}
            lat = r.get("latency") or {}
            trows.append(
                [
                    name,
                    r.get("scans_per_s"),
                    *_values(lat, "p50_ms", "p99_ms"),
                    *_values(r, "completed", "errors"),
                ]
            )
        lines += _table(["path", "scans/s", "p50 ms", "p99 ms", "ok", "errors"], trows)
        lines += [
            "",
            "Gateway with batching off ÷ direct: "
            f"{_fmt(tp.get('gateway_throughput_ratio_batching_off'), 4)}.",
        ]

    rows_all = _latency_rows(results)
    if rows_all:
        lines += [
            "",
            "## Latency and throughput against concurrency",
            "",
            "![latency](latency_vs_concurrency.png)",
            "![throughput](throughput_vs_concurrency.png)",
            "",
        ]
        lines += _table(
            ["path", "concurrency", "scans/s", "p50 ms", "p90 ms", "p99 ms", "errors"],
            [
                [
                    *_values(r, "label", "concurrency", "scans_per_s"),
                    *_values(r.get("latency"), "p50_ms", "p90_ms", "p99_ms"),
                    r["errors"],
                ]
                for r in rows_all
            ],
        )

    if results.get("uploads"):
        lines += ["", "## Upload cost of the same scan", "", "Gateway (batching on), concurrency 1.", ""]
        lines += _table(
            ["format", "MB on the wire", "gateway p50 ms", "decode p50 ms", "preprocess p50 ms", "errors"],
            [
                _values(u, "format", "mb", "gateway_p50_ms", "decode_p50_ms", "preprocess_p50_ms", "errors")
                for u in results["uploads"]
            ],
        )

    mem = results.get("memory") or {}
    if mem:
        lines += [
            "",
            "## Gateway memory",
            "",
            f"{mem.get('concurrency')} concurrent `{mem.get('input')}` DICOM zips "
            f"({mem.get('zip_mb')} MB each). "
            f"Idle RSS {mem.get('idle_rss_mb')} MB; peak RSS {mem.get('peak_rss_mb')} MB (PSS "
            f"{mem.get('peak_pss_mb')} MB) over up to {mem.get('processes')} processes, "
            f"{mem.get('samples')} samples. "
            f"Requests: {_get(mem, 'requests', 'completed')} ok, {_get(mem, 'requests', 'errors')} errors, "
            f"p50 {_get(mem, 'requests', 'latency', 'p50_ms')} ms. Stage p50s (ms): "
            + ", ".join(f"{k} {float(v):.0f}" for k, v in (mem.get("stage_p50_ms") or {}).items())
            + ". "
            f"Peak RSS per process (the gateway first, then its {mem.get('preprocess_workers')} "
            "preprocessing workers and multiprocessing's resource tracker): "
            f"{mem.get('per_process_peak_rss_mb')} MB; each worker holds one decoded series at a "
            "time, so the peak grows with HEADCT_PREPROCESS_WORKERS (default: CPU count, at most 8).",
        ]

    lines += ["", "## Stage breakdown", "", "![stages](stage_breakdown.png)"]

    pa = results.get("perf_analyzer") or {}
    lines += ["", "## perf_analyzer (Triton alone, server-side breakdown)", ""]
    if pa.get("skipped"):
        lines += [f"Skipped: {pa['skipped']}."]
    else:
        lines += [f"`perf_analyzer {pa.get('command')}`, input {pa.get('input')}.", ""]
        lines += _table(
            [
                "concurrency",
                "infer/s",
                "p50 ms",
                "p99 ms",
                "server queue ms",
                "compute input ms",
                "compute infer ms",
                "compute output ms",
                "network ms",
            ],
            [
                _values(
                    r,
                    "concurrency",
                    "inferences_per_s",
                    "p50_ms",
                    "p99_ms",
                    "server_queue_ms",
                    "server_compute_input_ms",
                    "server_compute_infer_ms",
                    "server_compute_output_ms",
                    "network_ms",
                )
                for r in sorted(pa.get("rows", []), key=lambda row: float(row.get("concurrency") or 0))
            ],
        )

    pre = results.get("preprocess") or {}
    lines += ["", "## Preprocessing: production vs MONAI reference", ""]
    if pre.get("skipped"):
        lines += [f"Skipped: {pre['skipped']}."]
    else:
        # Scalars here; per-case and decode tables stay in latest.json under "preprocess".
        scalars = [[f"`{k}`", v] for k, v in pre.items() if isinstance(v, int | float | str | bool)]
        lines += ["From `benchmarks/preprocess_bench.py` (per-case detail in `latest.json`):", ""]
        lines += _table(["figure", "value"], scalars)

    rt = results.get("runtimes") or {}
    if rt:
        lines += [
            "",
            "## ONNX Runtime vs PyTorch eager (CPU)",
            "",
            f"{rt.get('threads')} threads each; same graph and inputs.",
            "",
        ]
        trows = []
        for model in ("demo", "vitb"):
            entry = rt.get(model)
            if isinstance(entry, dict) and entry.get("skipped"):
                trows.append([model, "skipped", entry["skipped"], None, None, None])
                continue
            for r in entry or []:
                trows.append(
                    [
                        model,
                        r["batch"],
                        r["torch_eager_p50_ms"],
                        r["onnxruntime_p50_ms"],
                        r["ort_speedup"],
                        r["max_abs_prob_delta"],
                    ]
                )
        lines += _table(
            ["model", "batch", "torch eager p50 ms", "ORT p50 ms", "ORT speed-up", "max abs Δp"], trows
        )
    lines += [
        "",
        "## GPU",
        "",
        "`benchmarks/gpu_bench.py` (full-size ViT-B, bf16, SDPA, batch 1–64) is prepared for "
        "an H200; no GPU figures are reported here unless `gpu.json` sits beside this report.",
    ]
    return "\n".join(lines) + "\n"


# ---- plots -------------------------------------------------------------------------------------


def _series(
    rows: list[dict[str, Any]], label: str, value: Callable[[dict[str, Any]], float | None]
) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in rows:
        v = value(r)
        if r["label"] == label and v is not None:
            xs.append(r["concurrency"])
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


def write_plots(results: dict[str, Any], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # headless: files only
    import matplotlib.pyplot as plt

    written: list[Path] = []
    rows = _latency_rows(results)
    labels = sorted({r["label"] for r in rows})
    if rows:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        palette = plt.get_cmap("tab10")
        for index, label in enumerate(labels):  # one colour per path, one line style per percentile
            for pct, style in (("p50_ms", "-o"), ("p90_ms", "--^"), ("p99_ms", ":s")):
                xs, ys = _series(rows, label, lambda r, p=pct: _get(r, "latency", p))
                if xs:
                    ax.plot(xs, ys, style, color=palette(index), label=f"{label} {pct[:-3]}")
        ax.set_ylabel("latency per scan (ms)")
        ax.set_title("Latency percentiles against concurrency")
        ax.legend(fontsize=7)
        written.append(_save(fig, ax, out_dir / "latency_vs_concurrency.png"))

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label in labels:
            xs, ys = _series(rows, label, lambda r: r["scans_per_s"])
            if xs:
                ax.plot(xs, ys, "-o", label=label)
        ax.set_ylabel("scans / s")
        ax.set_title("Throughput against concurrency")
        ax.legend(fontsize=8)
        written.append(_save(fig, ax, out_dir / "throughput_vs_concurrency.png"))

    ov = results.get("overhead") or {}
    stages = ov.get("gateway_stage_p50_ms") or {}
    if stages:
        fig, ax = plt.subplots(figsize=(8, 4.2))
        gateway_total = _get(ov, "gateway", "on", "latency", "p50_ms") or 0.0
        pipeline = ("decode", "validate", "preprocess", "queue", "infer")  # the order a scan goes through
        parts = [(k, float(stages[k])) for k in pipeline if k in stages]
        parts += [(k, float(v)) for k, v in stages.items() if k not in pipeline and k != "total"]
        other = max(0.0, gateway_total - sum(v for _, v in parts))
        bars = {
            "gateway (c=1)": [*parts, ("upload+worker hand-over+http", other)],
            "direct (c=1)": [
                ("decode+validate+preprocess", _get(ov, "direct_prepare", "p50_ms") or 0.0),
                ("infer (direct gRPC)", _get(ov, "direct_infer", "p50_ms") or 0.0),
            ],
        }
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
        written.append(_save(fig, ax, out_dir / "stage_breakdown.png", xlabel="p50 ms", grid=False))
    return written


def write_all(results: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """latest.json, REPORT.md and the plots; returns the contract summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    line = summary(results)
    results = {**results, "summary": line}
    (out_dir / "latest.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    write_plots(results, out_dir)
    (out_dir / "REPORT.md").write_text(render_markdown(results))
    return line
