"""Build a TensorRT engine (`model.plan` + `model.plan.json`) from the exported ONNX graph.

This runs ONLY where the `tensorrt` Python package of the serving Triton image's TensorRT version is
importable and a CUDA GPU of the target type is visible: in practice inside NVIDIA's Triton image on the
target node (the Helm chart's engine-build step, a later issue). An engine is bound to the exact TensorRT
version and GPU architecture it was built with, so it is never built ahead of time on another machine.
Anywhere else (CI, this CPU-only dev box) it refuses with `TensorRTUnavailableError` / `NoCudaGpuError`
before touching anything.

Written against the TensorRT 10.x Python API (the 10.x line ships in the Triton 24.xx-26.xx images).

Precision (the choice, and why): `fp16` (default) uses TensorRT 10's weak typing: `BuilderFlag.FP16` lets
the builder pick FP16 kernels, and every LayerNormalization (INormalizationLayer, one per LayerNorm thanks
to opset 17) and SoftMax layer is pinned to FP32 with `OBEY_PRECISION_CONSTRAINTS`, because LayerNorm after
attention overflows in FP16 (NVIDIA/TensorRT#2564, #3692, #4493) and softmax saturates. We take this path
rather than a strongly-typed network because strong typing would require the precision to live in the
ONNX graph (ModelOpt AutoCast), which we do not have yet; our ONNX is FP32 inside. Weak typing is
deprecated from TensorRT 10.12 and REMOVED in 11.x: on a TensorRT without `BuilderFlag.FP16` the build
refuses with a clear message (use `fp32`, or move to an AutoCast-converted strongly typed graph). `bf16` is
the same scheme with `BuilderFlag.BF16` (FP32 exponent range, Ampere+). `fp32` builds the reference engine.
Pinning softmax can stop TensorRT from fusing attention into its FP16 MHA kernels; measure before
relaxing it, and gate every engine with an ONNX-Runtime-vs-TensorRT comparison.

Test seam: every TensorRT call goes through the module object returned by `load_tensorrt()` and the GPU
facts through a `GpuProbe`; unit tests inject fakes for both.
"""

from __future__ import annotations

import ctypes
import datetime as dt
import hashlib
import importlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

from headct import contract

Precision = Literal["fp16", "bf16", "fp32"]
PRECISIONS: tuple[Precision, ...] = ("fp16", "bf16", "fp32")
PLAN_FILENAME = "model.plan"
METADATA_SUFFIX = ".json"
DEFAULT_WORKSPACE_BYTES = 4 << 30

# cuDeviceGetAttribute ids (CUDA driver API, cuda.h).
_CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75
_CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR = 76


class EngineBuildRefused(RuntimeError):
    """This machine cannot build a serving engine; nothing was written."""


class TensorRTUnavailableError(EngineBuildRefused):
    """`import tensorrt` failed."""


class NoCudaGpuError(EngineBuildRefused):
    """No CUDA driver or no visible GPU."""


class EngineBuildError(RuntimeError):
    """TensorRT was available but parsing or building failed."""


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str  # "9.0" for H100/H200
    index: int = 0


GpuProbe = Callable[[], GpuInfo]


