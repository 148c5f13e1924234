"""Build a TensorRT engine (`model.plan` + `model.plan.json`) from the exported ONNX graph, and gate it.

This runs ONLY where the `tensorrt` Python package of the serving Triton image's TensorRT version is
importable and a CUDA GPU of the target type is visible: in practice inside NVIDIA's Triton image on the
target node (the Helm chart's prepare-model step, `docker/engine-build.Dockerfile`). An engine is bound to
the exact TensorRT version and GPU architecture it was built with, so it is never built ahead of time on
another machine. Anywhere else (CI, a CPU-only dev box) it refuses with `TensorRTUnavailableError` /
`NoCudaGpuError` before touching anything. The code runs on Python 3.10 (the Python of the Triton
24.xx images); `make lint` checks that with vermin.

TensorRT versions: 10.x (Triton 24.05 and later) and 8.6 (Triton 24.01-24.04). TensorRT < 10 networks
are created with the EXPLICIT_BATCH creation flag (8.6 would otherwise build an implicit-batch network),
TensorRT 10 networks with no flag (explicit batch is the only mode there). Anything older than 8.6 is
refused with `UnsupportedTensorRTError` (an `EngineBuildRefused`): 8.6 is the first release whose ONNX
parser maps LayerNormalization to INormalizationLayer, which the FP32 pinning below relies on.

Precision (the choice, and why): `fp16` (default) uses weak typing: `BuilderFlag.FP16` lets the builder
pick FP16 kernels, and every LayerNormalization (INormalizationLayer, one per LayerNorm thanks to opset
17) and SoftMax layer is pinned to FP32 with `OBEY_PRECISION_CONSTRAINTS`, because LayerNorm after
attention overflows in FP16 (NVIDIA/TensorRT#2564, #3692, #4493) and softmax saturates. We take this path
rather than a strongly-typed network because strong typing would require the precision to live in the
ONNX graph (ModelOpt AutoCast), which we do not have yet; our ONNX is FP32 inside. Weak typing is
deprecated from TensorRT 10.12 and REMOVED in 11.x: on a TensorRT without `BuilderFlag.FP16` the build
refuses with a clear message (use `fp32`, or move to an AutoCast-converted strongly typed graph). `bf16` is
the same scheme with `BuilderFlag.BF16` (FP32 exponent range, Ampere+; not available in TensorRT 8.6).
`fp32` builds the reference engine. Pinning softmax can stop TensorRT from fusing attention into its FP16
MHA kernels; the parity gate below is what catches an engine that is fast but wrong.

Parity gate (on by default): ONNX Runtime is not installed in the Triton image, so the export writes
`model.reference.npz` beside `model.onnx` (`export.reference`: fixed FP16 inputs, 2 random volumes and one
preprocessed synthetic head, with ONNX Runtime's outputs). After building, `build_engine` deserializes the
engine, runs it on those inputs with the TensorRT Python API (`set_input_shape`, `set_tensor_address`,
`execute_async_v3`, available from 8.5) on CUDA memory from a ctypes wrapper around libcudart
(`CudaRuntime`: no torch, pycuda or cuda-python needed), in chunks of at most `max_batch_size`, and
compares (`export.reference.compare_outputs`): max |Δp| over every `probabilities*` output must be <= 0.01
and the cosine similarity of every sample's `embedding*` vector >= 0.99. The figures are recorded in
`model.plan.json` (`gate`: "passed" | "failed" | "skipped", `parity`). A failed gate raises
`EngineParityError` (an `EngineBuildError`); no `model.plan` is left at the plan path, only the
`model.plan.json` that records the failure. A missing reference is refused the same way
(`MissingReferenceError`) unless the gate is switched off explicitly (`parity_gate=False`, CLI
`--no-parity-gate`: recorded as `gate: "skipped"`, `parity: null`, and the Helm chart will not serve such
an engine).

Test seams: every TensorRT call goes through the module object returned by `load_tensorrt()` (or passed
as `trt=`), the GPU facts through a `GpuProbe`, and running the built engine through an `EngineRunner`
(default `run_engine`, which takes a `CudaRuntime`); unit tests inject fakes for all of them. The
TensorRT/CUDA path has been exercised only against those fakes on a machine without a GPU.
"""

