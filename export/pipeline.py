"""The export pipeline behind `python -m export`: checkpoints -> ServingGraph -> ONNX (+ parity) ->
[TensorRT engine] -> Triton repository entry with its model card.

Nothing is written into the repository unless every earlier step succeeded, and an entry that is already
current (same checkpoint and head hashes, tasks, thresholds, target, batch size) is left alone.
"""

from __future__ import annotations

import contextlib
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Literal

from export import repository, tensorrt_build
from export.onnx_export import DEFAULT_OPSET, OnnxExportInfo, ParityReport
from export.repository import ServingOptions, Target, WrittenEntry
from headct import contract
from headct.model_card import SYNTHETIC_DEMO_NOTICE, ModelCard, TaskCard

Log = Callable[[str], None]

# headct.model_card only defines the demo notice; this is the default for real checkpoints.
DEFAULT_NOTICE = (
    "FM-HCT research model. Not a medical device: outputs are decision support for qualified readers and "
    "must not be the sole basis of a clinical decision."
)
DEFAULT_THRESHOLD = 0.5


class ExportError(RuntimeError):
    """The request itself is wrong (bad --head spec, duplicate task, ...)."""


@dataclass(frozen=True)
class HeadSpec:
    """One task: `NAME=PATH[:THRESHOLD]` on the command line."""

    name: str
    path: Path
    threshold: float = DEFAULT_THRESHOLD
    heldout_auc: float | None = None
    threshold_given: bool = True

    @classmethod
    def parse(cls, text: str) -> HeadSpec:
        name, sep, rest = text.partition("=")
        if not sep or not name or not rest:
            raise ExportError(f"--head {text!r}: expected NAME=PATH[:THRESHOLD]")
        path, threshold, given = rest, DEFAULT_THRESHOLD, False
        head, colon, tail = rest.rpartition(":")
        if colon and head:
            with contextlib.suppress(ValueError):  # else the ':' is part of the path, no threshold
                threshold, path, given = float(tail), head, True
        if not 0.0 <= threshold <= 1.0:
            raise ExportError(f"--head {text!r}: threshold {threshold} is outside [0, 1]")
        return cls(name=name, path=Path(path), threshold=threshold, threshold_given=given)


@dataclass(frozen=True)
class ExportRequest:
    backbone: Path
    heads: tuple[HeadSpec, ...]
    target: Target
    repository: Path
    model_name: str = contract.DEFAULT_MODEL_NAME
    weights: Literal["student", "teacher"] = "student"
    num_heads: int | None = None
    version: int | None = None
    model_version: str | None = None
    synthetic_demo: bool = False
    notice: str | None = None
    opset: int = DEFAULT_OPSET
    serving: ServingOptions = field(default_factory=ServingOptions)
    precision: tensorrt_build.Precision = "fp16"
    opt_batch_size: int | None = None
    workspace_bytes: int = tensorrt_build.DEFAULT_WORKSPACE_BYTES
    timing_cache: Path | None = None
    parity_seed: int = 0
    parity_batch_sizes: tuple[int, ...] = (1, 3)
    force: bool = False
    work_dir: Path | None = None  # where the ONNX/plan are staged; default: a temporary directory


@dataclass
class ExportOutcome:
    skipped: bool
    model_dir: Path
    entry: WrittenEntry | None = None
    card: ModelCard | None = None
    onnx: OnnxExportInfo | None = None
    parity: ParityReport | None = None
    engine: tensorrt_build.EngineMetadata | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def total_seconds(self) -> float:
        return sum(self.timings.values())


def _validate(request: ExportRequest) -> None:
    if not request.heads:
        raise ExportError("at least one --head NAME=PATH[:THRESHOLD] is required")
    names = [head.name for head in request.heads]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ExportError(f"duplicate task names {duplicates}")
    if "\n" in "".join(names) or any(name != name.strip() for name in names):
        raise ExportError("task names must not contain newlines or surrounding whitespace (labels.txt)")
    if request.target not in repository.TARGETS:
        raise ExportError(f"unknown target {request.target!r}")
    if request.version is not None and request.version < 1:
        raise ExportError(f"--version must be >= 1, got {request.version}")