@dataclass(frozen=True)
class EngineBuildSettings:
    """What to build: one optimization profile min=1 / opt / max=max_batch_size on the batch axis."""

    max_batch_size: int
    precision: Precision = "fp16"
    opt_batch_size: int | None = None  # default: max_batch_size // 2 (at least 1)
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES
    timing_cache: Path | None = None
    input_name: str = contract.INPUT_NAME
    input_shape: tuple[int, ...] = contract.INPUT_SHAPE

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not 1 <= self.resolved_opt_batch_size <= self.max_batch_size:
            raise ValueError(
                f"opt_batch_size must be in [1, {self.max_batch_size}], got {self.opt_batch_size}"
            )

    @property
    def resolved_opt_batch_size(self) -> int:
        # Between the low-QPS batch of 1 and the backlog batch of max: tactics tuned there serve both.
        return self.opt_batch_size if self.opt_batch_size is not None else max(1, self.max_batch_size // 2)

    def profile_shapes(self) -> dict[str, list[int]]:
        return {
            "min": [1, *self.input_shape],
            "opt": [self.resolved_opt_batch_size, *self.input_shape],
            "max": [self.max_batch_size, *self.input_shape],
        }


@dataclass(frozen=True)
class EngineMetadata:
    """Written next to the plan as `model.plan.json`: enough to tell whether a plan fits a node."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    onnx_sha256: str
    plan_sha256: str
    precision: str
    strongly_typed: bool
    fp32_pinned_layers: int
    profile: dict[str, dict[str, list[int]]]
    workspace_bytes: int
    timing_cache: str | None
    timing_cache_loaded_bytes: int
    build_seconds: float
    built_at: str
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"


def load_tensorrt() -> ModuleType:
    """Import the TensorRT Python package or refuse with a message that says where this can run."""
    try:
        return importlib.import_module("tensorrt")
    except Exception as error:  # ImportError, or a broken install raising OSError on its .so files
        raise TensorRTUnavailableError(
            f"TensorRT is not importable here ({type(error).__name__}: {error}). Engines are built only "
            "inside NVIDIA's Triton image (same TensorRT version as the server) on the target GPU, by the "
            "Helm chart's engine-build step. Use --target onnx or --target cpu on this machine."
        ) from error


def probe_cuda_gpu(index: int = 0) -> GpuInfo:
    """Name and compute capability of CUDA device `index`, via the driver API (no CUDA toolkit needed)."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError as error:
        raise NoCudaGpuError(
            f"no CUDA driver (libcuda.so.1: {error}); a TensorRT engine must be built on the GPU that "
            "will serve it"
        ) from error
    status = driver.cuInit(0)
    if status != 0:
        raise NoCudaGpuError(f"CUDA driver present but cuInit failed with CUresult {status}: no usable GPU")
    count = ctypes.c_int(0)
    if driver.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value <= index:
        raise NoCudaGpuError(
            f"no CUDA GPU #{index} visible (found {count.value}; "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')})"
        )
    device = ctypes.c_int(0)
    name = ctypes.create_string_buffer(256)
    major, minor = ctypes.c_int(0), ctypes.c_int(0)
    if (
        driver.cuDeviceGet(ctypes.byref(device), index) != 0
        or driver.cuDeviceGetName(name, len(name), device) != 0
        or driver.cuDeviceGetAttribute(
            ctypes.byref(major), _CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, device
        )
        != 0
        or driver.cuDeviceGetAttribute(
            ctypes.byref(minor), _CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, device
        )
        != 0
    ):
        raise NoCudaGpuError(f"could not query CUDA GPU #{index} through the driver API")
    return GpuInfo(
        name=name.value.decode(errors="replace"), compute_capability=f"{major.value}.{minor.value}"
    )


def preflight(
    *, trt: ModuleType | None = None, gpu_probe: GpuProbe = probe_cuda_gpu
) -> tuple[ModuleType, GpuInfo]:
    """Refuse early (TensorRTUnavailableError, NoCudaGpuError) where no serving engine can be built."""
    module = trt if trt is not None else load_tensorrt()
    return module, gpu_probe()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as stream:
            stream.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def metadata_path(plan_path: Path) -> Path:
    return plan_path.with_name(plan_path.name + METADATA_SUFFIX)


def build_engine(
    onnx_path: str | Path,
    plan_path: str | Path,
    settings: EngineBuildSettings,
    *,
    trt: ModuleType | None = None,
    gpu_probe: GpuProbe = probe_cuda_gpu,
    log: Callable[[str], None] = print,
) -> EngineMetadata:
    """Parse `onnx_path`, build a serialized engine, write `plan_path` and `<plan_path>.json`.

    Raises TensorRTUnavailableError / NoCudaGpuError (both EngineBuildRefused) before doing anything on
    a machine that cannot build a serving engine, and EngineBuildError if TensorRT rejects the graph.
    """
    trt, gpu = preflight(trt=trt, gpu_probe=gpu_probe)
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    started = time.perf_counter()

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # TensorRT 10 networks are always explicit-batch (EXPLICIT_BATCH is deprecated and ignored), and
    # we build weakly typed (see module docstring), so no creation flag is set.
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    # parse_from_file resolves external-data tensors relative to the file, should the graph ever need them.
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineBuildError(f"TensorRT could not parse {onnx_path}: " + "; ".join(errors))
    _check_network_input(trt, network, settings)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_bytes)
    pinned = _apply_precision(trt, network, config, settings.precision)

    shapes = settings.profile_shapes()
    profile = builder.create_optimization_profile()
    profile.set_shape(settings.input_name, shapes["min"], shapes["opt"], shapes["max"])
    config.add_optimization_profile(profile)

    cache_bytes = b""
    if settings.timing_cache is not None and settings.timing_cache.is_file():
        cache_bytes = settings.timing_cache.read_bytes()
    # An empty buffer creates a fresh cache. A cache is only valid for the GPU, CUDA, TensorRT and flag
    # set it was made with; ignore_mismatch=False makes TensorRT refuse a foreign one, and then we start
    # fresh rather than build with tactics timed elsewhere.
    timing_cache = config.create_timing_cache(cache_bytes)
    if timing_cache is None or not config.set_timing_cache(timing_cache, ignore_mismatch=False):
        if cache_bytes:
            log(f"timing cache {settings.timing_cache} does not fit this GPU/TensorRT; starting a fresh one")
        cache_bytes = b""
        timing_cache = config.create_timing_cache(b"")
        config.set_timing_cache(timing_cache, ignore_mismatch=False)

    log(
        f"building TensorRT {trt.__version__} engine on {gpu.name} (sm {gpu.compute_capability}), "
        f"precision {settings.precision}, profile {shapes}, {pinned} layers pinned to FP32"
    )
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(
            f"TensorRT returned no engine for {onnx_path} (see the builder log above; raise "
            "--workspace-gb if it mentions memory)"
        )
    plan = bytes(serialized)
    build_seconds = time.perf_counter() - started
    _atomic_write(plan_path, plan)
    if settings.timing_cache is not None:
        _atomic_write(settings.timing_cache, bytes(config.get_timing_cache().serialize()))

    metadata = EngineMetadata(
        tensorrt_version=str(trt.__version__),
        gpu_name=gpu.name,
        compute_capability=gpu.compute_capability,
        onnx_sha256=_sha256(onnx_path),
        plan_sha256=hashlib.sha256(plan).hexdigest(),
        precision=settings.precision,
        strongly_typed=False,
        fp32_pinned_layers=pinned,
        profile={settings.input_name: shapes},
        workspace_bytes=settings.workspace_bytes,
        timing_cache=str(settings.timing_cache) if settings.timing_cache is not None else None,
        timing_cache_loaded_bytes=len(cache_bytes),
        build_seconds=round(build_seconds, 3),
        built_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    )
    _atomic_write(metadata_path(plan_path), metadata.to_json().encode())
    return metadata


