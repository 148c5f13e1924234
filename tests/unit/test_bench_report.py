"""Benchmark report: target checks, the contract summary line, REPORT.md and plots; the GPU script's
CPU dry run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import gpu_bench, report
from export.model import ViTConfig

LATENCY = {"p50_ms": 1100.0, "p90_ms": 1200.0, "p99_ms": 1300.0}


def _results(overhead: float | None, rss: float) -> dict:
    return {
        "mode": "quick",
        "overhead": {
            "ratio_batching_on": overhead,
            "ratio_ci90": {"on": [0.97, 1.12]},
            "gateway": {"on": {"label": "gateway-batching-on", "concurrency": 1, "scans_per_s": 1.0,
                               "errors": 0, "latency": LATENCY}},
            "gateway_stage_p50_ms": {"decode": 100.0, "preprocess": 800.0, "infer": 100.0},
            "direct_prepare": {"p50_ms": 880.0},
            "direct_infer": {"p50_ms": 90.0},
        },
        "throughput": {"gateway_throughput_ratio": 0.95, "batching_throughput_ratio": 1.2},
        "preprocess": {"preprocess_speedup": 25.0, "preprocess_max_abs_prob_delta": 0.02},
        "memory": {"peak_rss_mb": rss, "input": "head-thin"},
        "perf_analyzer": {"skipped": "not installed"},
        "scan_cpu": {
            "input": "head-1mm", "levers": {"gzip": {"before_s": 0.3, "after_s": 0.1, "speedup": 3.0}},
            "limits": {"pixels_mb": 104.9, "memcpy_mb_s": 2000.0},
            "per_kind": {
                "dicom_zip_deflated": {"cpu_s": 0.6, "target_s": 0.35, "status": "MISS",
                                       "stages_s": {"decode": 0.4}},
                "nifti_gz": {"cpu_s": 0.2, "target_s": 0.25, "status": "pass", "stages_s": {"decode": 0.1}},
            },
        },
        "lanes": {
            "input": "head-5mm", "bulk_factor": 4, "stat_latency_ratio": 1.2, "stat_p99_ratio": 1.6,
            "no_lanes_latency_ratio": 7.3, "stat_refused": 0,
            "idle": {"bulk_clients": 0, "probes": {"answered": 8, "refused": {}, "latency": LATENCY}},
            "scan_cpu": {
            "input": "head-1mm", "levers": {"gzip": {"before_s": 0.3, "after_s": 0.1, "speedup": 3.0}},
            "limits": {"pixels_mb": 104.9, "memcpy_mb_s": 2000.0},
            "per_kind": {
                "dicom_zip_deflated": {"cpu_s": 0.6, "target_s": 0.35, "status": "MISS",
                                       "stages_s": {"decode": 0.4}},
                "nifti_gz": {"cpu_s": 0.2, "target_s": 0.25, "status": "pass", "stages_s": {"decode": 0.1}},
            },
        },
        "lanes": {"bulk_clients": 16, "bulk_scans_per_s": 3.1,
                      "probes": {"answered": 8, "refused": {}, "latency": LATENCY,
                                 "stage_p50_ms": {"queue": 0.0, "preprocess": 120.0}}},
            "no_lanes": {"bulk_clients": 16, "probes": {"answered": 2, "refused": {"gateway_busy": 6}}},
        },
    }  # fmt: skip


def test_targets_pass_miss_and_not_measured() -> None:
    line = report.summary(_results(overhead=1.2, rss=1000.0))
    assert line["targets"] == {
        "gateway_overhead_ratio": "MISS",
        "gateway_overhead_ci90_high": "pass",
        "gateway_throughput_ratio": "pass",
        "preprocess_speedup": "pass",
        "preprocess_max_abs_prob_delta": "MISS",
        "gateway_peak_rss_mb": "pass",
        "stat_latency_ratio": "pass",
        "dicom_zip_cpu_s": "MISS",
        "nifti_gz_cpu_s": "pass",
    }
    assert report.summary(_results(overhead=None, rss=3000.0))["targets"]["gateway_overhead_ratio"] == "n/a"
    assert report.summary(_results(overhead=1.0, rss=1099.0))["targets"]["gateway_peak_rss_mb"] == "MISS"


def test_the_report_shows_stat_under_bulk_saturation() -> None:
    text = report.render_markdown(_results(overhead=1.1, rss=900.0))
    assert "## STAT under bulk saturation (priority lanes)" in text
    assert "| gzip | 0.300 | 0.100 | 3.000 |" in text and "## CPU per scan, by input kind" in text
    assert "| bulk saturation, no lanes (all routine) | 16 | 2 | gateway_busy 6 |" in text
    assert report.summary(_results(overhead=1.1, rss=900.0))["stat_latency_ratio"] == 1.2


def test_boundary_values_meet_the_target() -> None:
    target = next(t for t in report.TARGETS if t.key == "gateway_overhead_ratio")
    assert target.check(1.08) == "pass"
    assert target.check(1.0801) == "MISS"


def test_summary_carries_every_contract_key_and_is_one_json_line() -> None:
    line = report.summary(_results(overhead=1.1, rss=900.0))
    for key in report.CONTRACT_KEYS:
        assert key in line
    encoded = json.dumps(line, separators=(",", ":"))
    assert "\n" not in encoded and json.loads(encoded)["gateway_peak_rss_mb"] == 900.0


def test_write_all_writes_json_report_and_plots(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    report.write_all(_results(overhead=1.2, rss=900.0), tmp_path)
    markdown = (tmp_path / "REPORT.md").read_text()
    assert "| `gateway_overhead_ratio` | 1.2000 | <= 1.08 | MISS |" in markdown
    assert "| `gateway_overhead_ci90_high` | 1.1200 | <= 1.15 | pass |" in markdown
    assert "Skipped: not installed" in markdown
    assert json.loads((tmp_path / "latest.json").read_text())["summary"]["mode"] == "quick"
    assert (tmp_path / "stage_breakdown.png").stat().st_size > 0
    assert (tmp_path / "latency_vs_concurrency.png").stat().st_size > 0


@pytest.mark.parametrize(
    ("env", "chooser"),
    [
        ({}, "OpenBLAS's own choice for this CPU"),
        ({"OPENBLAS_CORETYPE": "Haswell"}, "forced by OPENBLAS_CORETYPE=Haswell"),
    ],
)
def test_the_report_names_the_blas_kernels_and_who_chose_them(env: dict[str, str], chooser: str) -> None:
    """A run's absolute CPU figures depend on the BLAS kernels: the header says which ran and why."""
    results = _results(overhead=1.0, rss=900.0)
    results["environment"] = {
        "cpu_count": 2,
        "load_avg_at_start": [0.5, 0.5, 0.5],
        "blas": {"libraries": [{"library": "libscipy_openblas.so", "architecture": "SkylakeX"}], "env": env},
    }
    markdown = report.render_markdown(results)
    assert f"BLAS kernels ({chooser}): libscipy_openblas.so: SkylakeX." in markdown
    del results["environment"]["blas"]  # (results written before the kernels were recorded)
    assert "BLAS kernels" not in report.render_markdown(results)


def test_analytic_flops_match_the_reference_figure() -> None:
    assert gpu_bench.analytic_gflop(ViTConfig()) == pytest.approx(gpu_bench.GFLOP_PER_VOLUME, rel=1e-3)


def test_gpu_bench_dry_run_on_cpu() -> None:
    result = gpu_bench.run(dry_run=True, batches=[1, 2], warmup=1, iters=2, budget_s_per_batch=1.0)
    assert result["dry_run"] is True and result["peak_tflops"] is None
    assert [r["batch"] for r in result["rows"]] == [1, 2]
    assert all(r["volumes_per_s"] > 0 and r["peak_share"] is None for r in result["rows"])
