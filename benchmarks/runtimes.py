"""ONNX Runtime vs PyTorch eager on this CPU, for the demo model and the full-size FM-HCT ViT-B.

Same serving graph (backbone + heads, FP16 input cast to float32), same inputs, same thread count. The
ViT-B has random weights (the real ones are not public); speed does not depend on weight values. Its
ONNX file is exported once and cached under ``build/bench-inputs/``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.stats import LatencySummary

ROOT = Path(__file__).resolve().parent.parent


def _threads() -> int:
    return max(1, os.cpu_count() or 1)


def _demo_graph(repository: Path, model_name: str) -> tuple[Any, Path]:
    from demo import train
    from export.checkpoint import load_backbone, load_head
    from export.serving_graph import ServingGraph

    checkpoints = ROOT / "build" / "demo" / "checkpoints"
    card = json.loads((repository / model_name / "model_card.json").read_text())
    backbone, config = load_backbone(train.backbone_path(checkpoints))
    heads = {
        t["name"]: load_head(train.head_path(checkpoints, t["name"]), config.embed_dim) for t in card["tasks"]
    }
    return ServingGraph(backbone, heads), repository / model_name / "1" / "model.onnx"


def _vitb_graph(cache_dir: Path) -> tuple[Any, Path]:
    import torch

    from export.heads import LinearHead
    from export.model import FMHCTViT, ViTConfig
    from export.onnx_export import export_onnx
    from export.serving_graph import ServingGraph

    torch.manual_seed(0)
    graph = ServingGraph(FMHCTViT(ViTConfig()), {"task": LinearHead(768)})
    onnx_path = cache_dir / "vitb-random-seed0.onnx"
    if not onnx_path.is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = onnx_path.with_suffix(".tmp.onnx")
        export_onnx(graph, tmp, max_batch_size=8)
        tmp.replace(onnx_path)
    return graph, onnx_path


def compare(graph: Any, onnx_path: Path, batch_sizes: list[int], repeats: int) -> list[dict[str, Any]]:
    """p50 latency of torch eager and ORT per batch size, and their max |Δprobability|."""
    import onnxruntime as ort
    import torch

    from export.onnx_export import example_input

    torch.set_num_threads(_threads())
    options = ort.SessionOptions()
    options.intra_op_num_threads = _threads()
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    rows = []
    for batch in batch_sizes:
        x = example_input(batch, seed=batch)
        feed = {session.get_inputs()[0].name: x.numpy()}
        timings: dict[str, list[float]] = {"torch_eager": [], "onnxruntime": []}
        with torch.inference_mode():
            torch_probs = graph(x)[0].numpy()  # warm-up
            ort_probs = session.run(None, feed)[0]  # warm-up
            for _ in range(repeats):
                t0 = time.perf_counter()
                graph(x)
                timings["torch_eager"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                session.run(None, feed)
                timings["onnxruntime"].append(time.perf_counter() - t0)
        torch_p50 = LatencySummary.of(timings["torch_eager"]).p50_ms
        ort_p50 = LatencySummary.of(timings["onnxruntime"]).p50_ms
        rows.append(
            {
                "batch": batch,
                "repeats": repeats,
                "torch_eager_p50_ms": round(torch_p50, 2),
                "onnxruntime_p50_ms": round(ort_p50, 2),
                "ort_speedup": round(torch_p50 / ort_p50, 3),
                "torch_volumes_per_s": round(1000.0 * batch / torch_p50, 3),
                "ort_volumes_per_s": round(1000.0 * batch / ort_p50, 3),
                "max_abs_prob_delta": float(np.max(np.abs(torch_probs - ort_probs))),
            }
        )
    return rows


def run(quick: bool, repository: Path, model_name: str, cache_dir: Path) -> dict[str, Any]:
    result: dict[str, Any] = {"threads": _threads()}
    graph, onnx_path = _demo_graph(repository, model_name)
    result["demo"] = compare(graph, onnx_path, [1] if quick else [1, 4, 8], repeats=5 if quick else 10)
    if quick:
        result["vitb"] = {"skipped": "quick mode: demo model only (ViT-B export + runs take minutes here)"}
    else:
        graph, onnx_path = _vitb_graph(cache_dir)
        result["vitb"] = compare(graph, onnx_path, [1, 2], repeats=3)
    return result
