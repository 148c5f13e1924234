"""GPU smoke test of the TensorRT path: build engines, run the parity gate, optionally serve one in Triton.

Run on a GPU host inside NVIDIA's Triton image (or anywhere with a `tensorrt` wheel, >= 8.6)::

    python -m benchmarks.gpu_smoke [--serve] [--skip-vitb] [--out benchmarks/results/gpu_smoke.json]

For each model it builds a TensorRT engine with `export.tensorrt_build.build_engine` (parity gate on) and
records the build time and the gate's figures (max |Δp|, min embedding cosine):

* ``demo``: the demo model's ONNX, `model_repository/fmhct/<latest version>/model.onnx`, with the
  `model.reference.npz` beside it (written here with ONNX Runtime if it is missing);
* ``vitb``: a random-weight full-size FM-HCT ViT-B serving graph with one linear head, exported to ONNX
  here with `export.onnx_export.export_onnx` (needs torch + onnx + onnxruntime; `--skip-vitb` skips it).

``--serve`` (needs `tritonserver` on PATH and tritonclient): serves the demo engine in Triton
(`tensorrt_plan`, config rewritten by the chart's prepare script) and compares Triton's answers on the
reference inputs with ONNX Runtime's.

Prints ONE JSON line (the last line of output). Without TensorRT or a CUDA GPU it prints a JSON line
``{"status": "refused", ...}`` and exits 3; 1 if a build or gate failed; 0 otherwise.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from export import tensorrt_build

ROOT = Path(__file__).resolve().parents[1]
EXIT_REFUSED = 3
PREPARE_SCRIPT = ROOT / "helm" / "headct" / "files" / "prepare_repository.py"


def latest_demo_onnx(repository: Path, model: str) -> Path:
    versions = sorted(int(p.name) for p in (repository / model).glob("*") if p.is_dir() and p.name.isdigit())
    if not versions:
        raise FileNotFoundError(f"no version of {model} in {repository}: run `make demo` first")
    return repository / model / str(versions[-1]) / "model.onnx"


def ensure_reference(onnx: Path, out_dir: Path) -> Path:
    """The export's reference beside `onnx` if it fits, else a fresh one (ONNX Runtime) in `out_dir`."""
    from export import reference

    path = reference.reference_path_for(onnx)
    if path.is_file() and reference.load_reference(path).onnx_sha256 == reference.sha256_file(onnx):
        return path
    return reference.write_reference(onnx, out_dir / reference.REFERENCE_FILENAME)


def export_vitb(work: Path, max_batch_size: int) -> Path:
    import torch

    from export.heads import LinearHead
    from export.model import FMHCTViT, ViTConfig
    from export.onnx_export import export_onnx
    from export.serving_graph import ServingGraph

    torch.manual_seed(0)
    graph = ServingGraph(FMHCTViT(ViTConfig()), {"t": LinearHead(768)})
    path = work / "vitb" / "model.onnx"
    export_onnx(graph, path, max_batch_size=max_batch_size)
    return path


def build_and_gate(onnx: Path, plan: Path, max_batch_size: int, precision: str) -> dict[str, Any]:
    started = time.perf_counter()
    row: dict[str, Any] = {"onnx": str(onnx)}
    try:
        reference_path = ensure_reference(onnx, plan.parent)
        row["reference"] = str(reference_path)
        row["reference_s"] = round(time.perf_counter() - started, 1)
        meta = tensorrt_build.build_engine(
            onnx,
            plan,
            tensorrt_build.EngineBuildSettings(
                max_batch_size=max_batch_size,
                precision=precision,  # type: ignore[arg-type]
            ),
            reference=reference_path,
            log=lambda line: print(line, file=sys.stderr, flush=True),
        )
    except tensorrt_build.EngineParityError as error:
        row.update(status="gate-failed", error=str(error), parity=error.parity)
    except Exception as error:  # record and go on with the next model
        row.update(status="failed", error=f"{type(error).__name__}: {error}")
        traceback.print_exc(file=sys.stderr)
    else:
        parity = meta.parity or {}
        row.update(
            status="ok",
            gate=meta.gate,
            tensorrt=meta.tensorrt_version,
            gpu=meta.gpu_name,
            precision=meta.precision,
            build_s=meta.build_seconds,
            max_abs_probability_diff=parity.get("max_abs_probability_diff"),
            min_embedding_cosine=parity.get("min_embedding_cosine"),
            plan_mb=round(plan.stat().st_size / 1e6, 1),
        )
    row["total_s"] = round(time.perf_counter() - started, 1)
    return row


