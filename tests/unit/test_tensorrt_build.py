"""The TensorRT builder, against a fake `tensorrt` module (TensorRT cannot run here), and its refusals."""

from __future__ import annotations

import ctypes
import datetime
import hashlib
import json
import shutil
import subprocess
import sys
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from export import cli, reference, tensorrt_build
from export.tensorrt_build import (
    CudaRuntime,
    EngineBuildError,
    EngineBuildRefused,
    EngineBuildSettings,
    EngineParityError,
    GpuInfo,
    MissingReferenceError,
    NoCudaGpuError,
    TensorRTUnavailableError,
    UnsupportedTensorRTError,
    build_engine,
    probe_cuda_gpu,
    run_engine,
)
from headct import contract

REPO_ROOT = Path(__file__).resolve().parents[2]

H200 = GpuInfo(name="NVIDIA H200", compute_capability="9.0")
SHAPE = contract.INPUT_SHAPE


class FakeLayer:
    def __init__(self, kind: str, num_outputs: int = 1) -> None:
        self.type = kind
        self.num_outputs = num_outputs
        self.precision: str | None = None
        self.output_types: dict[int, str] = {}

    def set_output_type(self, index: int, dtype: str) -> None:
        self.output_types[index] = dtype


class FakeTensor:
    def __init__(self, name: str, dtype: str, shape: tuple[int, ...]) -> None:
        self.name, self.dtype, self.shape = name, dtype, shape


class FakeNetwork:
    def __init__(self, flags: int) -> None:
        self.flags = flags
        self.layers = [
            FakeLayer("NORMALIZATION"),
            FakeLayer("MATRIX_MULTIPLY"),
            FakeLayer("SOFTMAX"),
            FakeLayer("NORMALIZATION"),
        ]
        self.inputs = [FakeTensor("image", "float16", (-1, *SHAPE))]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def get_layer(self, index: int) -> FakeLayer:
        return self.layers[index]

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    def get_input(self, index: int) -> FakeTensor:
        return self.inputs[index]


class FakeProfile:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple[list[int], list[int], list[int]]] = {}

    def set_shape(self, name: str, lo: list[int], opt: list[int], hi: list[int]) -> None:
        self.shapes[name] = (list(lo), list(opt), list(hi))


class FakeTimingCache:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def serialize(self) -> bytes:
        return self.data + b"+tactics"


class FakeConfig:
    def __init__(self) -> None:
        self.flags: list[str] = []
        self.pools: dict[str, int] = {}
        self.profiles: list[FakeProfile] = []
        self.cache: FakeTimingCache | None = None
        self.ignore_mismatch: bool | None = None

    def set_flag(self, flag: str) -> None:
        self.flags.append(flag)

    def set_memory_pool_limit(self, pool: str, size: int) -> None:
        self.pools[pool] = size

    def add_optimization_profile(self, profile: FakeProfile) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, data: bytes) -> FakeTimingCache:
        return FakeTimingCache(bytes(data))

    def set_timing_cache(self, cache: FakeTimingCache, ignore_mismatch: bool) -> bool:
        if cache.data.startswith(b"foreign"):  # a cache from another GPU/TensorRT is refused
            return False
        self.cache, self.ignore_mismatch = cache, ignore_mismatch
        return True

    def get_timing_cache(self) -> FakeTimingCache | None:
        return self.cache