def _hash(path: Path) -> str:
    from export.checkpoint import CheckpointError, sha256_file

    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    return sha256_file(path)


def current_entry(
    request: ExportRequest, checkpoint_sha256: str, head_sha256: Sequence[str]
) -> ModelCard | None:
    """The existing card if the repository entry already serves exactly this request, else None."""
    model_dir = request.repository / request.model_name
    card = repository.read_model_card(model_dir)
    config_path = model_dir / repository.CONFIG_FILENAME
    if card is None or not config_path.is_file():
        return None
    try:
        config = repository.read_config(config_path)
    except Exception:  # unreadable config: not current, rewrite
        return None
    wanted_tasks = [
        (head.name, sha, head.threshold, head.heldout_auc)
        for head, sha in zip(request.heads, head_sha256, strict=True)
    ]
    have_tasks = [(t.name, t.head_sha256, t.threshold, t.heldout_auc) for t in card.tasks]
    version_dir = model_dir / str(card.triton_version)
    current = (
        card.checkpoint_sha256 == checkpoint_sha256
        and have_tasks == wanted_tasks
        and card.synthetic_demo == request.synthetic_demo
        and card.max_batch_size == request.serving.max_batch_size
        and repository.target_of(config) == request.target
        and (request.model_version is None or card.model_version == request.model_version)
        and (request.version is None or card.triton_version == request.version)
        and repository.existing_versions(model_dir)[-1:] == [card.triton_version]
        and all((version_dir / name).is_file() for name in repository.version_artifacts(request.target))
    )
    return card if current else None