def _prepare_module() -> Any:
    """The chart's prepare_repository.py (config rewriting), loaded from its file."""
    spec = importlib.util.spec_from_file_location("headct_prepare_repository", PREPARE_SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve_and_compare(
    model_dir: Path, plan: Path, reference_path: Path, work: Path, timeout_s: float = 300.0
) -> dict[str, Any]:
    """Serve `plan` in tritonserver as `model_dir`'s model; compare its answers with the reference."""
    server = shutil.which("tritonserver")
    if server is None:
        return {"status": "skipped", "reason": "tritonserver not on PATH"}
    try:
        import numpy as np
        import tritonclient.http as httpclient
    except ImportError as error:
        return {"status": "skipped", "reason": f"tritonclient not importable: {error}"}
    from export import reference

    prep = _prepare_module()
    model = model_dir.name
    repo = work / "triton-repo"
    (repo / model / "1").mkdir(parents=True)
    text = (model_dir / "config.pbtxt").read_text()
    (repo / model / "config.pbtxt").write_text(prep.trt_config(text))
    for name in ("labels.txt",):
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, repo / model / name)
    shutil.copyfile(plan, repo / model / "1" / "model.plan")
    http = _free_port()
    command = [
        server, f"--model-repository={repo}", f"--http-port={http}",
        f"--grpc-port={_free_port()}", f"--metrics-port={_free_port()}",
    ]  # fmt: skip
    log = (work / "tritonserver.log").open("w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        client = httpclient.InferenceServerClient(f"127.0.0.1:{http}")
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if client.is_model_ready(model):
                    break
            except Exception:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                return {"status": "failed", "reason": f"model not ready; see {work / 'tritonserver.log'}"}
            time.sleep(1.0)
        ref = reference.load_reference(reference_path)
        image = ref.inputs["image"]
        max_batch = prep.max_batch_size(text)
        outputs: dict[str, list[Any]] = {name: [] for name in ref.outputs}
        for start in range(0, image.shape[0], max_batch):
            chunk = np.ascontiguousarray(image[start : start + max_batch])
            request = httpclient.InferInput("image", list(chunk.shape), "FP16")
            request.set_data_from_numpy(chunk, binary_data=True)
            wanted = [httpclient.InferRequestedOutput(name, binary_data=True) for name in ref.outputs]
            result = client.infer(model, [request], outputs=wanted)
            for name in ref.outputs:
                outputs[name].append(result.as_numpy(name))
        served = {name: np.concatenate(chunks) for name, chunks in outputs.items()}
        parity = reference.compare_outputs(ref.outputs, served)
        return {
            "status": "ok" if parity.passed else "gate-failed",
            "max_abs_probability_diff": parity.max_abs_probability_diff,
            "min_embedding_cosine": parity.min_embedding_cosine,
            "failures": parity.failures,
        }
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_smoke", description=__doc__)
    parser.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--model-name", default="fmhct")
    parser.add_argument("--max-batch-size", type=int, default=8, help="ViT-B engine profile max (8)")
    parser.add_argument("--precision", choices=tensorrt_build.PRECISIONS, default="fp16")
    parser.add_argument("--skip-vitb", action="store_true", help="only the demo model")
    parser.add_argument("--serve", action="store_true", help="also serve the demo engine in tritonserver")
    parser.add_argument("--work-dir", type=Path, default=None, help="default: a temporary directory")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON result here")
    args = parser.parse_args(argv)

    result: dict[str, Any] = {"benchmark": "gpu_smoke"}
    try:
        trt, gpu = tensorrt_build.preflight()
    except tensorrt_build.EngineBuildRefused as error:
        result.update(status="refused", reason=str(error))
        print(json.dumps(result), flush=True)
        return EXIT_REFUSED
    result.update(tensorrt=str(trt.__version__), gpu=gpu.name, compute_capability=gpu.compute_capability)

    with tempfile.TemporaryDirectory(prefix="gpu-smoke-", dir=args.work_dir) as tmp:
        work = Path(tmp)
        models: dict[str, Any] = {}
        try:
            demo_onnx = latest_demo_onnx(args.repository, args.model_name)
            text = (args.repository / args.model_name / "config.pbtxt").read_text()
            demo_batch = _prepare_module().max_batch_size(text)
            models["demo"] = build_and_gate(
                demo_onnx, work / "demo" / "model.plan", demo_batch, args.precision
            )
            if args.serve and models["demo"]["status"] == "ok":
                models["demo"]["triton"] = serve_and_compare(
                    args.repository / args.model_name,
                    work / "demo" / "model.plan",
                    Path(models["demo"]["reference"]),
                    work,
                )
        except (FileNotFoundError, RuntimeError, ValueError) as error:
            models["demo"] = {"status": "skipped", "reason": str(error)}
        if not args.skip_vitb:
            try:
                vitb_onnx = export_vitb(work, args.max_batch_size)
            except Exception as error:
                models["vitb"] = {"status": "failed", "error": f"export: {type(error).__name__}: {error}"}
            else:
                models["vitb"] = build_and_gate(
                    vitb_onnx, work / "vitb" / "model.plan", args.max_batch_size, args.precision
                )
    result["models"] = models
    failed = [
        name
        for name, row in models.items()
        if row["status"] not in ("ok", "skipped")
        or row.get("triton", {}).get("status") not in (None, "ok", "skipped")
    ]
    result["status"] = "failed" if failed else "ok"
    line = json.dumps(result, default=str)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(line + "\n")
    print(line, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
