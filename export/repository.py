"""Write one model into a Triton model repository, for one of three serving targets.

Layout (per Triton's model_repository.md):

    <repo>/<model>/config.pbtxt        ModelConfig, built as a protobuf message and printed by text_format
    <repo>/<model>/labels.txt          task names, one per line (label_filename of `probabilities`;
                                       labels__<group>.txt for `probabilities__<group>`)
    <repo>/<model>/model_card.json     headct.model_card.ModelCard (also embedded in config parameters)
    <repo>/<model>/<version>/          model.py + model.onnx (cpu) | model.onnx (onnx) |
                                       model.plan + model.onnx (trt; the ONNX is the fallback)

Targets: `cpu` = Python-backend model running the ONNX with ONNX Runtime (what the tritonserver 2.51 bundled
with nvidia-pytriton serves: it has no onnxruntime/tensorrt backend); `onnx` = `onnxruntime_onnx` platform
for the official Triton image; `trt` = `tensorrt_plan` platform with an engine built on the target GPU.

Config and labels describe the newest version (version_policy latest 1 serves only that one). Files are
replaced atomically and a version directory appears only complete, so a polling Triton never reads a
half-written entry.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from headct import contract
from headct.files import atomic_write_text
from headct.model_card import MODEL_CARD_FILENAME, MODEL_CARD_PARAMETER, ModelCard

Target = Literal["cpu", "onnx", "trt"]
TARGETS: tuple[Target, ...] = ("cpu", "onnx", "trt")
CONFIG_FILENAME = "config.pbtxt"
LABELS_FILENAME = "labels.txt"
ONNX_FILENAME = "model.onnx"
PLAN_FILENAME = "model.plan"
PYTHON_MODEL_FILENAME = "model.py"
# The Python-backend model's source, copied verbatim into every cpu-target version directory.
PYTHON_MODEL_SOURCE = Path(__file__).with_name("triton_python_model.py")
INTRA_OP_THREADS_PARAMETER = "intra_op_num_threads"

# Batching: hold the first request at most 2 ms for companions. One 96^3 volume costs ~5-10 ms on a GPU
# and seconds on a CPU, so a short delay already forms the batches that are there to be formed.
DEFAULT_MAX_QUEUE_DELAY_US = 2_000
# Back-pressure: beyond this many queued requests Triton answers UNAVAILABLE (gateway -> HTTP 503)
# instead of letting latency grow without bound.
DEFAULT_QUEUE_SIZE_PER_BATCH = 4
# A request still queued after this is rejected; the gateway may pass a shorter per-request timeout.
DEFAULT_QUEUE_TIMEOUT_US: Mapping[Target, int] = {"cpu": 60_000_000, "onnx": 10_000_000, "trt": 10_000_000}

_ARTIFACTS: Mapping[Target, tuple[str, ...]] = {
    "cpu": (PYTHON_MODEL_FILENAME, ONNX_FILENAME),
    "onnx": (ONNX_FILENAME,),
    # The ONNX travels with the engine: the serving pod falls back to it when the engine cannot be used.
    "trt": (PLAN_FILENAME, ONNX_FILENAME),
}


class RepositoryError(RuntimeError):
    """The repository entry cannot be written as asked (existing version, missing artifact, ...)."""


@dataclass(frozen=True)
class ServingOptions:
    """Scheduler/instance knobs of the generated config; defaults suit one GPU or a small CPU node."""

    max_batch_size: int = 8
    max_queue_delay_microseconds: int = DEFAULT_MAX_QUEUE_DELAY_US
    max_queue_size: int | None = None  # default: DEFAULT_QUEUE_SIZE_PER_BATCH * max_batch_size
    queue_timeout_microseconds: int | None = None  # default: per target, DEFAULT_QUEUE_TIMEOUT_US
    instance_count: int = 1
    intra_op_threads: int = 0  # cpu target: ONNX Runtime intra-op threads; 0 = ORT's default (all cores)

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.instance_count < 1 or self.intra_op_threads < 0 or self.max_queue_delay_microseconds < 0:
            raise ValueError("instance_count must be >= 1; intra_op_threads and queue delay >= 0")


def _datatype(wire: str) -> int:
    """Triton wire datatype ("FP16") -> config enum (TYPE_FP16)."""
    return mc.DataType.Value(f"TYPE_{wire}")


@dataclass(frozen=True)
class OutputSpec:
    """One FP32 [batch, width, *extra_dims] output; `labels` names its columns (a probabilities output's
    tasks). An attention output is [batch, n_tasks, 8, 8, 8]: width n_tasks, extra_dims (8, 8, 8)."""

    name: str
    width: int
    labels: tuple[str, ...] = ()
    extra_dims: tuple[int, ...] = ()

    @property
    def dims(self) -> list[int]:
        """The config's dims (without the batch axis)."""
        return [self.width, *self.extra_dims]

    @property
    def label_filename(self) -> str:
        """labels.txt for the plain `probabilities`, labels__<group>.txt for a group's output."""
        _, _, group = self.name.partition(contract.GROUP_SEPARATOR)
        return f"labels{contract.GROUP_SEPARATOR}{group}.txt" if group else LABELS_FILENAME