from __future__ import annotations

import ctypes
import datetime as dt
import hashlib
import importlib
import json
import os
import re
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal

from headct import contract
from headct.files import atomic_write_bytes, sha256_file

if TYPE_CHECKING:
    import numpy as np

    from export.reference import Reference

Precision = Literal["fp16", "bf16", "fp32"]
PRECISIONS: tuple[Precision, ...] = ("fp16", "bf16", "fp32")
PLAN_FILENAME = "model.plan"
METADATA_SUFFIX = ".json"
DEFAULT_WORKSPACE_BYTES = 4 << 30
#: Oldest TensorRT this builder supports (Triton 24.01-24.04 ship 8.6; 24.05 and later ship 10.x).
MIN_TENSORRT_VERSION = (8, 6)
GATE_PASSED, GATE_FAILED, GATE_SKIPPED = "passed", "failed", "skipped"

# cuDeviceGetAttribute ids (CUDA driver API, cuda.h).
_CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75
_CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR = 76


class EngineBuildRefused(RuntimeError):
    """This machine cannot build a serving engine; nothing was written."""


class TensorRTUnavailableError(EngineBuildRefused):
    """`import tensorrt` failed."""


class NoCudaGpuError(EngineBuildRefused):
    """No CUDA driver or no visible GPU."""


class UnsupportedTensorRTError(EngineBuildRefused):
    """The importable TensorRT is older than MIN_TENSORRT_VERSION (or has no readable version)."""


class EngineBuildError(RuntimeError):
    """TensorRT was available but parsing or building failed."""


class EngineParityError(EngineBuildError):
    """The engine does not compute what ONNX Runtime computes (or could not be checked); not served."""

    def __init__(self, message: str, parity: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.parity = parity


class MissingReferenceError(EngineParityError):
    """No `model.reference.npz` to gate the engine with, and the gate was not switched off."""


class CudaRuntimeError(EngineBuildError):
    """A libcudart call made to run the parity gate failed."""


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
    gate: str = GATE_SKIPPED  # passed | failed | skipped (see the module docstring)
    parity: dict[str, Any] | None = None  # export.reference.ParityResult.to_dict() + the reference used
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"


def load_tensorrt() -> ModuleType:
    """Import the TensorRT Python package or refuse with a message that says where this can run.

    Also refuses (UnsupportedTensorRTError) a TensorRT older than MIN_TENSORRT_VERSION.
    """
    try:
        module = importlib.import_module("tensorrt")
    except Exception as error:  # ImportError, or a broken install raising OSError on its .so files
        raise TensorRTUnavailableError(
            f"TensorRT is not importable here ({type(error).__name__}: {error}). Engines are built only "
            "inside NVIDIA's Triton image (same TensorRT version as the server) on the target GPU, by the "
            "Helm chart's engine-build step. Use --target onnx or --target cpu on this machine."
        ) from error
    check_tensorrt_version(module)
    return module


def tensorrt_version(trt: ModuleType) -> tuple[int, int]:
    """(major, minor) of `trt.__version__`, e.g. (10, 5) for "10.5.0.18"."""
    text = str(getattr(trt, "__version__", ""))
    match = re.match(r"(\d+)\.(\d+)", text)
    if not match:
        raise UnsupportedTensorRTError(f"cannot read the TensorRT version from __version__={text!r}")
    return int(match.group(1)), int(match.group(2))


def check_tensorrt_version(trt: ModuleType) -> tuple[int, int]:
    """Refuse a TensorRT older than 8.6 with a message that says what is supported."""
    version = tensorrt_version(trt)
    if version < MIN_TENSORRT_VERSION:
        raise UnsupportedTensorRTError(
            f"TensorRT {trt.__version__} is too old: engines are built with TensorRT 8.6 "
            "(Triton 24.01-24.04) or 10.x (Triton 24.05 and later); older releases lack the I/O tensor "
            "API (set_input_shape/execute_async_v3) and the LayerNormalization -> INormalizationLayer "
            "mapping this builder relies on. Use a newer Triton image, or serve the ONNX model with ONNX "
            "Runtime."
        )
    return version


def network_creation_flags(trt: ModuleType) -> int:
    """Explicit batch: TensorRT < 10 needs the EXPLICIT_BATCH flag (implicit batch otherwise); 10 has none."""
    if tensorrt_version(trt)[0] >= 10:
        # TensorRT 10 networks are always explicit-batch (the flag is deprecated and ignored), and we build
        # weakly typed (see module docstring), so no creation flag is set.
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)


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
    check_tensorrt_version(module)
    return module, gpu_probe()


