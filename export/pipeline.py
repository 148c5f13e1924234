"""The export pipeline behind `python -m export`: checkpoints -> ServingGraph -> ONNX (+ parity) ->
[TensorRT engine] -> Triton repository entry with its model card.

Nothing is written into the repository unless every earlier step succeeded, and an entry that is already
current (same checkpoint and head hashes, tasks, thresholds, target, batch size) is left alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from export import reference, repository, tensorrt_build
from export import tasks as tasks_module
from export.onnx_export import DEFAULT_OPSET, OnnxExportInfo, ParityReport
from export.repository import ServingOptions, Target, WrittenEntry
from export.tasks import ExportError, TaskSpec
from headct import contract
from headct.model_card import SYNTHETIC_DEMO_NOTICE, BackboneGroup, InputContract, ModelCard, TaskCard

if TYPE_CHECKING:
    from torch import nn

    from export.checkpoint import LoadedBackbone
    from export.serving_graph import ServingGraph

Log = Callable[[str], None]

# headct.model_card only defines the demo notice; this is the default for real checkpoints.
DEFAULT_NOTICE = (
    "FM-HCT research model. Not a medical device: outputs are decision support for qualified readers and "
    "must not be the sole basis of a clinical decision."
)


@dataclass(frozen=True)
class ExportRequest:
    """What to export. `backbone` is the shared (pretrained) backbone: the `embedding` of the answers
    and the backbone of every task spec without its own; it may be None when every task names one."""

    backbone: Path | None
    tasks: tuple[TaskSpec, ...]
    target: Target
    repository: Path
    model_name: str = contract.DEFAULT_MODEL_NAME
    weights: Literal["student", "teacher"] = "student"
    registers: Literal["drop", "keep"] = "drop"
    allow_unpaired: bool = False
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
    if not request.tasks:
        raise ExportError("at least one --task NAME=BACKBONE,HEAD[:THRESHOLD] or --head is required")
    shared = [spec.name for spec in request.tasks if spec.backbone is None]
    if shared and request.backbone is None:
        raise ExportError(f"task(s) {shared} use the shared backbone, but no --backbone was given")
    names = [spec.name for spec in request.tasks]
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


def _backbone_paths(request: ExportRequest) -> list[Path]:
    """Every backbone file of the request, shared one first, each once."""
    paths = [request.backbone] if request.backbone is not None else []
    paths += [spec.backbone for spec in request.tasks if spec.backbone is not None]
    return list(dict.fromkeys(paths))


def combined_checkpoint_sha256(file_sha256s: Sequence[str]) -> str:
    """One backbone file: its sha256. Several: sha256 of their sorted, newline-joined hashes."""
    unique = sorted(set(file_sha256s))
    if len(unique) == 1:
        return unique[0]
    return hashlib.sha256("\n".join(unique).encode()).hexdigest()


def _settings_fingerprint(request: ExportRequest, backbone_sha256: dict[Path, str]) -> str:
    """What, beside the files, decides the served graph: which backbone serves which task, and how."""
    shared = backbone_sha256[request.backbone] if request.backbone is not None else ""
    tasks = [
        f"{spec.name}:{backbone_sha256[spec.backbone] if spec.backbone is not None else shared}"
        for spec in request.tasks
    ]
    return ";".join(
        [f"shared:{shared}", *tasks, f"registers:{request.registers}", f"weights:{request.weights}",
         f"allow_unpaired:{request.allow_unpaired}"]
    )  # fmt: skip


def current_entry(
    request: ExportRequest, checkpoint_sha256: str, head_sha256: Sequence[str], fingerprint: str = ""
) -> ModelCard | None:
    """The existing card if the repository entry already serves exactly this request, else None."""
    model_dir = request.repository / request.model_name
    try:
        card = repository.read_model_card(model_dir)
    except ValueError:  # a card of an older schema: not current, rewrite
        return None
    config_path = model_dir / repository.CONFIG_FILENAME
    if card is None or not config_path.is_file():
        return None
    try:
        config = repository.read_config(config_path)
    except Exception:  # unreadable config: not current, rewrite
        return None
    wanted_tasks = [
        (spec.name, sha, spec.threshold, spec.heldout_auc)
        for spec, sha in zip(request.tasks, head_sha256, strict=True)
    ]
    have_tasks = [(t.name, t.head_sha256, t.threshold, t.heldout_auc) for t in card.tasks]
    version_dir = model_dir / str(card.triton_version)
    current = (
        card.checkpoint_sha256 == checkpoint_sha256
        and card.exported_with.get("request_fingerprint", "") == fingerprint
        and have_tasks == wanted_tasks
        and card.preprocessing_version == contract.PREPROCESSING_VERSION
        and card.synthetic_demo == request.synthetic_demo
        and card.max_batch_size == request.serving.max_batch_size
        and repository.target_of(config) == request.target
        and (request.model_version is None or card.model_version == request.model_version)
        and (request.version is None or card.triton_version == request.version)
        and repository.existing_versions(model_dir)[-1:] == [card.triton_version]
        and all((version_dir / name).is_file() for name in repository.version_artifacts(request.target))
        # An entry exported before explanation maps existed lacks the attention outputs: re-export.
        and all(group.attention_output is not None for group in card.groups if group.tasks)
        and all(task.attention_method is not None for task in card.tasks)
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


@dataclass
class _Loaded:
    """The request's checkpoints, loaded, paired and grouped."""

    graph: ServingGraph
    groups: list[tasks_module.BackboneGroup]
    embedding_group: tasks_module.BackboneGroup
    task_cards: list[TaskCard]