def card_outputs(card: ModelCard) -> list[OutputSpec]:
    """The outputs a card's backbone groups produce, in graph order."""
    outputs = []
    for group in card.groups:
        if group.probabilities_output is not None:
            outputs.append(OutputSpec(group.probabilities_output, len(group.tasks), tuple(group.tasks)))
        outputs.append(OutputSpec(group.embedding_output, int(group.architecture["embed_dim"])))
        if group.attention_output is not None:
            grid = int(group.architecture["img_size"]) // int(group.architecture["patch_size"])
            outputs.append(
                OutputSpec(group.attention_output, len(group.tasks), extra_dims=(grid, grid, grid))
            )
    return outputs


def build_model_config(
    *,
    model_name: str,
    target: Target,
    model_card_json: str,
    options: ServingOptions,
    task_names: Sequence[str] = (),
    embedding_dim: int | None = None,
    outputs: Sequence[OutputSpec] | None = None,
) -> mc.ModelConfig:
    """The complete ModelConfig (Triton runs with auto-complete disabled, so nothing is left implicit).

    `outputs` lists every output (see `card_outputs`); a one-group model may give `task_names` and
    `embedding_dim` instead.
    """
    outputs = _resolve_outputs(task_names, embedding_dim, outputs)
    if target not in TARGETS:
        raise RepositoryError(f"unknown target {target!r}; expected one of {TARGETS}")
    config = mc.ModelConfig(name=model_name, max_batch_size=options.max_batch_size)
    _set_backend(config, target)
    config.version_policy.latest.num_versions = 1
    _add_tensors(config, outputs)
    _set_dynamic_batching(config, target, options)
    config.instance_group.add(
        count=options.instance_count,
        kind=mc.ModelInstanceGroup.KIND_CPU if target == "cpu" else mc.ModelInstanceGroup.KIND_GPU,
    )
    _add_warmup(config)
    config.parameters[MODEL_CARD_PARAMETER].string_value = model_card_json
    if target == "cpu":
        config.parameters[INTRA_OP_THREADS_PARAMETER].string_value = str(options.intra_op_threads)
    return config


def _resolve_outputs(
    task_names: Sequence[str], embedding_dim: int | None, outputs: Sequence[OutputSpec] | None
) -> Sequence[OutputSpec]:
    """`outputs` as given, or the one-group pair (probabilities, embedding) from the shorthand arguments."""
    if outputs is None:
        if not task_names or embedding_dim is None:
            raise RepositoryError("give outputs, or task_names and embedding_dim")
        outputs = [
            OutputSpec(contract.PROBABILITIES_NAME, len(task_names), tuple(task_names)),
            OutputSpec(contract.EMBEDDING_NAME, embedding_dim),
        ]
    return outputs


