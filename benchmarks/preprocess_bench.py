"""Preprocessing benchmark (issue 3 item 6): production `headct.preprocess` vs the MONAI reference.

    python -m benchmarks.preprocess_bench [--quick] [--output results.json]

Same inputs for both (synthetic full heads from `benchmarks.inputs`, LPS like DICOM series):
512x512x160 at 0.45 x 0.45 x 1.0 mm and 512x512x32 at 0.45 x 0.45 x 5 mm (``--quick``: a 512x512x48
slab at 1 mm and the 5 mm volume). Each implementation runs in its own subprocess with every thread
pool pinned to ONE thread (OMP/MKL/OPENBLAS env vars set before numpy/torch load, and
``torch.set_num_threads(1)`` for the reference), so the ratio is one core against one core.

Reported (JSON dict on stdout; `run(quick)` returns it for ``make bench``):

* time per volume, min over repeats, as CPU seconds of the worker (``process_time``: the one-core
  cost, stable on a shared machine) and wall seconds; ``preprocess_speedup`` = reference / production
  CPU time on the *slower* of the two sizes (the per-size ratios, CPU and wall, are in ``cases``);
* fidelity on those volumes: voxel mean / max |Δ| of the float16 model inputs and, with the demo model
  (exported ONNX, onnxruntime CPU, if present), ``preprocess_max_abs_prob_delta``;
* decode time per upload format through `api.ingest.decode_upload` (DICOM zip, NIfTI.gz, raw NIfTI,
  NRRD) and peak memory: tracemalloc peak of one call (numpy buffers included) and the worker's
  ``ru_maxrss``.

SYNTHETIC DATA - NOT FOR CLINICAL USE.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

ROOT: Final = Path(__file__).resolve().parent.parent
THREAD_ENV_VARS: Final = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
)
#: (name, shape, spacing mm) of the benchmark volumes.
FULL_CASES: Final = (
    ("head-1mm", (512, 512, 160), (0.45, 0.45, 1.0)),
    ("head-5mm", (512, 512, 32), (0.45, 0.45, 5.0)),
)
QUICK_CASES: Final = (
    ("head-1mm-slab", (512, 512, 48), (0.45, 0.45, 1.0)),
    ("head-5mm", (512, 512, 32), (0.45, 0.45, 5.0)),
)
#: Issue 3 targets, echoed in the JSON next to the measurements.
TARGET_SPEEDUP: Final = 20.0
TARGET_MEAN_ABS_VOXEL_DELTA: Final = 0.005
TARGET_MAX_ABS_PROB_DELTA: Final = 0.01


def _log(message: str) -> None:
    print(f"[preprocess-bench] {message}", file=sys.stderr, flush=True)


# ---- worker side (runs in a one-thread subprocess) --------------------------------------------------


def _load_volume(path: Path) -> Any:
    from api.ingest import decode_upload

    return decode_upload(path, "application/octet-stream").volume


def _measure(fn: Callable[[], Any], repeats: int) -> tuple[Any, dict[str, Any]]:
    """Run `fn` `repeats` times; min CPU / wall seconds, tracemalloc peak (MB) of the first run."""
    import tracemalloc

    cpu, wall = [], []
    result = None
    peak_mb = None
    for i in range(repeats):
        if i == 0:
            tracemalloc.start()
        c0, w0 = time.process_time(), time.perf_counter()
        result = fn()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
        if i == 0:
            peak_mb = tracemalloc.get_traced_memory()[1] / 2**20
            tracemalloc.stop()
    # tracemalloc slows allocation-heavy code a little: time the first run only if it is the only one
    timed = slice(1, None) if repeats > 1 else slice(None)
    return result, {
        "cpu_s": min(cpu[timed]),
        "wall_s": min(wall[timed]),
        "cpu_runs_s": [round(v, 4) for v in cpu],
        "wall_runs_s": [round(v, 4) for v in wall],
        "tracemalloc_peak_mb": round(float(peak_mb or 0.0), 1),
    }


def _max_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def worker(kind: str, source: Path, repeats: int, output: Path | None, content_type: str) -> dict[str, Any]:
    """One measurement in this (one-thread) process: ``prod`` / ``ref`` preprocessing or ``decode``."""
    import numpy as np

    if kind == "decode":
        from api.ingest import decode_upload

        scan, stats = _measure(lambda: decode_upload(source, content_type), repeats)
        stats["shape"] = list(scan.volume.shape)
    else:
        volume = _load_volume(source)
        if kind == "prod":
            from headct.preprocess import preprocess

            fn: Callable[[], Any] = lambda: preprocess(volume)  # noqa: E731
        elif kind == "ref":
            import torch

            torch.set_num_threads(1)
            from tests.reference.monai_preprocess import reference_preprocess

            fn = lambda: reference_preprocess(volume)  # noqa: E731
        else:
            raise ValueError(f"unknown worker kind {kind!r}")
        x, stats = _measure(fn, repeats)
        if output is not None:
            np.save(output, x)
        if kind == "prod":
            stats["imported_torch"] = "torch" in sys.modules  # must stay False: gateway code path
    stats["max_rss_mb"] = round(_max_rss_mb(), 1)
    return stats


# ---- parent side ---------------------------------------------------------------------------------


def _one_thread_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({name: "1" for name in THREAD_ENV_VARS})
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _spawn(
    kind: str, source: Path, repeats: int, output: Path | None = None, content_type: str = ""
) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.preprocess_bench", "--worker", kind, "--source", str(source)]
    cmd += ["--repeats", str(repeats), "--content-type", content_type or "application/octet-stream"]
    if output is not None:
        cmd += ["--npy", str(output)]
    done = subprocess.run(cmd, cwd=ROOT, env=_one_thread_env(), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"worker {kind} on {source.name} failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _nrrd_copy(files: Any) -> Path:
    """The scan also as gzip NRRD (LPS space), written once next to the other cached formats."""
    path = files.nifti_raw.with_suffix(".nrrd")
    if path.is_file():
        return path
    import nrrd
    import numpy as np

    from headct.dicom_geometry import LPS_TO_RAS

    volume = _load_volume(files.nifti_raw)
    lps = LPS_TO_RAS @ volume.affine  # RAS -> LPS is its own inverse
    header = {
        "space": "left-posterior-superior",
        "space directions": lps[:3, :3].T,
        "space origin": lps[:3, 3],
        "encoding": "gzip",
    }
    tmp = path.with_suffix(".nrrd.tmp")
    nrrd.write(str(tmp), np.rint(volume.hu).astype(np.int16), header, compression_level=1)
    tmp.replace(path)
    return path


def _fidelity(prod: Path, ref: Path) -> dict[str, Any]:
    import numpy as np

    a = np.load(prod).astype(np.float32)
    b = np.load(ref).astype(np.float32)
    delta = np.abs(a - b)
    out: dict[str, Any] = {
        "voxel_mean_abs_delta": float(delta.mean()),
        "voxel_max_abs_delta": float(delta.max()),
    }
    try:
        from tests.reference.demo_model import demo_model_or_none

        model = demo_model_or_none()
    except ImportError:
        model = None
    if model is None:
        out["max_abs_prob_delta"] = None
        out["model"] = "demo model not exported (make demo); probability delta not measured"
    else:
        pa, pb = model.probabilities(a.astype(np.float16)), model.probabilities(b.astype(np.float16))
        out["max_abs_prob_delta"] = float(np.abs(pa - pb).max())
        out["probabilities_production"] = [round(float(v), 5) for v in pa[0]]
        out["probabilities_reference"] = [round(float(v), 5) for v in pb[0]]
    return out


def run(quick: bool = False) -> dict[str, Any]:
    """Measure; returns the JSON-able results dict (entry point for the ``make bench`` suite)."""
    from benchmarks.inputs import CONTENT_TYPES, ScanSpec, ensure_scan

    cases_spec = QUICK_CASES if quick else FULL_CASES
    prod_repeats, ref_repeats, decode_repeats = (3, 1, 1) if quick else (5, 2, 2)
    cases: list[dict[str, Any]] = []
    decode: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="preprocess-bench-") as tmp_dir:
        tmp = Path(tmp_dir)
        for name, shape, spacing in cases_spec:
            _log(f"{name}: inputs {shape} at {spacing} mm")
            files = ensure_scan(ScanSpec(name=name, shape=shape, spacing_mm=spacing))
            prod_npy, ref_npy = tmp / f"{name}-prod.npy", tmp / f"{name}-ref.npy"
            _log(f"{name}: production x{prod_repeats}")
            prod = _spawn("prod", files.nifti_raw, prod_repeats, prod_npy)
            _log(f"{name}: MONAI reference x{ref_repeats}")
            ref = _spawn("ref", files.nifti_raw, ref_repeats, ref_npy)
            case = {
                "name": name,
                "shape": list(shape),
                "spacing_mm": list(spacing),
                "production": prod,
                "reference": ref,
                "speedup_cpu": ref["cpu_s"] / prod["cpu_s"],
                "speedup_wall": ref["wall_s"] / prod["wall_s"],
                **_fidelity(prod_npy, ref_npy),
            }
            _log(
                f"{name}: production {prod['cpu_s']:.3f} s cpu / {prod['wall_s']:.3f} s wall, reference "
                f"{ref['cpu_s']:.2f} s cpu / {ref['wall_s']:.2f} s wall -> x{case['speedup_cpu']:.1f} (cpu) "
                f"x{case['speedup_wall']:.1f} (wall); mean |dvoxel| {case['voxel_mean_abs_delta']:.2e}, "
                f"max |dprob| {case['max_abs_prob_delta']}"
            )
            cases.append(case)
            if name == cases_spec[0][0]:  # decode timings on the first (largest) volume
                formats = {
                    "dicom_zip": (files.dicom_zip, CONTENT_TYPES["dicom_zip"]),
                    "nifti_gz": (files.nifti_gz, CONTENT_TYPES["nifti_gz"]),
                    "nifti_raw": (files.nifti_raw, CONTENT_TYPES["nifti_raw"]),
                    "nrrd_gz": (_nrrd_copy(files), "application/octet-stream"),
                }
                for fmt, (path, content_type) in formats.items():
                    _log(f"decode {fmt} ({path.stat().st_size / 2**20:.1f} MB)")
                    stats = _spawn("decode", path, decode_repeats, content_type=content_type)
                    decode[fmt] = {**stats, "file_mb": round(path.stat().st_size / 2**20, 1), "volume": name}
    probs = [c["max_abs_prob_delta"] for c in cases if c["max_abs_prob_delta"] is not None]
    return {
        "preprocess_speedup": round(min(c["speedup_cpu"] for c in cases), 2),
        "preprocess_speedup_wall": round(min(c["speedup_wall"] for c in cases), 2),
        "preprocess_max_abs_prob_delta": max(probs) if probs else None,
        "preprocess_voxel_mean_abs_delta": max(c["voxel_mean_abs_delta"] for c in cases),
        "preprocess_voxel_max_abs_delta": max(c["voxel_max_abs_delta"] for c in cases),
        "preprocess_peak_tracemalloc_mb": max(c["production"]["tracemalloc_peak_mb"] for c in cases),
        "targets": {
            "speedup": TARGET_SPEEDUP,
            "voxel_mean_abs_delta": TARGET_MEAN_ABS_VOXEL_DELTA,
            "max_abs_prob_delta": TARGET_MAX_ABS_PROB_DELTA,
        },
        "cases": cases,
        "decode": decode,
        "quick": quick,
        "threads_per_implementation": 1,
        "load_avg_at_end": [round(v, 2) for v in os.getloadavg()],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.preprocess_bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a thinner 1 mm slab, fewer repeats")
    parser.add_argument("--output", type=Path, help="also write the JSON here")
    # internal: one measurement in a one-thread subprocess
    parser.add_argument("--worker", choices=("prod", "ref", "decode"), help=argparse.SUPPRESS)
    parser.add_argument("--source", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--npy", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--content-type", default="application/octet-stream", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.source, args.repeats, args.npy, args.content_type)))
        return 0
    results = run(quick=args.quick)
    text = json.dumps(results, indent=1)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