def metadata_path(plan_path: Path) -> Path:
    return plan_path.with_name(plan_path.name + METADATA_SUFFIX)


def utc_timestamp() -> str:
    """Now, UTC, ISO 8601 to the second. `datetime.timezone.utc`, not `datetime.UTC`: Python 3.10."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")  # noqa: UP017 (Python 3.10)


EngineRunner = Callable[[ModuleType, bytes, Mapping[str, "np.ndarray"], int], "dict[str, np.ndarray]"]
"""Runs a serialized engine on host inputs (at most `max_batch_size` per call) and returns its outputs."""


def build_engine(
    onnx_path: str | Path,
    plan_path: str | Path,
    settings: EngineBuildSettings,
    *,
    trt: ModuleType | None = None,
    gpu_probe: GpuProbe = probe_cuda_gpu,
    log: Callable[[str], None] = print,
    reference: str | Path | None = None,
    parity_gate: bool = True,
    runner: EngineRunner | None = None,
) -> EngineMetadata:
    """Parse `onnx_path`, build a serialized engine, gate it, write `plan_path` and `<plan_path>.json`.

    `reference`: the ONNX Runtime reference (default `model.reference.npz` beside the ONNX). With
    `parity_gate` (default) the engine is run on the reference inputs (`runner`, default `run_engine`) and
    must match (see the module docstring); `parity_gate=False` skips that and records `gate: "skipped"`.

    Raises TensorRTUnavailableError / NoCudaGpuError / UnsupportedTensorRTError (all EngineBuildRefused)
    before doing anything on a machine that cannot build a serving engine; MissingReferenceError before
    building when the gate has nothing to compare with; EngineBuildError if TensorRT rejects the graph;
    EngineParityError if the engine fails the gate (then no plan is left at `plan_path`).
    """
    trt, gpu = preflight(trt=trt, gpu_probe=gpu_probe)
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    gate_reference = _load_gate_reference(onnx_path, reference, settings) if parity_gate else None
    started = time.perf_counter()

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # `_parser` stays referenced until the engine is built: TensorRT's ONNX parser owns the weight memory
    # the network refers to, so letting it be collected early would free weights under the builder.
    network, _parser = _parse_onnx(trt, builder, logger, onnx_path, settings)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_bytes)
    pinned = _apply_precision(trt, network, config, settings.precision)
    shapes = _add_optimization_profile(builder, config, settings)
    cache_bytes = _attach_timing_cache(config, settings.timing_cache, log)

    log(
        f"building TensorRT {trt.__version__} engine on {gpu.name} (sm {gpu.compute_capability}), "
        f"precision {settings.precision}, profile {shapes}, {pinned} layers pinned to FP32"
    )
    plan = _build_serialized_plan(builder, network, config, onnx_path)
    build_seconds = time.perf_counter() - started
    if settings.timing_cache is not None:
        # Tactic timings are valid whatever the gate says; keep them for the next build.
        atomic_write_bytes(settings.timing_cache, bytes(config.get_timing_cache().serialize()))

    gate, parity = _gate_or_skip(trt, plan, gate_reference, settings, runner, log)
    metadata = EngineMetadata(
        tensorrt_version=str(trt.__version__),
        gpu_name=gpu.name,
        compute_capability=gpu.compute_capability,
        onnx_sha256=sha256_file(onnx_path),
        plan_sha256=hashlib.sha256(plan).hexdigest(),
        precision=settings.precision,
        strongly_typed=False,
        fp32_pinned_layers=pinned,
        profile={settings.input_name: shapes},
        workspace_bytes=settings.workspace_bytes,
        timing_cache=str(settings.timing_cache) if settings.timing_cache is not None else None,
        timing_cache_loaded_bytes=len(cache_bytes),
        build_seconds=round(build_seconds, 3),
        built_at=utc_timestamp(),
        gate=gate,
        parity=parity,
    )
    _write_engine_files(onnx_path, plan_path, plan, metadata)
    return metadata


def _parse_onnx(
    trt: ModuleType, builder: Any, logger: Any, onnx_path: Path, settings: EngineBuildSettings
) -> tuple[Any, Any]:
    """Parse the ONNX file into a new network and check its input; returns (network, parser).

    The parser is returned so the caller can keep it alive until the build: it owns the weight memory
    the network refers to.
    """
    network = builder.create_network(network_creation_flags(trt))
    parser = trt.OnnxParser(network, logger)
    # parse_from_file resolves external-data tensors relative to the file, should the graph ever need them.
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineBuildError(f"TensorRT could not parse {onnx_path}: " + "; ".join(errors))
    _check_network_input(trt, network, settings)
    return network, parser


def _add_optimization_profile(
    builder: Any, config: Any, settings: EngineBuildSettings
) -> dict[str, list[int]]:
    """Add the one min/opt/max batch profile of `settings` to `config`; returns its shapes (for the log)."""
    shapes = settings.profile_shapes()
    profile = builder.create_optimization_profile()
    profile.set_shape(settings.input_name, shapes["min"], shapes["opt"], shapes["max"])
    config.add_optimization_profile(profile)
    return shapes


def _attach_timing_cache(config: Any, cache_path: Path | None, log: Callable[[str], None]) -> bytes:
    """Give `config` the timing cache at `cache_path` if it fits, else a fresh one; returns the bytes used.

    The returned bytes are empty when the build starts from a fresh cache (none, or a foreign one), so the
    metadata records how much of a cache was actually reused.
    """
    cache_bytes = b""
    if cache_path is not None and cache_path.is_file():
        cache_bytes = cache_path.read_bytes()
    # An empty buffer creates a fresh cache. A cache is only valid for the GPU, CUDA, TensorRT and flag
    # set it was made with; ignore_mismatch=False makes TensorRT refuse a foreign one, and then we start
    # fresh rather than build with tactics timed elsewhere.
    timing_cache = config.create_timing_cache(cache_bytes)
    if timing_cache is None or not config.set_timing_cache(timing_cache, ignore_mismatch=False):
        if cache_bytes:
            log(f"timing cache {cache_path} does not fit this GPU/TensorRT; starting a fresh one")
        cache_bytes = b""
        timing_cache = config.create_timing_cache(b"")
        config.set_timing_cache(timing_cache, ignore_mismatch=False)
    return cache_bytes


def _build_serialized_plan(builder: Any, network: Any, config: Any, onnx_path: Path) -> bytes:
    """Run the TensorRT builder (the minutes-long step); a None result is TensorRT's way to fail."""
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(
            f"TensorRT returned no engine for {onnx_path} (see the builder log above; raise "
            "--workspace-gb if it mentions memory)"
        )
    return bytes(serialized)


