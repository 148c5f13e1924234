"""Triton repository layout and config.pbtxt for the three targets, the Python-backend model (with a stub
`triton_python_backend_utils`), and the export CLI end to end on tiny checkpoints (cpu target)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
import types
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnx
import pytest
from google.protobuf import json_format, text_format
from onnx import TensorProto, helper
from tritonclient.grpc import model_config_pb2 as mc

from export import repository
from export.repository import RepositoryError, ServingOptions, write_model
from headct import contract
from headct.model_card import MODEL_CARD_FILENAME, MODEL_CARD_PARAMETER, ModelCard
from tests import cards

TASKS = ("hemorrhage", "edema")
EMBED = 4


def make_card(version: int = 1, max_batch_size: int = 8, **overrides: Any) -> ModelCard:
    return cards.make_card(
        [(name, 0.5) for name in TASKS],
        embed_dim=EMBED,
        triton_version=version,
        max_batch_size=max_batch_size,
        model_version="fmhct-test",
        **overrides,
    )


def tiny_onnx(path: Path) -> Path:
    """A torch-free stand-in graph with the serving contract: mean over voxels -> 2 sigmoid probs, 4-d emb."""
    rng = np.random.default_rng(0)
    w_prob = helper.make_tensor("w_prob", TensorProto.FLOAT, [3, len(TASKS)], rng.normal(size=6).tolist())
    w_emb = helper.make_tensor("w_emb", TensorProto.FLOAT, [3, EMBED], rng.normal(size=12).tolist())
    nodes = [
        helper.make_node("Cast", ["image"], ["x"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["x"], ["pooled"], axes=[2, 3, 4], keepdims=0),
        helper.make_node("MatMul", ["pooled", "w_prob"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], [contract.PROBABILITIES_NAME]),
        helper.make_node("MatMul", ["pooled", "w_emb"], [contract.EMBEDDING_NAME]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT16, ["batch", *contract.INPUT_SHAPE])],
        [
            helper.make_tensor_value_info(
                contract.PROBABILITIES_NAME, TensorProto.FLOAT, ["batch", len(TASKS)]
            ),
            helper.make_tensor_value_info(contract.EMBEDDING_NAME, TensorProto.FLOAT, ["batch", EMBED]),
        ],
        initializer=[w_prob, w_emb],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.fixture
def artifacts(tmp_path: Path) -> dict[str, Path]:
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"PLAN")
    return {"model.onnx": tiny_onnx(tmp_path / "model.onnx"), "model.plan": plan}


def _write(
    repo: Path, target: repository.Target, artifacts: dict[str, Path], **kw: Any
) -> repository.WrittenEntry:
    # A trt entry ships its ONNX too: the fallback when the engine cannot be used.
    names = ["model.plan", "model.onnx"] if target == "trt" else ["model.onnx"]
    card = kw.pop("card", make_card())
    return write_model(
        repo,
        target=target,
        card=card,
        artifacts={name: artifacts[name] for name in names},
        options=ServingOptions(),
        **kw,
    )


@pytest.mark.parametrize(
    ("target", "platform", "backend", "kind", "files"),
    [
        ("cpu", "", "python", mc.ModelInstanceGroup.KIND_CPU, {"model.py", "model.onnx"}),
        ("onnx", "onnxruntime_onnx", "", mc.ModelInstanceGroup.KIND_GPU, {"model.onnx"}),
        ("trt", "tensorrt_plan", "", mc.ModelInstanceGroup.KIND_GPU, {"model.plan", "model.onnx"}),
    ],
)
def test_config_and_layout_per_target(
    tmp_path: Path,
    artifacts: dict[str, Path],
    target: Any,
    platform: str,
    backend: str,
    kind: int,
    files: set[str],
) -> None:
    repo = tmp_path / "repo"
    entry = _write(repo, target, artifacts)
    model_dir = repo / "fmhct"
    assert entry.version == 1 and entry.version_dir == model_dir / "1"
    assert {p.name for p in entry.version_dir.iterdir()} == files
    assert sorted(p.name for p in model_dir.iterdir()) == [
        "1",
        "config.pbtxt",
        "labels.txt",
        MODEL_CARD_FILENAME,
    ]
    assert (model_dir / "labels.txt").read_text() == "hemorrhage\nedema\n"
    if target == "cpu":
        assert (entry.version_dir / "model.py").read_bytes() == repository.PYTHON_MODEL_SOURCE.read_bytes()

    config = text_format.Parse((model_dir / "config.pbtxt").read_text(), mc.ModelConfig())
    assert (config.name, config.platform, config.backend) == ("fmhct", platform, backend)
    assert config.max_batch_size == 8
    assert config.version_policy.latest.num_versions == 1

    (image,) = config.input
    assert (image.name, image.data_type, list(image.dims)) == ("image", mc.TYPE_FP16, [3, 96, 96, 96])
    probabilities, embedding = config.output
    assert (probabilities.name, probabilities.data_type, list(probabilities.dims)) == (
        "probabilities",
        mc.TYPE_FP32,
        [2],
    )
    assert probabilities.label_filename == "labels.txt"
    assert (embedding.name, embedding.data_type, list(embedding.dims)) == ("embedding", mc.TYPE_FP32, [EMBED])

    batching = config.dynamic_batching
    assert 0 < batching.max_queue_delay_microseconds <= 10_000
    assert list(batching.preferred_batch_size) == []
    policy = batching.default_queue_policy
    assert policy.max_queue_size == 32
    assert policy.timeout_action == mc.ModelQueuePolicy.REJECT
    assert policy.default_timeout_microseconds == repository.DEFAULT_QUEUE_TIMEOUT_US[target]

    (group,) = config.instance_group
    assert (group.kind, group.count) == (kind, 1)

    (warmup,) = config.model_warmup
    assert warmup.batch_size == 1
    warm_input = warmup.inputs["image"]
    assert (
        warm_input.zero_data
        and warm_input.data_type == mc.TYPE_FP16
        and list(warm_input.dims) == [3, 96, 96, 96]
    )

    card = ModelCard.model_validate_json(config.parameters[MODEL_CARD_PARAMETER].string_value)
    assert card == make_card() == repository.read_model_card(model_dir)
    assert ("intra_op_num_threads" in config.parameters) == (target == "cpu")
    assert repository.target_of(config) == target


def test_versions_count_up_and_are_never_overwritten(tmp_path: Path, artifacts: dict[str, Path]) -> None:
    repo = tmp_path / "repo"
    model_dir = repo / "fmhct"
    (model_dir / "0").mkdir(parents=True)  # Triton ignores versions that start with 0, so do we
    (model_dir / ".staging-x").mkdir()
    assert repository.next_version(model_dir) == 1
    _write(repo, "onnx", artifacts, card=make_card(version=1))
    _write(repo, "onnx", artifacts, card=make_card(version=repository.next_version(model_dir)))
    assert repository.existing_versions(model_dir) == [1, 2]
    assert repository.read_model_card(model_dir).triton_version == 2  # type: ignore[union-attr]
    with pytest.raises(RepositoryError, match="already exists"):
        _write(repo, "onnx", artifacts, card=make_card(version=2))
    _write(repo, "onnx", artifacts, card=make_card(version=7))
    assert repository.next_version(model_dir) == 8
    assert not [p for p in model_dir.iterdir() if p.name.startswith(".staging-") and p.name != ".staging-x"]


def test_missing_artifact_and_mismatched_batch_are_refused(
    tmp_path: Path, artifacts: dict[str, Path]
) -> None:
    with pytest.raises(RepositoryError, match="missing"):
        write_model(tmp_path, target="trt", card=make_card(), artifacts={}, options=ServingOptions())
    with pytest.raises(RepositoryError, match="max_batch_size"):
        write_model(
            tmp_path,
            target="onnx",
            card=make_card(max_batch_size=4),
            artifacts={"model.onnx": artifacts["model.onnx"]},
            options=ServingOptions(max_batch_size=8),
        )
    assert not (tmp_path / "fmhct").exists()


# ------------------------------------------------------------------ Python backend model, stubbed utils


class _TritonError:
    INVALID_ARG = 3

    def __init__(self, message: str, code: int | None = None) -> None:
        self.message, self.code = message, code


class _Tensor:
    def __init__(self, name: str, array: np.ndarray) -> None:
        self.name, self.array = name, array

    def as_numpy(self) -> np.ndarray:
        return self.array


class _Response:
    def __init__(self, output_tensors: list[_Tensor], error: _TritonError | None = None) -> None:
        self.outputs = {t.name: t.array for t in output_tensors}
        self.error = error


class _Request:
    def __init__(self, **inputs: np.ndarray) -> None:
        self.inputs = inputs


class _Logger:
    lines: ClassVar[list[str]] = []

    @classmethod
    def log_info(cls, message: str) -> None:
        cls.lines.append(message)

    log_error = log_warn = log_info


def load_python_model(model_dir: Path, version: int, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The Python-backend model.py of `model_dir/version`, initialised as Triton would, with a fake
    `triton_python_backend_utils` and one ONNX Runtime thread."""
    stub = types.ModuleType("triton_python_backend_utils")
    stub.TritonError, stub.Tensor, stub.InferenceResponse, stub.Logger = (
        _TritonError,
        _Tensor,
        _Response,
        _Logger,
    )
    stub.get_input_tensor_by_name = lambda request, name: (
        _Tensor(name, request.inputs[name]) if name in request.inputs else None
    )
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", stub)
    version_dir = model_dir / str(version)
    spec = importlib.util.spec_from_file_location(
        f"model_py_{version_dir.parent.name}", version_dir / "model.py"
    )
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    config = text_format.Parse((model_dir / "config.pbtxt").read_text(), mc.ModelConfig())
    config.parameters["intra_op_num_threads"].string_value = "1"
    model = module.TritonPythonModel()
    model.initialize(
        {
            "model_config": json.dumps(json_format.MessageToDict(config, preserving_proto_field_name=True)),
            "model_repository": str(model_dir),
            "model_version": str(version),
            "model_instance_name": f"{model_dir.name}_0",
        }
    )
    return model