def _set_backend(config: mc.ModelConfig, target: Target) -> None:
    """What runs the model: the Python backend (cpu), or the ONNX Runtime / TensorRT platform."""
    if target == "cpu":
        config.backend = "python"
        config.default_model_filename = PYTHON_MODEL_FILENAME
    elif target == "onnx":
        config.platform = "onnxruntime_onnx"
        config.default_model_filename = ONNX_FILENAME
    else:
        config.platform = "tensorrt_plan"
        config.default_model_filename = PLAN_FILENAME


def _add_tensors(config: mc.ModelConfig, outputs: Sequence[OutputSpec]) -> None:
    """The contract's input and every output, with the label file of each output that has labels."""
    # With max_batch_size > 0 Triton prepends the batch axis itself: dims never include it.
    config.input.add(
        name=contract.INPUT_NAME, data_type=_datatype(contract.INPUT_DATATYPE), dims=contract.INPUT_SHAPE
    )
    for output in outputs:
        tensor = config.output.add(
            name=output.name, data_type=_datatype(contract.OUTPUT_DATATYPE), dims=output.dims
        )
        if output.labels:
            tensor.label_filename = output.label_filename


def _set_dynamic_batching(config: mc.ModelConfig, target: Target, options: ServingOptions) -> None:
    """Batch delay, priority levels and the queue policy that turns overload into fast rejections."""
    # No preferred_batch_size: Triton's batcher guide advises it only for TensorRT engines with several
    # optimization profiles of very different speed. We build one profile (1..max), so the batcher
    # should simply send the largest batch available within the delay. (Triton's *effective* config
    # then shows preferred_batch_size [max_batch_size]: its own normalisation, same behaviour.)
    batching = config.dynamic_batching
    batching.max_queue_delay_microseconds = options.max_queue_delay_microseconds
    policy = batching.default_queue_policy
    policy.max_queue_size = options.max_queue_size or DEFAULT_QUEUE_SIZE_PER_BATCH * options.max_batch_size
    # REJECT is enum value 0, proto3's default, so text_format leaves it out of config.pbtxt; it is set
    # here to say so, and the tests check it after parsing.
    policy.timeout_action = mc.ModelQueuePolicy.REJECT
    policy.default_timeout_microseconds = (
        options.queue_timeout_microseconds or DEFAULT_QUEUE_TIMEOUT_US[target]
    )
    policy.allow_timeout_override = True
    # Priority lanes (api/inference/lanes.py): STAT requests (priority 1) leave Triton's queue before
    # routine ones (2, also what a request without a priority gets) and bulk ones (3). Each level has
    # its own queue under the default policy, so a full bulk queue does not refuse STAT.
    batching.priority_levels = contract.PRIORITY_LEVELS
    batching.default_priority_level = contract.DEFAULT_PRIORITY_LEVEL


def _add_warmup(config: mc.ModelConfig) -> None:
    """One all-zero batch-1 warmup request."""
    # Triton reports the model ready only after warmup: ready means warm (ORT sessions initialised,
    # TensorRT contexts and CUDA memory allocated) instead of the first patient paying for it.
    warmup = config.model_warmup.add(name="zero_batch1", batch_size=1, count=1)
    warmup.inputs[contract.INPUT_NAME].CopyFrom(
        mc.ModelWarmup.Input(
            data_type=_datatype(contract.INPUT_DATATYPE), dims=contract.INPUT_SHAPE, zero_data=True
        )
    )


def render_config(config: mc.ModelConfig) -> str:
    return text_format.MessageToString(config)


def read_config(path: str | Path) -> mc.ModelConfig:
    return text_format.Parse(Path(path).read_text(), mc.ModelConfig())


def read_model_card(model_dir: str | Path) -> ModelCard | None:
    path = Path(model_dir) / MODEL_CARD_FILENAME
    if not path.is_file():
        return None
    return ModelCard.model_validate_json(path.read_text())