def _gate_or_skip(
    trt: ModuleType,
    plan: bytes,
    gate_reference: Reference | None,
    settings: EngineBuildSettings,
    runner: EngineRunner | None,
    log: Callable[[str], None],
) -> tuple[str, dict[str, Any] | None]:
    """Run the parity gate when there is a reference; without one (gate switched off) say so loudly."""
    if gate_reference is not None:
        return _run_gate(trt, plan, gate_reference, settings, runner or run_engine, log)
    log("WARNING: parity gate skipped (--no-parity-gate): this engine was never compared with ONNX Runtime")
    return GATE_SKIPPED, None


def _write_engine_files(onnx_path: Path, plan_path: Path, plan: bytes, metadata: EngineMetadata) -> None:
    """Write the plan and its metadata, or, when the gate failed, only the metadata and raise."""
    if metadata.gate == GATE_FAILED:
        # Nothing servable at plan_path (not even a plan left there by an earlier build); the metadata
        # records why, so the failure can be read next to where the plan would have been.
        plan_path.unlink(missing_ok=True)
        atomic_write_bytes(metadata_path(plan_path), metadata.to_json().encode())
        parity = metadata.parity
        assert parity is not None
        raise EngineParityError(
            f"engine for {onnx_path} failed the parity gate, not written: {parity['summary']}", parity
        )
    atomic_write_bytes(plan_path, plan)
    atomic_write_bytes(metadata_path(plan_path), metadata.to_json().encode())


