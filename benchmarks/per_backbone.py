"""Full-size (ViT-B) per-task-backbone export, served by the real Triton binary, against the authors' math.

    python -m benchmarks.per_backbone [--out benchmarks/results/per_backbone.json] [--rounds 3]

Two official downstream "runs" with random full-size weights (qkv bias, `_orig_mod.` layout, matching
epoch/best_loss in backbone and head) are exported twice: as a 2-group model (`--task` per run: the real
FM-HCT situation) and as a 1-group model (both heads on one backbone: the cheap mode). Both are served by
the local tritonserver (Python backend + ONNX Runtime, CPU), and the script prints one JSON line with:
export time and ONNX parity of the 2-group export, served-vs-torch max |Δp| (torch = each run's own backbone
and head, softmax[:, 1], as the official code computes it), and CPU latency of 1 vs 2 groups, plus the
2-group model answering a one-task subset (one backbone). Random weights: the numbers measure the serving
path, not clinical performance. Takes ~5-10 min on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from export.checkpoint import load_backbone_checkpoint, load_head_checkpoint, save_finetuned
from export.heads import LinearHead
from export.model import FMHCTViT, ViTConfig
from export.pipeline import ExportRequest, run_export
from export.tasks import TaskSpec
from headct import contract
from headct.local.triton import LocalTriton, TritonPorts, prepare_triton_home

ROOT = Path(__file__).resolve().parents[1]
VARIANT = ViTConfig(qkv_bias=True)  # what the official downstream code builds and saves
TASKS = ("ich", "sdh")


def _random(module: torch.nn.Module, seed: int, scale: float = 0.02) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, value in module.state_dict().items():
            if value.is_floating_point():
                fresh = torch.randn(value.shape, generator=generator) * scale
                value.copy_(fresh.abs() + 1.0 if name.endswith("running_var") else fresh)
    return module.eval()


def write_runs(directory: Path) -> None:
    for seed, task in enumerate(TASKS):
        with torch.device("meta"):
            backbone = FMHCTViT(VARIANT)
        backbone = _random(backbone.to_empty(device="cpu"), seed)
        # Head weights of order 1/sqrt(768) per input: probabilities spread over (0, 1), not stuck at 0.5.
        head = _random(LinearHead(VARIANT.embed_dim), seed + 10, scale=0.1)
        save_finetuned(
            backbone, head, directory / f"vit_{task}.pt", directory / f"{task}_classifier.pt", epoch=5 + seed
        )
    # The cheap mode: both heads saved with ONE backbone (a multi-task run), as the demo does.
    shared = load_backbone_checkpoint(directory / "vit_ich.pt").model
    for task in TASKS:
        head = load_head_checkpoint(directory / f"{task}_classifier.pt", VARIANT.embed_dim).module
        save_finetuned(shared, head, directory / "shared.pt", directory / f"shared_{task}_classifier.pt")


def official(directory: Path, task: str, image: np.ndarray) -> float:
    backbone = load_backbone_checkpoint(directory / f"vit_{task}.pt").model
    head = load_head_checkpoint(directory / f"{task}_classifier.pt", VARIANT.embed_dim).module
    with torch.no_grad():
        tokens = backbone.forward_features(torch.from_numpy(image).float())
        return float(torch.softmax(head(tokens), dim=-1)[0, 1])


def export(directory: Path, repository: Path, name: str, grouped: bool) -> dict[str, float]:
    tasks = tuple(
        TaskSpec(
            task,
            directory / (f"{task}_classifier.pt" if grouped else f"shared_{task}_classifier.pt"),
            directory / (f"vit_{task}.pt" if grouped else "shared.pt"),
        )
        for task in TASKS
    )
    outcome = run_export(
        ExportRequest(backbone=None, tasks=tasks, target="cpu", repository=repository, model_name=name)
    )
    assert outcome.parity is not None
    return {
        "export_s": round(outcome.total_seconds, 1),
        "parity_max_abs_probability_diff": outcome.parity.max_abs_probability_diff,
        "parity_max_abs_embedding_diff": outcome.parity.max_abs_embedding_diff,
    }


def serve_and_measure(repository: Path, directory: Path, rounds: int, log: Path) -> dict[str, object]:
    import tritonclient.grpc as grpcclient

    server = LocalTriton(
        home=prepare_triton_home(ROOT / "build" / "tritonserver"),
        repository=repository,
        ports=TritonPorts.free(),
        log_path=log,
    )
    server.start()
    try:
        for name in ("grouped", "shared"):
            server.wait_ready(name, timeout_s=600)
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.ports.grpc}")
        rng = np.random.default_rng(0)
        image = rng.random((1, *contract.INPUT_SHAPE)).astype(np.float16)

        def call(model: str, outputs: list[str]) -> tuple[float, dict[str, np.ndarray]]:
            tensor = grpcclient.InferInput(contract.INPUT_NAME, list(image.shape), contract.INPUT_DATATYPE)
            tensor.set_data_from_numpy(image)
            started = time.perf_counter()
            result = client.infer(
                model, [tensor], outputs=[grpcclient.InferRequestedOutput(o) for o in outputs]
            )
            return time.perf_counter() - started, {o: result.as_numpy(o) for o in outputs}

        grouped_outputs = [f"probabilities__vit_{task}" for task in TASKS]
        cases = {
            "one_group_all_tasks": ("shared", [contract.PROBABILITIES_NAME]),
            "two_groups_all_tasks": ("grouped", grouped_outputs),
            "two_groups_one_task": ("grouped", grouped_outputs[:1]),
        }
        latency: dict[str, float] = {}
        answers: dict[str, dict[str, np.ndarray]] = {}
        for case, (model, outputs) in cases.items():
            call(model, outputs)  # warm
            times = []
            for _ in range(rounds):
                seconds, answers[case] = call(model, outputs)
                times.append(seconds)
            latency[case] = round(statistics.median(times), 3)
        served = answers["two_groups_all_tasks"]
        served_p = {task: float(served[f"probabilities__vit_{task}"][0, 0]) for task in TASKS}
        torch_p = {task: official(directory, task, image) for task in TASKS}
        return {
            "served_probabilities": served_p,
            "torch_probabilities": torch_p,
            "served_vs_torch_max_abs_probability_diff": max(abs(served_p[t] - torch_p[t]) for t in TASKS),
            "cpu_latency_s_median": latency,
            "two_vs_one_group_latency_ratio": round(
                latency["two_groups_all_tasks"] / latency["one_group_all_tasks"], 2
            ),
        }
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "per_backbone.json")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="per-backbone-") as work:
        directory, repository = Path(work) / "runs", Path(work) / "repository"
        directory.mkdir()
        write_runs(directory)
        result: dict[str, object] = {"two_group_export": export(directory, repository, "grouped", True)}
        result["one_group_export"] = export(directory, repository, "shared", False)
        result.update(serve_and_measure(repository, directory, args.rounds, Path(work) / "triton.log"))
    line = json.dumps(result, sort_keys=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