def _load_and_group(request: ExportRequest, backbone_sha256: dict[Path, str], log: Log) -> _Loaded:
    from export.checkpoint import load_backbone_checkpoint, load_head_checkpoint
    from export.heads import AttentiveHead
    from export.serving_graph import GraphGroup, ServingGraph

    backbones = {
        path: load_backbone_checkpoint(
            path,
            weights=request.weights,
            num_heads=request.num_heads,
            registers=request.registers,
            file_sha256=backbone_sha256[path],
        )
        for path in _backbone_paths(request)
    }
    assignments: list[tuple[str | None, LoadedBackbone]] = []
    if request.backbone is not None:
        assignments.append((None, backbones[request.backbone]))
    heads: dict[str, nn.Module] = {}
    pairings: dict[str, tasks_module.Pairing] = {}
    head_types: dict[str, str] = {}
    head_sha256: dict[str, str] = {}
    for spec in request.tasks:
        backbone_path = spec.backbone if spec.backbone is not None else request.backbone
        if backbone_path is None:  # validation refuses this before anything is loaded
            raise ExportError(f"task {spec.name!r} uses the shared backbone, but no --backbone was given")
        backbone = backbones[backbone_path]
        # The official attentive head uses the backbone's head count.
        head = load_head_checkpoint(spec.head, backbone.config.embed_dim, backbone.config.num_heads)
        pairings[spec.name] = tasks_module.check_pairing(
            spec.name, backbone, head, allow_unpaired=request.allow_unpaired
        )
        heads[spec.name] = head.module
        head_sha256[spec.name] = head.file_sha256
        head_types[spec.name] = "attentive" if isinstance(head.module, AttentiveHead) else "linear"
        assignments.append((spec.name, backbone))
    groups = tasks_module.group_backbones(assignments)
    graph = ServingGraph(
        groups=[
            GraphGroup(
                group.backbone.model,
                {task: heads[task] for task in group.tasks},
                probabilities_output=group.probabilities_output,
                embedding_output=group.embedding_output,
                attention_output=group.attention_output,
            )
            for group in groups
        ]
    )
    attention_methods = graph.attention_methods
    group_of = {task: group for group in groups for task in group.tasks}
    embedding_group = group_of[request.tasks[0].name] if request.backbone is None else groups[0]
    for group in groups:
        files = ", ".join(str(c.path) for c in group.checkpoints)
        log(f"backbone group {group.name!r} ({files}; registers {group.backbone.registers}): {group.tasks}")
    task_cards = [
        TaskCard(
            name=spec.name,
            threshold=spec.threshold,
            head_type=head_types[spec.name],
            head_sha256=head_sha256[spec.name],
            heldout_auc=spec.heldout_auc,
            group=group_of[spec.name].name,
            pairing=pairings[spec.name].status,
            pairing_detail=pairings[spec.name].detail,
            attention_method=attention_methods[spec.name],
        )
        for spec in request.tasks
    ]
    return _Loaded(graph, groups, embedding_group, task_cards)


