"""The TensorRT builder, against a fake `tensorrt` module (TensorRT cannot run here), and its refusals."""

from __future__ import annotations

import ctypes
import hashlib
import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from export import cli, tensorrt_build
from export.tensorrt_build import (
    EngineBuildError,
    EngineBuildSettings,
    GpuInfo,
    NoCudaGpuError,
    TensorRTUnavailableError,
    build_engine,
    probe_cuda_gpu,
)
from headct import contract

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


def fake_tensorrt(*, weak_typing: bool = True, parse_ok: bool = True, engine: bytes | None = b"PLAN") -> Any:
    """A stand-in for the parts of the TensorRT 10 Python API the builder uses; records every call."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.5.0.18" if weak_typing else "11.4.0.106"
    trt.float16, trt.float32 = "float16", "float32"
    trt.calls = {}
    flags = ["OBEY_PRECISION_CONSTRAINTS", "FP16", "BF16"] if weak_typing else ["STRIP_PLAN"]
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


@pytest.fixture
def onnx_file(tmp_path: Path) -> Path:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"not really onnx, the fake parser does not read it")
    return path


def _build(onnx_file: Path, trt: Any, **settings: Any) -> tuple[tensorrt_build.EngineMetadata, Path]:
    plan = onnx_file.parent / "out" / "model.plan"
    meta = build_engine(
        onnx_file,
        plan,
        EngineBuildSettings(**{"max_batch_size": 8, **settings}),
        trt=trt,
        gpu_probe=lambda: H200,
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
        onnx_file, plan, settings, trt=fake_tensorrt(), gpu_probe=lambda: H200, log=logs.append
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
