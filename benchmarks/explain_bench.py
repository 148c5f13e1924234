"""Explanation-map outputs benchmark (issue 13): `headct.explain` and `api.results.parametric_map` on
one 512x512x200 LPS source (a phantom head, DICOM-like array order; 1 mm slices, in-plane 0.45 mm by
default or ``--in-plane 1``), one thread.

    python -m benchmarks.explain_bench [--tasks N] [--repeats R] [--in-plane MM]

Times (min over repeats; wall and CPU seconds) of `map_to_source` (8^3 and 96^3 maps, the separable
path, the plane-by-plane one on a 15 deg gantry tilt and the ``affine_transform`` one),
`attention_nifti`, `attention_preview` and `parametric_map`
(building the dataset, then encoding it), with N task maps; sizes of the outputs. JSON on stdout.

SYNTHETIC DATA - NOT FOR CLINICAL USE.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

from api.results.dicom_sr import Algorithm  # noqa: E402
from api.results.parametric_map import parametric_map  # noqa: E402
from demo.dicom_writer import ct_series, phantom_head, reorient  # noqa: E402
from headct.explain import map_to_source  # noqa: E402
from headct.explain.nifti import attention_nifti  # noqa: E402
from headct.explain.preview import attention_preview  # noqa: E402
from headct.preprocess import preprocess_with_info  # noqa: E402
from headct.volume import Volume  # noqa: E402


def _time(fn: Callable[[], Any], repeats: int) -> tuple[dict[str, float], Any]:
    best_wall, best_cpu, result = float("inf"), float("inf"), None
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        best_wall = min(best_wall, time.perf_counter() - wall)
        best_cpu = min(best_cpu, time.process_time() - cpu)
    return {"wall_s": round(best_wall, 4), "cpu_s": round(best_cpu, 4)}, result


def run(tasks: int = 3, repeats: int = 3, in_plane_mm: float = 0.45) -> dict[str, Any]:
    volume = reorient(phantom_head(shape=(512, 512, 200), spacing_mm=(in_plane_mm, in_plane_mm, 1.0)), "LPS")
    _, info = preprocess_with_info(volume)
    rng = np.random.default_rng(0)
    cells = [rng.random((8, 8, 8)).astype(np.float32) for _ in range(tasks)]
    out: dict[str, Any] = {
        "source_shape": list(volume.shape),
        "spacing_mm": list(volume.spacing_mm),
        "tasks": tasks,
    }
    out["map_to_source_8"], first = _time(lambda: map_to_source(cells[0], info), repeats)
    out["map_to_source_96"], _ = _time(
        lambda: map_to_source(rng.random((96, 96, 96)).astype(np.float32), info), repeats
    )
    out["map_to_source_8_affine_transform"], _ = _time(
        lambda: map_to_source(cells[0], info, separable=False), 1
    )
    # the same voxels on a gantry-tilted grid (15 deg): the plane-by-plane path
    tilted = volume.affine.copy()
    tilted[:3, 2] += tilted[:3, 1] / np.linalg.norm(tilted[:3, 1]) * np.tan(np.radians(15.0))
    _, info_tilted = preprocess_with_info(Volume(hu=volume.hu, affine=tilted))
    out["map_to_source_8_tilted"], _ = _time(lambda: map_to_source(cells[0], info_tilted), repeats)
    maps = {f"task{t}": (first if t == 0 else map_to_source(cells[t], info)) for t in range(tasks)}
    out["attention_nifti"], payload = _time(lambda: attention_nifti(maps, volume.affine), repeats)
    out["attention_nifti"]["mb"] = round(len(payload) / 1e6, 1)
    out["attention_preview"], png = _time(lambda: attention_preview(volume.hu, volume.affine, maps), repeats)
    out["attention_preview"]["kb"] = round(len(png) / 1e3, 1)
    series = ct_series(volume.with_hu(np.rint(volume.hu)), seed="bench")
    for ds in series:
        del ds.PixelData
    algorithm = Algorithm("fm-hct-demo", "0.1.0", hashlib.sha256(b"bench").hexdigest())
    out["parametric_map"], pm = _time(lambda: parametric_map(series, maps, algorithm), repeats)

    def encode() -> bytes:
        buffer = io.BytesIO()
        pm.save_as(buffer, enforce_file_format=True)
        return buffer.getvalue()

    out["parametric_map_encode"], encoded = _time(encode, repeats)
    out["parametric_map_encode"]["mb"] = round(len(encoded) / 1e6, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--in-plane", type=float, default=0.45, help="in-plane voxel size, mm")
    args = parser.parse_args()
    print(json.dumps(run(args.tasks, args.repeats, args.in_plane), indent=2))


if __name__ == "__main__":
    main()