def _versions(target: Target, engine: tensorrt_build.EngineMetadata | None) -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch

    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "onnx_exporter": "torch.onnx TorchScript exporter (dynamo=False)",
        "target": target,
    }
    for package in ("headct-serve", "tritonclient"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    if engine is not None:
        versions.update(
            tensorrt=engine.tensorrt_version,
            tensorrt_precision=engine.precision,
            tensorrt_gpu=engine.gpu_name,
            tensorrt_compute_capability=engine.compute_capability,
        )
    return versions


def _default_model_version(request: ExportRequest, checkpoint_sha256: str) -> str:
    kind = "-synthetic-demo" if request.synthetic_demo else ""
    return f"{request.model_name}{kind}-{checkpoint_sha256[:12]}"


def run_export(request: ExportRequest, *, log: Log = print) -> ExportOutcome:
    """Run the whole pipeline; raise on any failure (nothing is written into the repository then)."""
    _validate(request)
    model_dir = request.repository / request.model_name
    outcome = ExportOutcome(skipped=False, model_dir=model_dir)
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        outcome.timings[stage] = now - clock
        clock = now

    checkpoint_sha256 = _hash(request.backbone)
    head_sha256 = [_hash(head.path) for head in request.heads]
    lap("hash")
    if not request.force:
        card = current_entry(request, checkpoint_sha256, head_sha256)
        if card is not None:
            log(f"{model_dir}/{card.triton_version} is current (same checkpoints and settings); skipped")
            outcome.skipped, outcome.card = True, card
            return outcome

    if request.version is not None and (model_dir / str(request.version)).exists():
        raise repository.RepositoryError(f"{model_dir / str(request.version)} already exists")
    if request.target == "trt":
        # Refuse before spending a minute on export: no TensorRT or no GPU -> EngineBuildRefused.
        tensorrt_build.preflight()

    # torch-heavy imports only now, so that skips and refusals stay fast.
    from export.checkpoint import load_backbone, load_head
    from export.heads import AttentiveHead
    from export.onnx_export import check_parity, export_onnx
    from export.serving_graph import ServingGraph

    backbone, vit_config = load_backbone(
        request.backbone, weights=request.weights, num_heads=request.num_heads
    )
    # The official attentive head uses the backbone's head count.
    heads = {
        head.name: load_head(head.path, vit_config.embed_dim, vit_config.num_heads) for head in request.heads
    }
    graph = ServingGraph(backbone, heads)
    lap("load")
    log(
        f"loaded backbone {request.backbone} ({request.weights}; "
        f"{sum(p.numel() for p in backbone.parameters()):,} parameters) and {len(heads)} heads"
    )

    with tempfile.TemporaryDirectory(prefix="fmhct-export-", dir=request.work_dir) as work:
        onnx_path = Path(work) / repository.ONNX_FILENAME
        info = export_onnx(
            graph, onnx_path, opset=request.opset, max_batch_size=request.serving.max_batch_size
        )
        outcome.onnx = info
        lap("onnx_export")
        log(
            f"exported ONNX opset {info.opset}: {info.size_bytes / 1e6:.1f} MB, {info.layer_norm_nodes} "
            f"LayerNormalization nodes, sha256 {info.sha256[:16]}... in {info.seconds:.1f} s"
        )
        parity = check_parity(
            graph, onnx_path, batch_sizes=request.parity_batch_sizes, seed=request.parity_seed
        )
        outcome.parity = parity
        lap("parity")
        log(parity.summary())
        parity.raise_if_failed()

        artifacts: dict[str, Path] = {repository.ONNX_FILENAME: onnx_path}
        extra: dict[str, Path] = {}
        if request.target == "trt":
            plan_path = Path(work) / repository.PLAN_FILENAME
            outcome.engine = tensorrt_build.build_engine(
                onnx_path,
                plan_path,
                tensorrt_build.EngineBuildSettings(
                    max_batch_size=request.serving.max_batch_size,
                    precision=request.precision,
                    opt_batch_size=request.opt_batch_size,
                    workspace_bytes=request.workspace_bytes,
                    timing_cache=request.timing_cache,
                ),
                log=log,
            )
            artifacts = {repository.PLAN_FILENAME: plan_path}
            extra = {plan_path.name + tensorrt_build.METADATA_SUFFIX: tensorrt_build.metadata_path(plan_path)}
            lap("tensorrt_build")

        version = request.version if request.version is not None else repository.next_version(model_dir)
        exported_with = _versions(request.target, outcome.engine)
        exported_with.update(
            backbone_weights=request.weights,
            parity_max_abs_probability_diff=f"{parity.max_abs_probability_diff:.3e}",
            parity_max_abs_embedding_diff=f"{parity.max_abs_embedding_diff:.3e}",
            parity_batch_sizes=",".join(str(b.batch_size) for b in parity.batches),
        )
        card = ModelCard(
            name=request.model_name,
            triton_version=version,
            model_version=request.model_version or _default_model_version(request, checkpoint_sha256),
            synthetic_demo=request.synthetic_demo,
            notice=SYNTHETIC_DEMO_NOTICE if request.synthetic_demo else (request.notice or DEFAULT_NOTICE),
            checkpoint_sha256=checkpoint_sha256,
            onnx_sha256=info.sha256,
            embedding_dim=info.embedding_dim,
            architecture=vit_config.to_dict(),
            tasks=[
                TaskCard(
                    name=head.name,
                    threshold=head.threshold,
                    head_type="attentive" if isinstance(module, AttentiveHead) else "linear",
                    head_sha256=sha,
                    heldout_auc=head.heldout_auc,
                )
                for head, sha, module in zip(request.heads, head_sha256, heads.values(), strict=True)
            ],
            max_batch_size=request.serving.max_batch_size,
            exported_with=exported_with,
        )
        outcome.card = card
        outcome.entry = repository.write_model(
            request.repository,
            target=request.target,
            card=card,
            artifacts=artifacts,
            options=request.serving,
            extra_files=extra,
        )
        lap("write_repository")
    log(f"wrote {outcome.entry.version_dir} ({request.target}); config {outcome.entry.config_path}")
    return outcome