def fake_tensorrt(
    *,
    weak_typing: bool = True,
    parse_ok: bool = True,
    engine: bytes | None = b"PLAN",
    version: str | None = None,
) -> Any:
    """A stand-in for the parts of the TensorRT 10 (or 8.6) Python API the builder uses; records calls."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version or ("10.5.0.18" if weak_typing else "11.4.0.106")
    trt.float16, trt.float32 = "float16", "float32"
    trt.calls = {}
    flags = ["OBEY_PRECISION_CONSTRAINTS", "FP16", "BF16"] if weak_typing else ["STRIP_PLAN"]
    if trt.__version__.startswith("8."):
        flags.remove("BF16")  # TensorRT 8.6 has no BF16 builder flag
        # The real enum value: 0, so the creation flags are 1 << 0.
        trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(EXPLICIT_BATCH=0)
    trt.BuilderFlag = types.SimpleNamespace(**{name: name for name in flags})
    trt.LayerType = types.SimpleNamespace(NORMALIZATION="NORMALIZATION", SOFTMAX="SOFTMAX")
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")

    class Logger:
        WARNING = "WARNING"

        def __init__(self, level: str) -> None:
            trt.calls["logger_level"] = level

    class Builder:
        def __init__(self, logger: Logger) -> None:
            trt.calls["builder"] = self

        def create_network(self, flags: int) -> FakeNetwork:
            trt.calls["network"] = FakeNetwork(flags)
            return trt.calls["network"]

        def create_builder_config(self) -> FakeConfig:
            trt.calls["config"] = FakeConfig()
            return trt.calls["config"]

        def create_optimization_profile(self) -> FakeProfile:
            return FakeProfile()

        def build_serialized_network(self, network: FakeNetwork, config: FakeConfig) -> bytes | None:
            trt.calls["built"] = (network, config)
            return engine

    class OnnxParser:
        num_errors = 0 if parse_ok else 1

        def __init__(self, network: FakeNetwork, logger: Logger) -> None:
            pass

        def parse_from_file(self, path: str) -> bool:
            trt.calls["parsed"] = path
            return parse_ok

        def get_error(self, index: int) -> str:
            return "In node 7 (Attention): unsupported operator"

    trt.Logger, trt.Builder, trt.OnnxParser = Logger, Builder, OnnxParser
    return trt


REFERENCE_OUTPUTS = {
    "probabilities": np.array([[0.10, 0.90], [0.50, 0.40], [0.97, 0.02]], dtype=np.float32),
    "embedding": np.array([[1.0, 2.0, 3.0, 4.0], [-1.0, 0.5, 0.0, 2.0], [0.3, 0.3, -0.9, 1.0]], np.float32),
}


def write_test_reference(onnx_file: Path, outputs: Mapping[str, np.ndarray] = REFERENCE_OUTPUTS) -> Path:
    """A reference file as the export writes it, for the fake ONNX (3 samples, zero volumes)."""
    batch = next(iter(outputs.values())).shape[0]
    return reference.save_reference(
        reference.reference_path_for(onnx_file),
        {"image": np.zeros((batch, *SHAPE), dtype=np.float16)},
        outputs,
        onnx_sha256=hashlib.sha256(onnx_file.read_bytes()).hexdigest(),
        samples=[f"s{i}" for i in range(batch)],
    )


class FakeRunner:
    """The EngineRunner seam: returns the reference outputs, shifted by `delta` (per output name)."""

    def __init__(self, outputs: Mapping[str, np.ndarray] = REFERENCE_OUTPUTS, **delta: Any) -> None:
        self.outputs, self.delta, self.calls = outputs, delta, []

    def __call__(
        self, trt: Any, plan: bytes, inputs: Mapping[str, np.ndarray], max_batch_size: int
    ) -> dict[str, np.ndarray]:
        self.calls.append((plan, {k: v.shape for k, v in inputs.items()}, max_batch_size))
        return {name: value + self.delta.get(name, 0.0) for name, value in self.outputs.items()}


@pytest.fixture
def onnx_file(tmp_path: Path) -> Path:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"not really onnx, the fake parser does not read it")
    write_test_reference(path)
    return path


def _build(
    onnx_file: Path, trt: Any, runner: Any = None, gate: Mapping[str, Any] | None = None, **settings: Any
) -> tuple[tensorrt_build.EngineMetadata, Path]:
    plan = onnx_file.parent / "out" / "model.plan"
    meta = build_engine(
        onnx_file,
        plan,
        EngineBuildSettings(**{"max_batch_size": 8, **settings}),
        trt=trt,
        gpu_probe=lambda: H200,
        runner=runner or FakeRunner(),
        **(gate or {}),
    )
    return meta, plan


def test_fp16_build_sets_flags_profile_and_fp32_pins(onnx_file: Path) -> None:
    trt = fake_tensorrt()
    meta, plan = _build(onnx_file, trt)
    network, config = trt.calls["built"]

    assert network.flags == 0  # weakly typed; EXPLICIT_BATCH is implicit in TensorRT 10
    assert trt.calls["parsed"] == str(onnx_file)
    assert config.flags == ["FP16", "OBEY_PRECISION_CONSTRAINTS"]
    pinned = {layer.type: (layer.precision, layer.output_types) for layer in network.layers}
    assert pinned["NORMALIZATION"] == ("float32", {0: "float32"})
    assert pinned["SOFTMAX"] == ("float32", {0: "float32"})
    assert pinned["MATRIX_MULTIPLY"] == (None, {})  # free to run in FP16
    assert meta.fp32_pinned_layers == 3

    (profile,) = config.profiles
    assert profile.shapes == {"image": ([1, *SHAPE], [4, *SHAPE], [8, *SHAPE])}
    assert config.pools == {"WORKSPACE": tensorrt_build.DEFAULT_WORKSPACE_BYTES}

    assert plan.read_bytes() == b"PLAN"
    written = json.loads(tensorrt_build.metadata_path(plan).read_text())
    assert written["tensorrt_version"] == "10.5.0.18"
    assert (written["gpu_name"], written["compute_capability"]) == ("NVIDIA H200", "9.0")
    assert written["onnx_sha256"] == hashlib.sha256(onnx_file.read_bytes()).hexdigest()
    assert written["plan_sha256"] == hashlib.sha256(b"PLAN").hexdigest()
    assert written["precision"] == "fp16" and written["strongly_typed"] is False
    assert written["profile"] == {"image": {"min": [1, *SHAPE], "opt": [4, *SHAPE], "max": [8, *SHAPE]}}
    assert written["build_seconds"] >= 0 and written["built_at"].endswith("+00:00")


def test_timing_cache_is_loaded_and_saved(onnx_file: Path) -> None:
    cache_file = onnx_file.parent / "caches" / "h200.timing"
    cache_file.parent.mkdir()
    cache_file.write_bytes(b"previous")
    trt = fake_tensorrt()
    meta, _ = _build(onnx_file, trt, timing_cache=cache_file)
    config = trt.calls["config"]
    assert config.cache.data == b"previous" and config.ignore_mismatch is False
    assert cache_file.read_bytes() == b"previous+tactics"
    assert meta.timing_cache_loaded_bytes == len(b"previous")


def test_foreign_timing_cache_is_replaced_by_a_fresh_one(onnx_file: Path) -> None:
    cache_file = onnx_file.parent / "a100.timing"
    cache_file.write_bytes(b"foreign tactics")
    logs: list[str] = []
    plan = onnx_file.parent / "model.plan"
    settings = EngineBuildSettings(max_batch_size=8, timing_cache=cache_file)
    meta = build_engine(
        onnx_file,
        plan,
        settings,
        trt=fake_tensorrt(),
        gpu_probe=lambda: H200,
        log=logs.append,
        runner=FakeRunner(),
    )
    assert meta.timing_cache_loaded_bytes == 0
    assert cache_file.read_bytes() == b"+tactics"
    assert any("does not fit this GPU/TensorRT" in line for line in logs)


def test_missing_timing_cache_starts_empty(onnx_file: Path) -> None:
    cache_file = onnx_file.parent / "new.timing"
    trt = fake_tensorrt()
    _build(onnx_file, trt, timing_cache=cache_file)
    assert cache_file.read_bytes() == b"+tactics"


@pytest.mark.parametrize(
    ("precision", "flags"), [("fp32", []), ("bf16", ["BF16", "OBEY_PRECISION_CONSTRAINTS"])]
)
def test_other_precisions(onnx_file: Path, precision: str, flags: list[str]) -> None:
    trt = fake_tensorrt()
    meta, _ = _build(onnx_file, trt, precision=precision, opt_batch_size=2)
    network, config = trt.calls["built"]
    assert config.flags == flags
    assert meta.precision == precision
    assert config.profiles[0].shapes["image"][1] == [2, *SHAPE]
    assert all(
        (layer.precision is None) == (precision == "fp32")
        for layer in network.layers
        if layer.type != "MATRIX_MULTIPLY"
    )


def test_tensorrt_11_without_weak_typing_is_refused_clearly(onnx_file: Path) -> None:
    with pytest.raises(EngineBuildError, match="weak typing was removed in TensorRT 11"):
        _build(onnx_file, fake_tensorrt(weak_typing=False))


def test_parse_and_build_failures(onnx_file: Path) -> None:
    with pytest.raises(EngineBuildError, match=r"could not parse.*unsupported operator"):
        _build(onnx_file, fake_tensorrt(parse_ok=False))
    with pytest.raises(EngineBuildError, match="returned no engine"):
        _build(onnx_file, fake_tensorrt(engine=None))
    assert not (onnx_file.parent / "out").exists()


def test_wrong_network_input_is_rejected(onnx_file: Path) -> None:
    trt = fake_tensorrt()
    original = trt.Builder.create_network

    def fp32_input(self: Any, flags: int) -> FakeNetwork:
        network = original(self, flags)
        network.inputs = [FakeTensor("image", "float32", (-1, *SHAPE))]
        return network

    trt.Builder.create_network = fp32_input
    with pytest.raises(EngineBuildError, match="expected image FP16"):
        _build(onnx_file, trt)


def test_refuses_without_tensorrt(onnx_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` raise ImportError
    with pytest.raises(TensorRTUnavailableError, match=r"TensorRT is not importable here.*Triton image"):
        build_engine(onnx_file, onnx_file.parent / "model.plan", EngineBuildSettings(max_batch_size=8))
    assert not (onnx_file.parent / "model.plan").exists()


def test_refuses_without_gpu(onnx_file: Path) -> None:
    def no_gpu() -> GpuInfo:
        raise NoCudaGpuError("no CUDA driver")

    with pytest.raises(NoCudaGpuError, match="no CUDA driver"):
        build_engine(
            onnx_file,
            onnx_file.parent / "model.plan",
            EngineBuildSettings(max_batch_size=8),
            trt=fake_tensorrt(),
            gpu_probe=no_gpu,
        )
    assert not (onnx_file.parent / "model.plan").exists()


class FakeDriver:
    """libcuda.so.1 as ctypes sees it: out-parameters arrive as byref() objects."""

    def __init__(self, devices: int) -> None:
        self.devices = devices

    def cuInit(self, flags: int) -> int:
        return 0

    def cuDeviceGetCount(self, count: Any) -> int:
        count._obj.value = self.devices
        return 0

    def cuDeviceGet(self, device: Any, index: int) -> int:
        device._obj.value = index
        return 0

    def cuDeviceGetName(self, buffer: Any, size: int, device: Any) -> int:
        buffer.value = b"NVIDIA H200"
        return 0

    def cuDeviceGetAttribute(self, value: Any, attribute: int, device: Any) -> int:
        value._obj.value = {75: 9, 76: 0}[attribute]
        return 0


def test_gpu_probe_via_driver_api(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ctypes, "CDLL", lambda name: FakeDriver(devices=1))
    assert probe_cuda_gpu() == H200
    monkeypatch.setattr(ctypes, "CDLL", lambda name: FakeDriver(devices=0))
    with pytest.raises(NoCudaGpuError, match="no CUDA GPU #0 visible"):
        probe_cuda_gpu()

    def missing(name: str) -> None:
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", missing)
    with pytest.raises(NoCudaGpuError, match="no CUDA driver"):
        probe_cuda_gpu()


def test_settings_validation() -> None:
    assert EngineBuildSettings(max_batch_size=1).profile_shapes()["opt"][0] == 1
    with pytest.raises(ValueError, match="opt_batch_size"):
        EngineBuildSettings(max_batch_size=4, opt_batch_size=5)
    with pytest.raises(ValueError, match="precision"):
        EngineBuildSettings(max_batch_size=4, precision="int8")  # type: ignore[arg-type]


def test_cli_exits_3_with_the_refusal(
    onnx_file: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    plan = onnx_file.parent / "model.plan"
    code = cli.main(["build-engine", "--onnx", str(onnx_file), "--plan", str(plan), "--max-batch-size", "8"])
    assert code == cli.EXIT_REFUSED
    assert "TensorRT engine build refused: TensorRT is not importable here" in capsys.readouterr().err
    assert not plan.exists()

    # The export command refuses before loading or exporting anything (the files need only exist).
    backbone, head = onnx_file.parent / "b.pt", onnx_file.parent / "h.pt"
    backbone.write_bytes(b"x")
    head.write_bytes(b"y")
    repo = onnx_file.parent / "repo"
    code = cli.main(
        [
            "--backbone",
            str(backbone),
            "--head",
            f"ich={head}:0.5",
            "--target",
            "trt",
            "--repository",
            str(repo),
        ]
    )
    assert code == cli.EXIT_REFUSED
    assert "refused" in capsys.readouterr().err
    assert not repo.exists()


# --- parity gate ---------------------------------------------------------------------------------------


def test_gate_passes_and_records_figures(onnx_file: Path) -> None:
    runner = FakeRunner(
        probabilities=np.array([[0.004, -0.004], [0.0, 0.0], [-0.002, 0.0]], dtype=np.float32),
        embedding=np.float32(0.01),
    )
    meta, plan = _build(onnx_file, fake_tensorrt(), runner=runner, max_batch_size=2)
    assert plan.read_bytes() == b"PLAN"
    ((plan_bytes, shapes, max_batch),) = runner.calls
    assert (plan_bytes, shapes, max_batch) == (b"PLAN", {"image": (3, *SHAPE)}, 2)
    written = json.loads(tensorrt_build.metadata_path(plan).read_text())
    assert written["gate"] == meta.gate == "passed"
    parity = written["parity"]
    assert parity["passed"] is True and parity["samples"] == 3
    assert parity["max_abs_probability_diff"] == pytest.approx(0.004, abs=1e-6)
    assert 0.99 < parity["min_embedding_cosine"]["embedding"] < 1.0
    assert parity["reference"] == str(reference.reference_path_for(onnx_file))
    assert parity["reference_samples"] == ["s0", "s1", "s2"]
    assert parity["probability_tolerance"] == 0.01 and parity["min_cosine"] == 0.99


@pytest.mark.parametrize(
    ("delta", "message"),
    [
        ({"probabilities": np.float32(0.02)}, r"max \|Δp\| 2\.000e-02 > 0\.01"),
        ({"probabilities": np.float32(np.nan)}, r"max \|Δp\| inf"),
        ({"embedding": np.array([[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 2.0, -1.0]], np.float32)}, "cosine"),
    ],
)
def test_gate_failure_raises_and_leaves_no_plan(onnx_file: Path, delta: dict, message: str) -> None:
    plan = onnx_file.parent / "out" / "model.plan"
    plan.parent.mkdir()
    plan.write_bytes(b"an older engine that must not be served next to this ONNX")
    with pytest.raises(EngineParityError, match=message) as raised:
        _build(onnx_file, fake_tensorrt(), runner=FakeRunner(**delta))
    assert isinstance(raised.value, EngineBuildError)  # the CLI exits 1, the chart falls back to ONNX
    assert not plan.exists()
    written = json.loads(tensorrt_build.metadata_path(plan).read_text())
    assert written["gate"] == "failed" and written["parity"]["passed"] is False
    assert raised.value.parity == written["parity"]


def test_generic_output_names_per_backbone_group(tmp_path: Path) -> None:
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"grouped graph")
    outputs = {
        "probabilities__a": REFERENCE_OUTPUTS["probabilities"],
        "embedding__a": REFERENCE_OUTPUTS["embedding"],
        "probabilities__b": REFERENCE_OUTPUTS["probabilities"][:, :1],
        "embedding__b": REFERENCE_OUTPUTS["embedding"] * 2,
    }
    write_test_reference(onnx, outputs)
    meta, _ = _build(onnx, fake_tensorrt(), runner=FakeRunner(outputs, probabilities__b=np.float32(0.005)))
    assert meta.parity is not None
    assert set(meta.parity["min_embedding_cosine"]) == {"embedding__a", "embedding__b"}
    assert meta.parity["max_abs_probability_diff"] == pytest.approx(0.005, abs=1e-6)
    with pytest.raises(EngineParityError, match="probabilities__b"):
        _build(onnx, fake_tensorrt(), runner=FakeRunner(outputs, probabilities__b=np.float32(0.5)))
    missing = {k: v for k, v in outputs.items() if k != "embedding__b"}
    with pytest.raises(EngineParityError, match="embedding__b missing"):
        _build(onnx, fake_tensorrt(), runner=FakeRunner(missing))


def test_missing_reference_is_refused_unless_the_gate_is_skipped(onnx_file: Path) -> None:
    reference.reference_path_for(onnx_file).unlink()
    trt = fake_tensorrt()
    with pytest.raises(MissingReferenceError, match=r"no parity reference .*--no-parity-gate"):
        _build(onnx_file, trt)
    assert "built" not in trt.calls  # refused before spending minutes on a build
    assert not (onnx_file.parent / "out").exists()

    runner = FakeRunner()
    _, plan = _build(onnx_file, fake_tensorrt(), runner=runner, gate={"parity_gate": False})
    assert runner.calls == [] and plan.read_bytes() == b"PLAN"
    written = json.loads(tensorrt_build.metadata_path(plan).read_text())
    assert (written["gate"], written["parity"]) == ("skipped", None)


def test_reference_of_another_onnx_is_refused(onnx_file: Path) -> None:
    other = onnx_file.parent / "elsewhere" / "model.onnx"
    other.parent.mkdir()
    other.write_bytes(b"a different graph")
    write_test_reference(other)
    with pytest.raises(EngineParityError, match="computed from another ONNX"):
        _build(onnx_file, fake_tensorrt(), gate={"reference": reference.reference_path_for(other)})


def test_runner_failure_is_a_parity_error(onnx_file: Path) -> None:
    def broken(*args: Any) -> dict[str, np.ndarray]:
        raise OSError("libcudart.so: cannot open shared object file")

    with pytest.raises(EngineParityError, match=r"could not run the new engine.*libcudart"):
        _build(onnx_file, fake_tensorrt(), runner=broken)
    assert not (onnx_file.parent / "out" / "model.plan").exists()


# --- TensorRT versions and Python 3.10 -------------------------------------------------------------------


def test_tensorrt_8_6_builds_an_explicit_batch_network(onnx_file: Path) -> None:
    trt = fake_tensorrt(version="8.6.1.6")
    meta, plan = _build(onnx_file, trt)
    network, config = trt.calls["built"]
    assert network.flags == 1 << 0  # 1 << EXPLICIT_BATCH: 8.6 would build implicit batch otherwise
    assert config.flags == ["FP16", "OBEY_PRECISION_CONSTRAINTS"]
    assert meta.tensorrt_version == "8.6.1.6" and plan.read_bytes() == b"PLAN"
    with pytest.raises(EngineBuildError, match=r"TensorRT 8\.6 builds fp16 or fp32 engines only"):
        _build(onnx_file, fake_tensorrt(version="8.6.1.6"), precision="bf16")


def test_tensorrt_older_than_8_6_is_refused_clearly(
    onnx_file: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(UnsupportedTensorRTError, match=r"8\.5\.3\.1 is too old.*8\.6.*10\.x"):
        _build(onnx_file, fake_tensorrt(version="8.5.3.1"))
    assert issubclass(UnsupportedTensorRTError, EngineBuildRefused)
    assert not (onnx_file.parent / "out").exists()
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(version="8.4.3.1"))
    with pytest.raises(UnsupportedTensorRTError):
        tensorrt_build.load_tensorrt()  # what the chart's probe calls
    plan = onnx_file.parent / "model.plan"
    code = cli.main(["build-engine", "--onnx", str(onnx_file), "--plan", str(plan), "--max-batch-size", "8"])
    assert code == cli.EXIT_REFUSED and "too old" in capsys.readouterr().err


def test_metadata_date_needs_no_datetime_utc(onnx_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Python 3.10 (Triton 24.xx images) has no datetime.UTC; the build must not touch it."""
    monkeypatch.delattr(datetime, "UTC")
    meta, plan = _build(onnx_file, fake_tensorrt())
    assert meta.built_at.endswith("+00:00")
    assert json.loads(tensorrt_build.metadata_path(plan).read_text())["built_at"] == meta.built_at