def existing_versions(model_dir: str | Path) -> list[int]:
    """Numbered version directories (Triton ignores anything else, e.g. our staging dirs)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return []
    return sorted(
        int(p.name)
        for p in model_dir.iterdir()
        if p.is_dir() and p.name.isdigit() and not p.name.startswith("0")
    )


def next_version(model_dir: str | Path) -> int:
    versions = existing_versions(model_dir)
    return versions[-1] + 1 if versions else 1


def target_of(config: mc.ModelConfig) -> Target | None:
    if config.backend == "python":
        return "cpu"
    platforms: dict[str, Target] = {"onnxruntime_onnx": "onnx", "tensorrt_plan": "trt"}
    return platforms.get(config.platform)


def version_artifacts(target: Target) -> tuple[str, ...]:
    return _ARTIFACTS[target]


@dataclass(frozen=True)
class WrittenEntry:
    model_dir: Path
    version: int
    version_dir: Path
    config_path: Path


def write_model(
    repository: str | Path,
    *,
    target: Target,
    card: ModelCard,
    artifacts: Mapping[str, Path],
    options: ServingOptions,
    extra_files: Mapping[str, Path] | None = None,
) -> WrittenEntry:
    """Write `<repository>/<card.name>/` for `target`, as version `card.triton_version`.

    `artifacts` maps version-dir file names to source files: {"model.onnx": ...} for cpu/onnx,
    {"model.plan": ..., "model.onnx": ...} for trt (model.py is added for cpu). `extra_files` land in
    the version dir too (e.g. model.plan.json). Raises RepositoryError if that version already exists.
    """
    if target not in TARGETS:
        raise RepositoryError(f"unknown target {target!r}; expected one of {TARGETS}")
    if card.max_batch_size != options.max_batch_size:
        raise RepositoryError(
            f"card max_batch_size {card.max_batch_size} != options {options.max_batch_size}"
        )
    sources = dict(artifacts)
    if target == "cpu":
        sources.setdefault(PYTHON_MODEL_FILENAME, PYTHON_MODEL_SOURCE)
    missing = [
        name for name in _ARTIFACTS[target] if name not in sources or not Path(sources[name]).is_file()
    ]
    if missing:
        raise RepositoryError(f"target {target!r} needs {list(_ARTIFACTS[target])}; missing {missing}")
    if card.triton_version < 1:
        raise RepositoryError(f"Triton versions start at 1, got {card.triton_version}")

    model_dir = Path(repository) / card.name
    version_dir = model_dir / str(card.triton_version)
    if version_dir.exists():
        raise RepositoryError(f"{version_dir} already exists; pick another --version or omit it for max+1")
    model_dir.mkdir(parents=True, exist_ok=True)

    # Stage the version dir beside its final place (same filesystem), then rename: atomic appearance.
    # The staging name is not numeric, so Triton ignores it meanwhile.
    staging = model_dir / f".staging-{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        for name, source in {**sources, **(extra_files or {})}.items():
            shutil.copyfile(source, staging / name)
        os.rename(staging, version_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

    card_json = card.model_dump_json()
    outputs = card_outputs(card)
    config = build_model_config(
        model_name=card.name, target=target, model_card_json=card_json, options=options, outputs=outputs
    )
    for output in outputs:
        if output.labels:
            labels = "".join(f"{name}\n" for name in output.labels)
            atomic_write_text(model_dir / output.label_filename, labels)
    atomic_write_text(model_dir / MODEL_CARD_FILENAME, json.dumps(json.loads(card_json), indent=2) + "\n")
    # Last, so that a polling server sees the new config only once everything it refers to exists.
    config_path = model_dir / CONFIG_FILENAME
    atomic_write_text(config_path, render_config(config))
    return WrittenEntry(
        model_dir=model_dir, version=card.triton_version, version_dir=version_dir, config_path=config_path
    )