def _load_gate_reference(
    onnx_path: Path, reference: str | Path | None, settings: EngineBuildSettings
) -> Reference:
    """The reference to gate with, checked against this ONNX and the input contract (before building)."""
    from export import reference as ref

    path = Path(reference) if reference is not None else ref.reference_path_for(onnx_path)
    if not path.is_file():
        raise MissingReferenceError(
            f"no parity reference {path}: the export writes {ref.REFERENCE_FILENAME} beside model.onnx "
            "(export.reference.write_reference, ONNX Runtime on fixed inputs). Pass --reference PATH, or "
            "--no-parity-gate to build an engine that is never compared with ONNX Runtime (recorded as "
            'gate "skipped"; the Helm chart does not serve such an engine).'
        )
    try:
        loaded = ref.load_reference(path)
    except ref.ReferenceError as error:
        raise EngineParityError(str(error)) from error
    onnx_sha256 = sha256_file(onnx_path)
    if loaded.onnx_sha256 != onnx_sha256:
        raise EngineParityError(
            f"parity reference {path} was computed from another ONNX (sha256 {loaded.onnx_sha256}, "
            f"{onnx_path} has {onnx_sha256}); write it again with export.reference.write_reference"
        )
    image = loaded.inputs.get(settings.input_name)
    if (
        set(loaded.inputs) != {settings.input_name}
        or image is None
        or image.ndim != 1 + len(settings.input_shape)
    ):
        raise EngineParityError(
            f"parity reference {path} has inputs {sorted(loaded.inputs)}, "
            f"expected {settings.input_name} [B, {settings.input_shape}]"
        )
    if tuple(image.shape[1:]) != tuple(settings.input_shape) or image.shape[0] < 1:
        raise EngineParityError(
            f"parity reference {path}: {settings.input_name} has shape {image.shape}, expected "
            f"[B>=1, {', '.join(map(str, settings.input_shape))}]"
        )
    return loaded


def _run_gate(
    trt: ModuleType,
    plan: bytes,
    gate_reference: Reference,
    settings: EngineBuildSettings,
    runner: EngineRunner,
    log: Callable[[str], None],
) -> tuple[str, dict[str, Any]]:
    """Run the engine on the reference inputs and compare; returns (gate, parity record)."""
    from export import reference as ref

    where = {
        "reference": str(gate_reference.path),
        "reference_sha256": sha256_file(gate_reference.path) if gate_reference.path else None,
        "reference_samples": gate_reference.meta.get("samples"),
    }
    log(
        f"parity gate: running the engine on {gate_reference.batch_size} reference samples "
        f"(chunks of <= {settings.max_batch_size})"
    )
    try:
        outputs = runner(trt, plan, gate_reference.inputs, settings.max_batch_size)
    except EngineBuildError:
        raise
    except Exception as error:  # a TensorRT/ctypes failure: the engine cannot be vouched for
        raise EngineParityError(
            f"could not run the new engine for the parity gate ({type(error).__name__}: {error}); "
            "not writing it"
        ) from error
    result = ref.compare_outputs(gate_reference.outputs, outputs)
    parity = {**result.to_dict(), "summary": result.summary(), **where}
    log(result.summary())
    return (GATE_PASSED if result.passed else GATE_FAILED), parity