def _check_network_input(trt: ModuleType, network: Any, settings: EngineBuildSettings) -> None:
    """The parsed network must take exactly the contract's input: FP16 [-1, 3, 96, 96, 96]."""
    if network.num_inputs != 1:
        raise EngineBuildError(f"expected 1 network input, found {network.num_inputs}")
    tensor = network.get_input(0)
    shape = tuple(tensor.shape)
    if (
        tensor.name != settings.input_name
        or tensor.dtype != trt.float16
        or shape != (-1, *settings.input_shape)
    ):
        raise EngineBuildError(
            f"network input is {tensor.name} {tensor.dtype} {shape}; expected {settings.input_name} "
            f"FP16 {(-1, *settings.input_shape)} (only the batch axis dynamic)"
        )


def _apply_precision(trt: ModuleType, network: Any, config: Any, precision: Precision) -> int:
    """Set the precision flags; pin LayerNorm and softmax to FP32 in reduced precision. Returns pins."""
    if precision == "fp32":
        return 0
    flag_name = "FP16" if precision == "fp16" else "BF16"
    if not hasattr(trt.BuilderFlag, flag_name) or not hasattr(trt.BuilderFlag, "OBEY_PRECISION_CONSTRAINTS"):
        raise EngineBuildError(
            f"TensorRT {trt.__version__} has no BuilderFlag.{flag_name}/OBEY_PRECISION_CONSTRAINTS (weak "
            "typing was removed in TensorRT 11). Build --precision fp32, or convert the ONNX to mixed "
            "precision with ModelOpt AutoCast and build it strongly typed."
        )
    config.set_flag(getattr(trt.BuilderFlag, flag_name))
    config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    keep_fp32 = {trt.LayerType.NORMALIZATION, trt.LayerType.SOFTMAX}
    pinned = 0
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        if layer.type not in keep_fp32:
            continue
        layer.precision = trt.float32
        for output in range(layer.num_outputs):
            layer.set_output_type(output, trt.float32)
        pinned += 1
    if pinned == 0:
        raise EngineBuildError(
            "no LayerNormalization/SoftMax layer found to keep in FP32: was the ONNX exported at opset >= 17?"
        )
    return pinned