def _card_groups(groups: Sequence[tasks_module.BackboneGroup]) -> list[BackboneGroup]:
    return [
        BackboneGroup(
            name=group.name,
            weights_sha256=group.backbone.weights_sha256,
            checkpoints=[c.path.name for c in group.checkpoints],
            checkpoint_sha256s=[c.file_sha256 for c in group.checkpoints],
            architecture=group.backbone.config.to_dict(),
            registers=group.backbone.registers,
            tasks=list(group.tasks),
            probabilities_output=group.probabilities_output,
            embedding_output=group.embedding_output,
            attention_output=group.attention_output,
        )
        for group in groups
    ]


class _Stopwatch:
    """Seconds per pipeline stage, into `ExportOutcome.timings`."""

    def __init__(self, timings: dict[str, float]) -> None:
        self.timings = timings
        self.clock = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.timings[stage] = now - self.clock
        self.clock = now


def _write_onnx(
    request: ExportRequest, loaded: _Loaded, work: Path, outcome: ExportOutcome, watch: _Stopwatch, log: Log
) -> tuple[Path, OnnxExportInfo, ParityReport]:
    """ONNX export, parity against PyTorch (raises when it fails) and the TensorRT gate's reference."""
    from export.onnx_export import check_parity, export_onnx

    onnx_path = work / repository.ONNX_FILENAME
    info = export_onnx(
        loaded.graph, onnx_path, opset=request.opset, max_batch_size=request.serving.max_batch_size
    )
    outcome.onnx = info
    watch.lap("onnx_export")
    log(
        f"exported ONNX opset {info.opset}: {info.size_bytes / 1e6:.1f} MB, {info.layer_norm_nodes} "
        f"LayerNormalization nodes, sha256 {info.sha256[:16]}... in {info.seconds:.1f} s"
    )
    parity = check_parity(
        loaded.graph, onnx_path, batch_sizes=request.parity_batch_sizes, seed=request.parity_seed
    )
    outcome.parity = parity
    watch.lap("parity")
    log(parity.summary())
    parity.raise_if_failed()
    return onnx_path, info, parity


def _artifacts(
    request: ExportRequest, onnx_path: Path, work: Path, outcome: ExportOutcome, watch: _Stopwatch, log: Log
) -> tuple[dict[str, Path], dict[str, Path]]:
    """The version directory's files: the ONNX (+ engine for trt) and the extras beside them."""
    # Fixed inputs (random volumes + one preprocessed synthetic head) and ONNX Runtime's outputs on
    # them: the reference every TensorRT engine built from this ONNX is gated against, here or in the
    # serving pod (where no ONNX Runtime for Python exists).
    reference_path = reference.write_reference(onnx_path)
    watch.lap("reference")
    artifacts: dict[str, Path] = {repository.ONNX_FILENAME: onnx_path}
    extra: dict[str, Path] = {reference.REFERENCE_FILENAME: reference_path}
    if request.target == "trt":
        plan_path = work / repository.PLAN_FILENAME
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
        artifacts[repository.PLAN_FILENAME] = plan_path
        extra[plan_path.name + tensorrt_build.METADATA_SUFFIX] = tensorrt_build.metadata_path(plan_path)
        watch.lap("tensorrt_build")
    return artifacts, extra