# --- running an engine (parity gate) ------------------------------------------------------------------


class CudaRuntime:
    """The four libcudart calls the parity gate needs, through ctypes (no torch/pycuda/cuda-python).

    `lib` is a loaded libcudart (`CudaRuntime.load()`) or, in tests, any object with the same functions.
    Device 0 of the visible devices, default stream 0.
    """

    _HOST_TO_DEVICE = 1  # cudaMemcpyKind
    _DEVICE_TO_HOST = 2

    def __init__(self, lib: Any) -> None:
        self.lib = lib
        if isinstance(lib, ctypes.CDLL):
            lib.cudaMalloc.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t]
            lib.cudaFree.argtypes = [ctypes.c_void_p]
            lib.cudaMemcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            lib.cudaStreamSynchronize.argtypes = [ctypes.c_void_p]
            lib.cudaGetErrorString.restype = ctypes.c_char_p
            for name in ("cudaMalloc", "cudaFree", "cudaMemcpy", "cudaStreamSynchronize"):
                getattr(lib, name).restype = ctypes.c_int

    @classmethod
    def load(cls) -> CudaRuntime:
        """libcudart of this image: the loader path, /usr/local/cuda*, or an nvidia-cuda-runtime wheel."""
        candidates = ["libcudart.so", "libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0"]
        for root in ("/usr/local/cuda/lib64", "/usr/local/cuda/targets/x86_64-linux/lib"):
            candidates += sorted(str(p) for p in Path(root).glob("libcudart.so*"))
        for entry in sys.path:
            candidates += sorted(
                str(p) for p in Path(entry or ".").glob("nvidia/cuda_runtime/lib/libcudart.so*")
            )
        errors: list[str] = []
        for name in candidates:
            try:
                return cls(ctypes.CDLL(name))
            except OSError as error:
                errors.append(str(error))
        raise CudaRuntimeError("cannot load libcudart to run the parity gate (" + "; ".join(errors[:4]) + ")")

    def _check(self, status: int, what: str) -> None:
        if status != 0:
            text = ""
            if isinstance(self.lib, ctypes.CDLL):
                text = ": " + (self.lib.cudaGetErrorString(status) or b"?").decode(errors="replace")
            raise CudaRuntimeError(f"{what} failed with cudaError {status}{text}")

    def malloc(self, nbytes: int) -> int:
        pointer = ctypes.c_void_p()
        self._check(self.lib.cudaMalloc(ctypes.byref(pointer), ctypes.c_size_t(max(1, nbytes))), "cudaMalloc")
        if not pointer.value:
            raise CudaRuntimeError("cudaMalloc returned a null pointer")
        return int(pointer.value)

    def free(self, pointer: int) -> None:
        self._check(self.lib.cudaFree(ctypes.c_void_p(pointer)), "cudaFree")

    def copy_to_device(self, pointer: int, array: np.ndarray) -> None:
        self._check(
            self.lib.cudaMemcpy(
                ctypes.c_void_p(pointer),
                ctypes.c_void_p(array.ctypes.data),
                ctypes.c_size_t(array.nbytes),
                self._HOST_TO_DEVICE,
            ),
            "cudaMemcpy host->device",
        )

    def copy_to_host(self, array: np.ndarray, pointer: int) -> None:
        if not array.flags.c_contiguous or not array.flags.writeable:
            raise ValueError("copy_to_host needs a writable C-contiguous array")
        self._check(
            self.lib.cudaMemcpy(
                ctypes.c_void_p(array.ctypes.data),
                ctypes.c_void_p(pointer),
                ctypes.c_size_t(array.nbytes),
                self._DEVICE_TO_HOST,
            ),
            "cudaMemcpy device->host",
        )

    def synchronize(self, stream: int = 0) -> None:
        self._check(self.lib.cudaStreamSynchronize(ctypes.c_void_p(stream)), "cudaStreamSynchronize")


