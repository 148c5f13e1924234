"""ONNX Runtime reference outputs for the TensorRT parity gate (`model.reference.npz`).

ONNX Runtime is available where the model is exported (the project's venv), but not inside NVIDIA's Triton
image where the TensorRT engine is built. So the export writes, next to `model.onnx`, what ONNX Runtime
(CPU) computes on a few fixed inputs, and `export.tensorrt_build` later runs the new engine on the same
inputs and compares (`compare_outputs`).

File layout (`numpy.savez`, no pickles): one array per ONNX input under its input name (FP16,
[B, 3, 96, 96, 96]), one array per ONNX output under its output name (FP32, ONNX Runtime's result), and
`__meta__`, a JSON string: {"format", "onnx_sha256", "inputs", "outputs", "samples"}.

The fixed inputs (`reference_inputs`): 2 uniform random volumes in [0, 1] and one synthetic head CT
(`demo.synthetic_head`, with a hemorrhage) preprocessed by the production path
(`headct.preprocess.preprocess`), so the gate also sees the value distribution of a real head.

The comparison is generic over output names: an output whose name starts with ``probabilities`` is
compared by max |Δp|, one whose name starts with ``embedding`` by the cosine similarity of each sample's
embedding vector (minimum over samples); any other output by max |Δ| (recorded, not gated).

This module needs only the standard library and numpy at import time (it runs in the Triton image);
onnxruntime and the synthetic-head generator are imported inside the functions that need them.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from headct import contract
from headct.files import atomic_write_bytes, sha256_file

REFERENCE_FILENAME = "model.reference.npz"
REFERENCE_FORMAT = "headct-reference-v1"
META_KEY = "__meta__"
PROBABILITIES_PREFIX = "probabilities"
EMBEDDING_PREFIX = "embedding"
#: Refuse an engine whose probabilities differ from ONNX Runtime's by more than this (absolute).
PROBABILITY_TOLERANCE = 0.01
#: Refuse an engine whose embeddings point elsewhere: cosine similarity below this for any sample.
MIN_EMBEDDING_COSINE = 0.99
DEFAULT_SEED = 0
RANDOM_VOLUMES = 2

ArrayInputs = Mapping[str, np.ndarray] | Sequence[np.ndarray]


class ReferenceError(ValueError):
    """The reference file is missing, unreadable or does not belong to this ONNX graph."""


def reference_path_for(onnx_path: str | Path) -> Path:
    """Where the reference of `onnx_path` lives by default: `model.reference.npz` beside it."""
    return Path(onnx_path).with_name(REFERENCE_FILENAME)


def synthetic_head_input(seed: int = DEFAULT_SEED) -> np.ndarray:
    """One seeded synthetic head CT (with a hemorrhage), preprocessed: float16 [3, 96, 96, 96].

    A few seconds, mostly building the atlas-derived canonical head once per process; the atlas is
    fetched by `demo.atlas.ensure_atlas()` if it is not on disk yet.
    """
    from demo.synthetic_head import make_head
    from headct.preprocess import preprocess

    volume = make_head(np.random.default_rng(seed), hemorrhage=True, edema=False)
    return preprocess(volume)


def reference_inputs(
    seed: int = DEFAULT_SEED, *, random_volumes: int = RANDOM_VOLUMES, synthetic_head: bool = True
) -> dict[str, np.ndarray]:
    """The fixed gate inputs {"image": float16 [B, 3, 96, 96, 96]}: random volumes, then one real head."""
    rng = np.random.default_rng(seed)
    samples = [rng.random((random_volumes, *contract.INPUT_SHAPE), dtype=np.float32).astype(np.float16)]
    if synthetic_head:
        samples.append(synthetic_head_input(seed)[np.newaxis])
    image = np.concatenate(samples, axis=0)
    if image.shape[0] == 0:
        raise ValueError("reference_inputs needs at least one sample")
    return {contract.INPUT_NAME: image}


def sample_names(random_volumes: int, synthetic_head: bool) -> list[str]:
    return [f"random-{i}" for i in range(random_volumes)] + (["synthetic-head"] if synthetic_head else [])


@dataclass(frozen=True)
class Reference:
    """A loaded `model.reference.npz`."""

    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]
    meta: dict[str, Any]
    path: Path | None = None

    @property
    def onnx_sha256(self) -> str | None:
        return self.meta.get("onnx_sha256")

    @property
    def batch_size(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0])


def write_reference(
    onnx_path: str | Path,
    out_path: str | Path | None = None,
    inputs: ArrayInputs | None = None,
    *,
    seed: int = DEFAULT_SEED,
    samples: Sequence[str] | None = None,
    intra_op_threads: int = 0,
) -> Path:
    """Run ONNX Runtime (CPU) on `inputs` and write inputs + every output to `out_path` (npz).

    `inputs`: {input name: array} or arrays in the graph's input order; default `reference_inputs(seed)`.
    Inputs are stored as the dtype the graph declares (FP16 for the contract's `image`), outputs as FP32.
    Returns the path written (default `model.reference.npz` beside the ONNX).
    """
    import onnxruntime as ort

    onnx_path = Path(onnx_path)
    out = Path(out_path) if out_path is not None else reference_path_for(onnx_path)
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    graph_inputs = session.get_inputs()
    if inputs is None:
        inputs = reference_inputs(seed)
        samples = samples or sample_names(RANDOM_VOLUMES, True)
    if isinstance(inputs, Mapping):
        feeds = dict(inputs)
    else:
        arrays = list(inputs)
        if len(arrays) != len(graph_inputs):
            raise ValueError(f"{len(arrays)} input arrays for {len(graph_inputs)} graph inputs")
        feeds = {spec.name: array for spec, array in zip(graph_inputs, arrays, strict=True)}
    expected = {spec.name for spec in graph_inputs}
    if set(feeds) != expected:
        raise ValueError(f"inputs {sorted(feeds)} do not match the graph's inputs {sorted(expected)}")
    feeds = {
        spec.name: np.ascontiguousarray(feeds[spec.name], _ort_dtype(spec.type)) for spec in graph_inputs
    }
    batch = {int(array.shape[0]) for array in feeds.values()}
    if len(batch) != 1:
        raise ValueError(f"inputs disagree on the batch size: {sorted(batch)}")
    output_names = [spec.name for spec in session.get_outputs()]
    results = session.run(output_names, feeds)
    outputs = {
        name: np.asarray(value, dtype=np.float32) for name, value in zip(output_names, results, strict=True)
    }
    count = batch.pop()
    return save_reference(
        out,
        feeds,
        outputs,
        onnx_sha256=sha256_file(onnx_path),
        samples=list(samples) if samples is not None else [f"sample-{i}" for i in range(count)],
        extra_meta={"onnxruntime": str(ort.__version__)},
    )


def save_reference(
    out_path: str | Path,
    inputs: Mapping[str, np.ndarray],
    outputs: Mapping[str, np.ndarray],
    *,
    onnx_sha256: str,
    samples: Sequence[str],
    extra_meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write the reference file (layout in the module docstring) atomically; outputs stored as FP32."""
    out = Path(out_path)
    outputs = {name: np.asarray(value, dtype=np.float32) for name, value in outputs.items()}
    clash = (set(inputs) & set(outputs)) | ({META_KEY} & (set(inputs) | set(outputs)))
    if clash:
        raise ValueError(f"tensor names {sorted(clash)} are used twice in the reference file")
    meta = {
        **dict(extra_meta or {}),
        "format": REFERENCE_FORMAT,
        "onnx_sha256": onnx_sha256,
        "inputs": list(inputs),
        "outputs": list(outputs),
        "samples": list(samples),
    }
    buffer = io.BytesIO()
    arrays = {**{name: np.asarray(value) for name, value in inputs.items()}, **outputs}
    np.savez(buffer, **arrays, **{META_KEY: np.array(json.dumps(meta, sort_keys=True))})
    atomic_write_bytes(out, buffer.getvalue())
    return out


def _ort_dtype(type_name: str) -> type[np.generic]:
    dtypes: dict[str, type[np.generic]] = {
        "tensor(float16)": np.float16,
        "tensor(float)": np.float32,
        "tensor(double)": np.float64,
    }
    if type_name not in dtypes:
        raise ValueError(f"unsupported ONNX input type {type_name}")
    return dtypes[type_name]


def load_reference(path: str | Path) -> Reference:
    """Read a reference file written by `write_reference`; raise ReferenceError if it is not one."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except (OSError, ValueError) as error:
        raise ReferenceError(f"cannot read the parity reference {path}: {error}") from error
    try:
        meta = json.loads(str(arrays.pop(META_KEY)))
    except (KeyError, ValueError) as error:
        raise ReferenceError(f"{path} has no readable {META_KEY}: not written by export.reference") from error
    if meta.get("format") != REFERENCE_FORMAT:
        raise ReferenceError(f"{path} has format {meta.get('format')!r}, expected {REFERENCE_FORMAT}")
    names = list(meta.get("inputs", [])) + list(meta.get("outputs", []))
    missing = [name for name in names if name not in arrays]
    if missing or not meta.get("inputs") or not meta.get("outputs"):
        raise ReferenceError(f"{path} lacks arrays {missing} (inputs {meta.get('inputs')})")
    inputs = {name: arrays[name] for name in meta["inputs"]}
    outputs = {name: arrays[name] for name in meta["outputs"]}
    return Reference(inputs=inputs, outputs=outputs, meta=meta, path=path)


# --- comparison ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParityResult:
    """Candidate (TensorRT) outputs against the ONNX Runtime reference; the gate's figures."""

    samples: int
    max_abs_probability_diff: float | None  # over every probabilities* output; None if there is none
    min_embedding_cosine: dict[str, float]  # per embedding* output, min over samples
    max_abs_diff: dict[str, float]  # per output, any kind
    probability_tolerance: float = PROBABILITY_TOLERANCE
    min_cosine: float = MIN_EMBEDDING_COSINE
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def summary(self) -> str:
        cosines = ", ".join(
            f"{name} {value:.6f}" for name, value in sorted(self.min_embedding_cosine.items())
        )
        dp = "n/a" if self.max_abs_probability_diff is None else f"{self.max_abs_probability_diff:.3e}"
        text = (
            f"TensorRT vs ONNX Runtime on {self.samples} samples: max |Δp| {dp} "
            f"(limit {self.probability_tolerance}), min embedding cosine {cosines or 'n/a'} "
            f"(limit {self.min_cosine})"
        )
        return text + ("" if self.passed else "; FAILED: " + "; ".join(self.failures))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


def _finite_or_inf(value: float) -> float:
    return value if np.isfinite(value) else float("inf")


def compare_outputs(
    reference: Mapping[str, np.ndarray],
    candidate: Mapping[str, np.ndarray],
    *,
    probability_tolerance: float = PROBABILITY_TOLERANCE,
    min_cosine: float = MIN_EMBEDDING_COSINE,
) -> ParityResult:
    """Compare every reference output with the candidate's output of the same name.

    A missing output, a shape mismatch, NaN/inf, max |Δp| > `probability_tolerance` or an embedding cosine
    < `min_cosine` is a failure (listed in `failures`); NaN never passes.
    """
    failures: list[str] = []
    max_abs: dict[str, float] = {}
    cosines: dict[str, float] = {}
    worst_dp: float | None = None
    samples = 0
    for name, want in reference.items():
        want = np.asarray(want, dtype=np.float64)
        samples = max(samples, int(want.shape[0]) if want.ndim else 1)
        if name not in candidate:
            failures.append(f"output {name} missing from the engine")
            continue
        got = np.asarray(candidate[name], dtype=np.float64)
        if got.shape != want.shape:
            failures.append(f"output {name} has shape {got.shape}, reference {want.shape}")
            continue
        # NaN/inf anywhere in the engine's output must not pass: it becomes an infinite difference.
        diff = _finite_or_inf(float(np.max(np.abs(got - want)))) if want.size else 0.0
        max_abs[name] = diff
        if name.startswith(PROBABILITIES_PREFIX):
            worst_dp = diff if worst_dp is None else max(worst_dp, diff)
            if not diff <= probability_tolerance:
                failures.append(f"{name}: max |Δp| {diff:.3e} > {probability_tolerance}")
        elif name.startswith(EMBEDDING_PREFIX):
            cosine = _min_cosine(want, got)
            cosines[name] = cosine
            if not cosine >= min_cosine:
                failures.append(f"{name}: min cosine similarity {cosine:.6f} < {min_cosine}")
    return ParityResult(
        samples=samples,
        max_abs_probability_diff=worst_dp,
        min_embedding_cosine=cosines,
        max_abs_diff=max_abs,
        probability_tolerance=probability_tolerance,
        min_cosine=min_cosine,
        failures=failures,
    )


def _min_cosine(want: np.ndarray, got: np.ndarray) -> float:
    """Minimum over samples (axis 0) of the cosine similarity of the flattened per-sample vectors."""
    want = want.reshape(want.shape[0], -1)
    got = got.reshape(got.shape[0], -1)
    if want.shape[0] == 0:
        return 1.0
    norms = np.linalg.norm(want, axis=1) * np.linalg.norm(got, axis=1)
    dots = np.sum(want * got, axis=1)
    # Two zero vectors agree; one zero vector does not; NaN fails (it is never >= the limit).
    with np.errstate(invalid="ignore", divide="ignore"):
        cosine = np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), 0.0)
    both_zero = (np.linalg.norm(want, axis=1) == 0) & (np.linalg.norm(got, axis=1) == 0)
    cosine = np.where(both_zero, 1.0, cosine)
    if not np.all(np.isfinite(cosine)):
        return float("nan")
    return float(np.min(cosine))