def _model_card(
    request: ExportRequest,
    loaded: _Loaded,
    *,
    version: int,
    checkpoint_sha256: str,
    fingerprint: str,
    info: OnnxExportInfo,
    parity: ParityReport,
    engine: tensorrt_build.EngineMetadata | None,
) -> ModelCard:
    exported_with = _versions(request.target, engine)
    exported_with.update(
        backbone_weights=request.weights,
        registers=request.registers,
        request_fingerprint=fingerprint,
        parity_max_abs_probability_diff=f"{parity.max_abs_probability_diff:.3e}",
        parity_max_abs_embedding_diff=f"{parity.max_abs_embedding_diff:.3e}",
        parity_batch_sizes=",".join(str(b.batch_size) for b in parity.batches),
    )
    return ModelCard(
        name=request.model_name,
        triton_version=version,
        model_version=request.model_version or _default_model_version(request, checkpoint_sha256),
        synthetic_demo=request.synthetic_demo,
        notice=SYNTHETIC_DEMO_NOTICE if request.synthetic_demo else (request.notice or DEFAULT_NOTICE),
        checkpoint_sha256=checkpoint_sha256,
        onnx_sha256=info.sha256,
        preprocessing_version=contract.PREPROCESSING_VERSION,
        input=InputContract(),
        embedding_dim=loaded.embedding_group.backbone.config.embed_dim,
        architecture=loaded.embedding_group.backbone.config.to_dict(),
        tasks=loaded.task_cards,
        groups=_card_groups(loaded.groups),
        embedding_group=loaded.embedding_group.name,
        unpaired_allowed=request.allow_unpaired,
        max_batch_size=request.serving.max_batch_size,
        exported_with=exported_with,
    )


def run_export(request: ExportRequest, *, log: Log = print) -> ExportOutcome:
    """Run the whole pipeline; raise on any failure (nothing is written into the repository then)."""
    _validate(request)
    model_dir = request.repository / request.model_name
    outcome = ExportOutcome(skipped=False, model_dir=model_dir)
    watch = _Stopwatch(outcome.timings)

    backbone_sha256 = {path: _hash(path) for path in _backbone_paths(request)}
    checkpoint_sha256 = combined_checkpoint_sha256(list(backbone_sha256.values()))
    fingerprint = _settings_fingerprint(request, backbone_sha256)
    head_sha256 = [_hash(spec.head) for spec in request.tasks]
    watch.lap("hash")
    if not request.force:
        card = current_entry(request, checkpoint_sha256, head_sha256, fingerprint)
        if card is not None:
            log(f"{model_dir}/{card.triton_version} is current (same checkpoints and settings); skipped")
            outcome.skipped, outcome.card = True, card
            return outcome

    if request.version is not None and (model_dir / str(request.version)).exists():
        raise repository.RepositoryError(f"{model_dir / str(request.version)} already exists")
    if request.target == "trt":
        # Refuse before spending a minute on export: no TensorRT or no GPU -> EngineBuildRefused.
        tensorrt_build.preflight()

    loaded = _load_and_group(
        request, backbone_sha256, log
    )  # torch-heavy imports only now: skips and refusals stay fast
    watch.lap("load")
    log(
        f"loaded {len(loaded.groups)} backbone group(s) "
        f"({sum(p.numel() for p in loaded.graph.parameters()):,} parameters) and {len(request.tasks)} heads"
    )
    with tempfile.TemporaryDirectory(prefix="fmhct-export-", dir=request.work_dir) as work:
        onnx_path, info, parity = _write_onnx(request, loaded, Path(work), outcome, watch, log)
        artifacts, extra = _artifacts(request, onnx_path, Path(work), outcome, watch, log)
        version = request.version if request.version is not None else repository.next_version(model_dir)
        outcome.card = _model_card(
            request,
            loaded,
            version=version,
            checkpoint_sha256=checkpoint_sha256,
            fingerprint=fingerprint,
            info=info,
            parity=parity,
            engine=outcome.engine,
        )
        outcome.entry = repository.write_model(
            request.repository,
            target=request.target,
            card=outcome.card,
            artifacts=artifacts,
            options=request.serving,
            extra_files=extra,
        )
        watch.lap("write_repository")
    log(f"wrote {outcome.entry.version_dir} ({request.target}); config {outcome.entry.config_path}")
    return outcome