def run_engine(
    trt: ModuleType,
    plan: bytes,
    inputs: Mapping[str, np.ndarray],
    max_batch_size: int,
    *,
    cuda: CudaRuntime | None = None,
) -> dict[str, np.ndarray]:
    """Deserialize `plan` and run it on `inputs` in chunks of <= `max_batch_size`; outputs as float32.

    TensorRT I/O tensor API (8.5+: `set_input_shape`, `set_tensor_address`, `execute_async_v3`), default
    stream, device buffers from `cuda` (default `CudaRuntime.load()`).
    """
    import numpy as np

    cuda = cuda if cuda is not None else CudaRuntime.load()
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        raise EngineBuildError("TensorRT could not deserialize the engine it has just built")
    context = engine.create_execution_context()
    if context is None:
        raise EngineBuildError("TensorRT could not create an execution context for the new engine")
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    input_names = [name for name in names if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT]
    output_names = [name for name in names if name not in input_names]
    if set(input_names) != set(inputs):
        raise EngineBuildError(f"engine inputs {sorted(input_names)} != reference inputs {sorted(inputs)}")
    total = {int(array.shape[0]) for array in inputs.values()}
    if len(total) != 1:
        raise EngineBuildError(f"reference inputs disagree on the batch size: {sorted(total)}")
    batch = total.pop()
    results: dict[str, list[np.ndarray]] = {name: [] for name in output_names}
    for start in range(0, batch, max_batch_size):
        stop = min(batch, start + max_batch_size)
        buffers: list[int] = []
        try:
            for name in input_names:
                dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
                host = np.ascontiguousarray(inputs[name][start:stop], dtype=dtype)
                if not context.set_input_shape(name, tuple(host.shape)):
                    raise EngineBuildError(f"the engine does not accept {name} of shape {host.shape}")
                buffers.append(cuda.malloc(host.nbytes))
                cuda.copy_to_device(buffers[-1], host)
                context.set_tensor_address(name, buffers[-1])
            host_outputs: dict[str, tuple[np.ndarray, int]] = {}
            for name in output_names:
                shape = tuple(int(d) for d in context.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise EngineBuildError(f"output {name} has unresolved shape {shape}")
                host = np.empty(shape, dtype=np.dtype(trt.nptype(engine.get_tensor_dtype(name))))
                buffers.append(cuda.malloc(host.nbytes))
                context.set_tensor_address(name, buffers[-1])
                host_outputs[name] = (host, buffers[-1])
            if not context.execute_async_v3(0):
                raise EngineBuildError("execute_async_v3 failed (see the TensorRT log above)")
            cuda.synchronize(0)
            for name, (host, pointer) in host_outputs.items():
                cuda.copy_to_host(host, pointer)
                results[name].append(host.astype(np.float32))
        finally:
            for pointer in buffers:
                cuda.free(pointer)
    del context, engine, runtime  # context before engine before runtime, as TensorRT wants
    return {name: np.concatenate(chunks, axis=0) for name, chunks in results.items()}


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
        if tensorrt_version(trt)[0] < 10:
            raise EngineBuildError(
                f"TensorRT {trt.__version__} has no BuilderFlag.{flag_name} (TensorRT 8.6 builds fp16 or "
                "fp32 engines only). Build --precision fp16 or fp32, or use a Triton image with TensorRT 10."
            )
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