@pytest.fixture
def python_model(tmp_path: Path, artifacts: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> Any:
    entry = _write(tmp_path / "repo", "cpu", artifacts)
    return load_python_model(entry.model_dir, entry.version, monkeypatch)


def test_python_model_batches_requests_and_isolates_bad_ones(
    python_model: Any, artifacts: dict[str, Path]
) -> None:
    import onnxruntime as ort

    session = ort.InferenceSession(str(artifacts["model.onnx"]), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    one = rng.random((1, *contract.INPUT_SHAPE)).astype(np.float16)
    two = rng.random((2, *contract.INPUT_SHAPE)).astype(np.float16)
    nan = one.copy()
    nan[0, 0, 0, 0, 0] = np.nan
    requests = [
        _Request(image=one),
        _Request(image=one.astype(np.float32)),  # wrong dtype
        _Request(image=two),
        _Request(image=two[:, :, :48]),  # wrong shape
        _Request(),  # no input
        _Request(image=nan),
    ]
    responses = python_model.execute(requests)
    assert len(responses) == len(requests)
    for index, image in ((0, one), (2, two)):
        want_probs, want_emb = session.run(None, {"image": image})
        assert responses[index].error is None
        np.testing.assert_allclose(
            responses[index].outputs["probabilities"], want_probs, rtol=1e-6, atol=1e-7
        )
        np.testing.assert_allclose(responses[index].outputs["embedding"], want_emb, rtol=1e-6, atol=1e-7)
        assert responses[index].outputs["probabilities"].dtype == np.float32
        assert responses[index].outputs["probabilities"].shape == (image.shape[0], len(TASKS))
    errors = {i: responses[i].error for i in (1, 3, 4, 5)}
    assert "must be FP16" in errors[1].message
    assert "must have shape [batch, 3, 96, 96, 96]" in errors[3].message
    assert "missing input" in errors[4].message
    assert "NaN" in errors[5].message
    assert all(e.code == _TritonError.INVALID_ARG for e in errors.values())


def test_python_model_runtime_failure_fails_only_that_batch(
    python_model: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("ORT kernel failure")

    monkeypatch.setattr(python_model.sessions[0].base, "run", broken, raising=False)
    image = np.zeros((1, *contract.INPUT_SHAPE), np.float16)
    responses = python_model.execute([_Request(image=image), _Request(image=image)])
    assert all("inference failed for a batch of 2" in r.error.message for r in responses)


# ------------------------------------------------------------------------------- CLI, tiny checkpoints


def test_cli_exports_cpu_target_then_skips_when_current(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    from export import cli
    from tests.unit.test_onnx_export import TINY, tiny_graph

    graph = tiny_graph()
    torch.save(graph.backbone.state_dict(), tmp_path / "backbone.pt")
    torch.save(graph.heads[0].state_dict(), tmp_path / "hemorrhage.pt")
    torch.save({"state_dict": graph.heads[1].state_dict()}, tmp_path / "edema.pt")
    repo = tmp_path / "model_repository"
    argv = [
        "--backbone", str(tmp_path / "backbone.pt"),
        "--num-heads", str(TINY.num_heads),
        "--head", f"hemorrhage={tmp_path / 'hemorrhage.pt'}:0.3",
        "--head", f"edema={tmp_path / 'edema.pt'}",
        "--target", "cpu",
        "--repository", str(repo),
        "--max-batch-size", "4",
        "--model-version", "tiny-1",
        "--synthetic-demo",
        "--allow-unpaired",  # bare files carry no run metadata to pair them by
    ]  # fmt: skip
    assert cli.main(argv) == cli.EXIT_OK
    out = capsys.readouterr()
    assert "parity torch vs onnxruntime-cpu PASS" in out.out and "export time" in out.out
    assert "no threshold for task 'edema'" in out.err

    model_dir = repo / "fmhct"
    card = repository.read_model_card(model_dir)
    assert card is not None and card.synthetic_demo and card.model_version == "tiny-1"
    assert [(t.name, t.threshold, t.head_type, t.pairing) for t in card.tasks] == [
        ("hemorrhage", 0.3, "linear", "override"),
        ("edema", 0.5, "attentive", "override"),
    ]
    assert card.unpaired_allowed and "has no qkv bias" in card.tasks[0].pairing_detail
    assert card.architecture == TINY.to_dict() and card.embedding_dim == TINY.embed_dim
    assert card.onnx_sha256 == hashlib.sha256((model_dir / "1" / "model.onnx").read_bytes()).hexdigest()
    assert float(card.exported_with["parity_max_abs_probability_diff"]) <= 1e-4
    config = repository.read_config(model_dir / "config.pbtxt")
    assert config.max_batch_size == 4 and list(config.output[0].dims) == [2]

    assert cli.main(argv) == cli.EXIT_OK  # same checkpoints and settings: nothing to do
    assert "is current" in capsys.readouterr().out
    assert repository.existing_versions(model_dir) == [1]

    assert cli.main([*argv, "--max-batch-size", "2"]) == cli.EXIT_OK  # a setting changed: new version
    assert repository.existing_versions(model_dir) == [1, 2]
    assert repository.read_config(model_dir / "config.pbtxt").max_batch_size == 2


def test_cli_reports_bad_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from export import cli

    bogus = tmp_path / "bogus.pt"
    bogus.write_bytes(b"not a checkpoint")
    argv = [
        "--backbone",
        str(bogus),
        "--head",
        f"x={bogus}:0.5",
        "--target",
        "cpu",
        "--repository",
        str(tmp_path),
    ]
    assert cli.main(argv) == cli.EXIT_FAILED
    assert "CheckpointError" in capsys.readouterr().err
    assert cli.main(["--backbone", str(bogus), "--head", "nopath", "--target", "cpu"]) == cli.EXIT_FAILED


def test_demo_trains_when_missing_exports_with_metrics_then_skips(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from demo import export as demo_export
    from demo import train
    from export.checkpoint import save_finetuned
    from tests.unit.test_onnx_export import TINY, tiny_graph

    runs: list[Path] = []

    def fake_run(out_dir: Path, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Stands in for minutes of training: tiny linear heads in the official fine-tuned layout."""
        runs.append(out_dir)
        graph = tiny_graph()
        for task in train.TASKS:
            head = graph.heads[0]  # LinearHead, like the demo's heads
            save_finetuned(graph.backbone, head, train.backbone_path(out_dir), train.head_path(out_dir, task))
        metrics = {
            "task_order": list(train.TASKS),
            "tasks": {
                "hemorrhage": {"auc": 0.91, "threshold": 0.5},
                "edema": {"auc": float("nan"), "threshold": 0.4},
            },
            "architecture": {"num_heads": TINY.num_heads},
            "seed": 1,
        }
        (Path(out_dir) / train.METRICS_FILENAME).write_text(json.dumps(metrics))
        return metrics

    monkeypatch.setattr(train, "run", fake_run)
    checkpoints, repo = tmp_path / "checkpoints", tmp_path / "repo"
    logs: list[str] = []
    outcome = demo_export.run_demo(repository=repo, checkpoints=checkpoints, log=logs.append)
    assert runs == [checkpoints] and not outcome.skipped
    card = repository.read_model_card(repo / "fmhct")
    assert card is not None and card.synthetic_demo and "SYNTHETIC DEMO" in card.notice
    assert [(t.name, t.threshold, t.heldout_auc) for t in card.tasks] == [
        ("hemorrhage", 0.5, 0.91),
        ("edema", 0.4, None),
    ]
    assert repository.target_of(repository.read_config(repo / "fmhct" / "config.pbtxt")) == "cpu"

    again = demo_export.run_demo(repository=repo, checkpoints=checkpoints, log=logs.append)
    assert again.skipped and runs == [checkpoints]  # neither retrained nor re-exported
    assert repository.existing_versions(repo / "fmhct") == [1]