TRITON_IMAGE_FILES = [
    "export/tensorrt_build.py",
    "export/reference.py",
    "export/cli.py",
    "export/__main__.py",
    "export/__init__.py",
    "headct/contract.py",
    "headct/__init__.py",
    "helm/headct/files/prepare_repository.py",
    "export/triton_python_model.py",
]


def test_files_run_in_the_triton_image_are_python_3_10_compatible() -> None:
    vermin = shutil.which("vermin") or str(Path(sys.executable).with_name("vermin"))
    if not Path(vermin).is_file():
        pytest.skip("vermin not installed (pyproject dev extra)")
    result = subprocess.run(
        [vermin, "-q", "--violations", "--no-tips", "-t=3.10-", *TRITON_IMAGE_FILES],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- the CLI ---------------------------------------------------------------------------------------------


@pytest.fixture
def cli_tensorrt(monkeypatch: pytest.MonkeyPatch) -> Any:
    """`python -m export build-engine` with a fake tensorrt module and a fake CUDA driver."""
    trt = fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(ctypes, "CDLL", lambda name: FakeDriver(devices=1))
    return trt


def test_cli_parity_gate_options(
    onnx_file: Path,
    cli_tensorrt: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    plan = onnx_file.parent / "model.plan"
    base = ["build-engine", "--onnx", str(onnx_file), "--plan", str(plan), "--max-batch-size", "4"]
    monkeypatch.setattr(tensorrt_build, "run_engine", FakeRunner(probabilities=np.float32(0.3)))
    assert cli.main(base) == cli.EXIT_FAILED
    assert "EngineParityError" in capsys.readouterr().err and not plan.exists()

    monkeypatch.setattr(tensorrt_build, "run_engine", FakeRunner())
    assert cli.main(base) == cli.EXIT_OK
    assert "parity gate passed" in capsys.readouterr().out

    moved = onnx_file.parent / "ref.npz"
    reference.reference_path_for(onnx_file).rename(moved)
    assert cli.main(base) == cli.EXIT_FAILED
    assert "MissingReferenceError: no parity reference" in capsys.readouterr().err
    assert cli.main([*base, "--reference", str(moved)]) == cli.EXIT_OK
    assert cli.main([*base, "--no-parity-gate"]) == cli.EXIT_OK
    assert json.loads(tensorrt_build.metadata_path(plan).read_text())["gate"] == "skipped"


# --- running the engine: TensorRT I/O tensor API over libcudart, both faked --------------------------------


class FakeCudart:
    """libcudart as ctypes sees it, backed by host memory: pointers are real addresses."""

    def __init__(self) -> None:
        self.live: dict[int, Any] = {}
        self.copies: list[int] = []
        self.syncs = 0

    def cudaMalloc(self, pointer: Any, size: Any) -> int:
        buffer = ctypes.create_string_buffer(size.value)
        self.live[ctypes.addressof(buffer)] = buffer
        pointer._obj.value = ctypes.addressof(buffer)
        return 0

    def cudaFree(self, pointer: Any) -> int:
        return 0 if self.live.pop(pointer.value, None) is not None else 1

    def cudaMemcpy(self, dst: Any, src: Any, size: Any, kind: int) -> int:
        ctypes.memmove(dst.value, src.value, size.value)
        self.copies.append(kind)
        return 0

    def cudaStreamSynchronize(self, stream: Any) -> int:
        self.syncs += 1
        return 0


def _host_view(address: int, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
    count = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return np.frombuffer((ctypes.c_char * count).from_address(address), dtype=dtype).reshape(shape)


def fake_runtime_tensorrt(max_batch: int) -> Any:
    """Runtime side of TensorRT 10/8.6: the engine computes probabilities = [mean, max], embedding = x[:4]."""
    trt = fake_tensorrt()
    trt.TensorIOMode = types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")
    trt.nptype = {"float16": np.float16, "float32": np.float32}.__getitem__
    trt.batches = []
    tensors = {
        "image": ("INPUT", "float16"),
        "probabilities": ("OUTPUT", "float32"),
        "embedding": ("OUTPUT", "float32"),
    }

    class Context:
        def __init__(self) -> None:
            self.shape: tuple[int, ...] = ()
            self.addresses: dict[str, int] = {}

        def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
            self.shape = shape
            return 1 <= shape[0] <= max_batch

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            return (self.shape[0], 2 if name == "probabilities" else 4)

        def set_tensor_address(self, name: str, address: int) -> bool:
            self.addresses[name] = address
            return True

        def execute_async_v3(self, stream: int) -> bool:
            batch = self.shape[0]
            trt.batches.append(batch)
            x = (
                _host_view(self.addresses["image"], np.float16, self.shape)
                .reshape(batch, -1)
                .astype(np.float32)
            )
            probabilities = np.stack([x.mean(1), x.max(1)], axis=1)
            _host_view(self.addresses["probabilities"], np.float32, (batch, 2))[...] = probabilities
            _host_view(self.addresses["embedding"], np.float32, (batch, 4))[...] = x[:, :4]
            return True

    class Engine:
        num_io_tensors = len(tensors)

        def get_tensor_name(self, index: int) -> str:
            return list(tensors)[index]

        def get_tensor_mode(self, name: str) -> str:
            return tensors[name][0]

        def get_tensor_dtype(self, name: str) -> str:
            return tensors[name][1]

        def create_execution_context(self) -> Context:
            return Context()

    class Runtime:
        def __init__(self, logger: Any) -> None:
            pass

        def deserialize_cuda_engine(self, plan: bytes) -> Engine | None:
            return Engine() if plan == b"PLAN" else None

    trt.Runtime = Runtime
    return trt


def test_run_engine_through_the_io_tensor_api_and_libcudart() -> None:
    rng = np.random.default_rng(3)
    image = rng.random((5, 3, 4, 4, 4), dtype=np.float32).astype(np.float16)
    cudart = FakeCudart()
    trt = fake_runtime_tensorrt(max_batch=2)
    outputs = run_engine(trt, b"PLAN", {"image": image}, 2, cuda=CudaRuntime(cudart))
    assert trt.batches == [2, 2, 1]  # chunks of at most the profile's max batch
    flat = image.reshape(5, -1).astype(np.float32)
    np.testing.assert_allclose(outputs["probabilities"], np.stack([flat.mean(1), flat.max(1)], 1), rtol=1e-6)
    np.testing.assert_array_equal(outputs["embedding"], flat[:, :4])
    assert outputs["probabilities"].dtype == np.float32
    assert cudart.live == {}  # every device buffer freed
    assert cudart.copies.count(1) == 3 and cudart.copies.count(2) == 6 and cudart.syncs == 3
    with pytest.raises(EngineBuildError, match="could not deserialize"):
        run_engine(trt, b"garbage", {"image": image}, 2, cuda=CudaRuntime(cudart))


def test_cuda_errors_are_reported() -> None:
    class Failing(FakeCudart):
        def cudaMalloc(self, pointer: Any, size: Any) -> int:
            return 2  # cudaErrorMemoryAllocation

    with pytest.raises(tensorrt_build.CudaRuntimeError, match="cudaMalloc failed with cudaError 2"):
        CudaRuntime(Failing()).malloc(16)


# --- benchmarks/gpu_smoke.py -----------------------------------------------------------------------------


def test_gpu_smoke_refuses_in_one_json_line_without_tensorrt(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from benchmarks import gpu_smoke

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert gpu_smoke.main([]) == 3
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["status"] == "refused" and "TensorRT is not importable" in result["reason"]
