"""Export a ServingGraph to ONNX and prove the ONNX graph computes what the PyTorch graph computes.

`export_onnx` writes the graph with the contract's tensor names (FP16 `image` [batch,3,96,96,96] in,
FP32 `probabilities` [batch,N], `embedding` [batch,D] and `attention` [batch,N,8,8,8] out; only the batch
axis is dynamic), then
verifies it: opset, one `LayerNormalization` node per `nn.LayerNorm`, shapes/dtypes, `onnx.checker`.
`check_parity` runs PyTorch and ONNX Runtime (CPU, FP32 compute) on the same random fp16-representable
volumes at batch sizes other than the export batch, so a batch size baked in by the tracer shows up.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from headct import contract
from headct.files import sha256_file

DEFAULT_OPSET = 17
# opset 17 is the first with LayerNormalization; TensorRT maps that node to INormalizationLayer, which it
# can keep in FP32 inside an FP16 engine. A decomposed LayerNorm (ReduceMean/Pow/Sqrt) overflows in FP16.
MIN_OPSET = 17
# Batch 2, not 1: a tracer that sees batch 1 can specialise broadcasting/squeezes to it. Parity is then
# checked at batch 1 and 3, i.e. at sizes the trace never saw.
EXPORT_BATCH_SIZE = 2
PROBABILITY_TOLERANCE = 1e-4
# Embeddings come out of the final LayerNorm (order-1 values); FP32 reduction-order noise is ~1e-6.
EMBEDDING_TOLERANCE = 1e-3
# Attention maps are softmax weights renormalised over 512 cells (values ~1/512): same bound as probabilities.
ATTENTION_TOLERANCE = 1e-4

_BATCH_AXIS = "batch"


def is_probabilities_output(name: str) -> bool:
    """``probabilities`` or ``probabilities__<group>`` (else an embedding output)."""
    return name.split(contract.GROUP_SEPARATOR)[0] == contract.PROBABILITIES_NAME


def is_attention_output(name: str) -> bool:
    """``attention`` or ``attention__<group>``."""
    return name.split(contract.GROUP_SEPARATOR)[0] == contract.ATTENTION_NAME


def _output_shapes(graph: nn.Module) -> dict[str, tuple[int, ...]]:
    """Output name -> shape without the batch axis (`output_shapes`, or `output_widths` as 1-D shapes)."""
    shapes = getattr(graph, "output_shapes", None)
    if isinstance(shapes, dict) and shapes:
        return {name: tuple(int(d) for d in shape) for name, shape in shapes.items()}
    widths = getattr(graph, "output_widths", None)
    if not isinstance(widths, dict) or not widths:
        raise OnnxExportError(f"{type(graph).__name__} does not declare its outputs (output_widths)")
    return {name: (int(width),) for name, width in widths.items()}


def _as_shapes(outputs: dict[str, int] | dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    return {name: (dims,) if isinstance(dims, int) else tuple(dims) for name, dims in outputs.items()}


class OnnxExportError(RuntimeError):
    """The exported ONNX graph is not what the serving contract needs."""


class ParityError(OnnxExportError):
    """ONNX Runtime and PyTorch disagree beyond tolerance."""


@dataclass(frozen=True)
class OnnxExportInfo:
    """What `export_onnx` wrote and verified."""

    path: Path
    sha256: str
    opset: int
    num_tasks: int
    embedding_dim: int  # of the first backbone group
    layer_norm_nodes: int
    export_batch_size: int
    max_batch_size: int
    size_bytes: int
    seconds: float
    outputs: dict[str, int] = field(default_factory=dict)  # output name -> width, in graph order
    # output name -> shape without the batch axis, in graph order (attention: (N, 8, 8, 8))
    output_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class BatchParity:
    batch_size: int
    max_abs_probability_diff: float
    max_abs_embedding_diff: float
    max_abs_attention_diff: float = 0.0  # 0.0 when the graph has no attention output


@dataclass(frozen=True)
class ParityReport:
    """PyTorch vs ONNX Runtime, max absolute differences per batch size."""

    batches: tuple[BatchParity, ...]
    seed: int
    probability_tolerance: float = PROBABILITY_TOLERANCE
    embedding_tolerance: float = EMBEDDING_TOLERANCE
    attention_tolerance: float = ATTENTION_TOLERANCE

    @property
    def max_abs_attention_diff(self) -> float:
        return _worst(b.max_abs_attention_diff for b in self.batches)

    @property
    def max_abs_probability_diff(self) -> float:
        return _worst(b.max_abs_probability_diff for b in self.batches)

    @property
    def max_abs_embedding_diff(self) -> float:
        return _worst(b.max_abs_embedding_diff for b in self.batches)

    @property
    def passed(self) -> bool:
        # Written as `diff <= tol` so that a NaN difference (NaN compares false) fails.
        return bool(
            self.max_abs_probability_diff <= self.probability_tolerance
            and self.max_abs_embedding_diff <= self.embedding_tolerance
            and self.max_abs_attention_diff <= self.attention_tolerance
        )

    def summary(self) -> str:
        per_batch = ", ".join(
            f"batch {b.batch_size}: |dprob| {b.max_abs_probability_diff:.3e} "
            f"|demb| {b.max_abs_embedding_diff:.3e} |dattn| {b.max_abs_attention_diff:.3e}"
            for b in self.batches
        )
        verdict = "PASS" if self.passed else "FAIL"
        return (
            f"parity torch vs onnxruntime-cpu {verdict}: max |dprobability| "
            f"{self.max_abs_probability_diff:.3e} (tol {self.probability_tolerance:.0e}), max |dembedding| "
            f"{self.max_abs_embedding_diff:.3e} (tol {self.embedding_tolerance:.0e}), max |dattention| "
            f"{self.max_abs_attention_diff:.3e} (tol {self.attention_tolerance:.0e}) [{per_batch}]"
        )

    def raise_if_failed(self) -> None:
        if not self.passed:
            raise ParityError(self.summary())


def _worst(values: Iterable[float]) -> float:
    """max() that returns NaN if any value is NaN (builtin max may silently skip a NaN)."""
    values = list(values)
    return math.nan if any(math.isnan(v) for v in values) else max(values)


def example_input(batch_size: int, *, seed: int) -> torch.Tensor:
    """Random volume in [0, 1], as FP16 (the wire dtype), so PyTorch and ORT see identical values."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand((batch_size, *contract.INPUT_SHAPE), generator=generator).to(torch.float16)


def export_onnx(
    graph: nn.Module,
    path: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    max_batch_size: int,
) -> OnnxExportInfo:
    """Write `graph` (a ServingGraph) to `path` as ONNX and verify it; raise OnnxExportError if wrong."""
    if opset < MIN_OPSET:
        raise OnnxExportError(f"opset {opset} < {MIN_OPSET}: LayerNorm would not export as one node")
    if max_batch_size < 1:
        raise OnnxExportError(f"max_batch_size must be >= 1, got {max_batch_size}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    graph = graph.eval()
    started = time.perf_counter()
    example = example_input(EXPORT_BATCH_SIZE, seed=0)
    shapes = _output_shapes(graph)
    widths = {name: shape[0] for name, shape in shapes.items()}
    with torch.inference_mode():
        produced = graph(example)
    got = {
        name: tuple(int(d) for d in tensor.shape[1:]) for name, tensor in zip(shapes, produced, strict=True)
    }
    if got != shapes:
        raise OnnxExportError(f"graph outputs {got} differ from its declared outputs {shapes}")
    num_tasks = sum(w for name, w in widths.items() if is_probabilities_output(name))
    embedding_dim = next(
        w for name, w in widths.items() if not is_probabilities_output(name) and not is_attention_output(name)
    )

    with _affine_batch_norms(graph), warnings.catch_warnings():
        # Choosing the TorchScript exporter is deliberate (below); its deprecation notice is noise here.
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx\.")
        torch.onnx.export(
            graph,
            (example,),
            str(path),
            # PINNED: PyTorch >= 2.9 defaults to the torch.export-based (dynamo) exporter, whose handling
            # of `dynamic_axes` regressed (pytorch/pytorch#165748) and which cannot trace a dynamic dim at
            # size 0/1. The TorchScript exporter gives one LayerNormalization node per LayerNorm at opset
            # 17 and a clean dynamic batch axis, and it needs no onnxscript.
            dynamo=False,
            export_params=True,
            opset_version=opset,
            do_constant_folding=True,
            input_names=[contract.INPUT_NAME],
            output_names=list(widths),
            dynamic_axes={name: {0: _BATCH_AXIS} for name in (contract.INPUT_NAME, *widths)},
        )

    model = onnx.load(str(path))
    if _pin_output_dims(model, shapes):
        # FM-HCT is < 400 MB, far below protobuf's 2 GB limit, so the model stays one file.
        onnx.save(model, str(path))
    layer_norms = verify_onnx_graph(
        model,
        opset=opset,
        expected_layer_norms=_count_layer_norms(graph),
        outputs=shapes,
    )
    del model
    # The path form checks the file as written (and would work past 2 GB); full_check runs shape inference.
    onnx.checker.check_model(str(path), full_check=True)
    return OnnxExportInfo(
        path=path,
        sha256=sha256_file(path),
        opset=opset,
        num_tasks=num_tasks,
        embedding_dim=embedding_dim,
        layer_norm_nodes=layer_norms,
        export_batch_size=EXPORT_BATCH_SIZE,
        max_batch_size=max_batch_size,
        size_bytes=path.stat().st_size,
        seconds=time.perf_counter() - started,
        outputs=widths,
        output_shapes=shapes,
    )


@contextlib.contextmanager
def _affine_batch_norms(graph: nn.Module) -> Iterator[None]:
    """Give every affine-free BatchNorm an explicit weight=1, bias=0 for the duration of the export.

    The heads' BatchNorms are affine-free (as in the official checkpoints). For those the TorchScript
    exporter synthesises the weight from the input's channel count, and fails ("ONNX export of
    batch_norm for unknown channel size") whenever an upstream op has lost the static shape under the
    dynamic batch; an early backbone using `cls_token.expand(batch, -1, -1)` did exactly that. weight=1,
    bias=0 is the identity, so the graph computes the same function; parity runs on the untouched module.
    """
    patched: list[nn.modules.batchnorm._BatchNorm] = []
    try:
        for module in graph.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.weight is None:
                reference = module.running_mean if module.running_mean is not None else None
                if reference is None:
                    raise OnnxExportError(f"BatchNorm without running statistics cannot be served: {module}")
                module.weight = nn.Parameter(torch.ones_like(reference), requires_grad=False)
                module.bias = nn.Parameter(torch.zeros_like(reference), requires_grad=False)
                patched.append(module)
        yield
    finally:
        for module in patched:
            module.register_parameter("weight", None)
            module.register_parameter("bias", None)


def _count_layer_norms(graph: nn.Module) -> int:
    return sum(1 for module in graph.modules() if isinstance(module, nn.LayerNorm))


def _pin_output_dims(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> bool:
    """Replace symbolic non-batch dims the tracer left on an output by their known static values."""
    changed = False
    for output in model.graph.output:
        dims = output.type.tensor_type.shape.dim
        shape = shapes.get(output.name)
        if shape is None or len(dims) != 1 + len(shape):
            continue
        for dim, size in zip(list(dims)[1:], shape, strict=True):
            if not dim.HasField("dim_value"):
                dim.Clear()
                dim.dim_value = size
                changed = True
    return changed


def _dims(value_info: onnx.ValueInfoProto) -> list[int | str]:
    return [
        d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
        for d in value_info.type.tensor_type.shape.dim
    ]


def verify_onnx_graph(
    model: onnx.ModelProto,
    *,
    opset: int,
    expected_layer_norms: int,
    num_tasks: int | None = None,
    embedding_dim: int | None = None,
    outputs: dict[str, int] | dict[str, tuple[int, ...]] | None = None,
) -> int:
    """Check the exported graph against the serving contract; return the LayerNormalization node count.

    `outputs` maps output names to widths (2-D outputs) or shapes without the batch axis, in order; a
    one-group graph may give `num_tasks` and
    `embedding_dim` instead.
    """
    if outputs is None:
        if num_tasks is None or embedding_dim is None:
            raise ValueError("give outputs, or num_tasks and embedding_dim")
        outputs = {contract.PROBABILITIES_NAME: num_tasks, contract.EMBEDDING_NAME: embedding_dim}
    problems: list[str] = []
    default_opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if default_opset != opset:
        problems.append(f"opset is {default_opset}, expected {opset}")

    inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    if [i.name for i in inputs] != [contract.INPUT_NAME]:
        problems.append(f"inputs are {[i.name for i in inputs]}, expected [{contract.INPUT_NAME!r}]")
    else:
        image = inputs[0]
        if image.type.tensor_type.elem_type != onnx.TensorProto.FLOAT16:
            problems.append(f"{contract.INPUT_NAME} is not FLOAT16")
        dims = _dims(image)
        if len(dims) != 1 + len(contract.INPUT_SHAPE) or not isinstance(dims[0], str):
            problems.append(f"{contract.INPUT_NAME} dims {dims}: expected [batch, *{contract.INPUT_SHAPE}]")
        elif tuple(dims[1:]) != contract.INPUT_SHAPE:
            problems.append(f"{contract.INPUT_NAME} dims {dims}: only the batch axis may be dynamic")

    graph_outputs = {o.name: o for o in model.graph.output}
    if list(graph_outputs) != list(outputs):
        problems.append(f"outputs are {list(graph_outputs)}, expected {list(outputs)}")
    for name, shape in _as_shapes(outputs).items():
        if name not in graph_outputs:
            continue
        if graph_outputs[name].type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
            problems.append(f"{name} is not FLOAT")
        dims = _dims(graph_outputs[name])
        if len(dims) != 1 + len(shape) or not isinstance(dims[0], str) or tuple(dims[1:]) != shape:
            problems.append(f"{name} dims {dims}: expected [batch, {', '.join(map(str, shape))}]")

    op_types = [node.op_type for node in model.graph.node]
    layer_norms = op_types.count("LayerNormalization")
    if layer_norms != expected_layer_norms:
        problems.append(
            f"{layer_norms} LayerNormalization nodes for {expected_layer_norms} nn.LayerNorm modules: "
            "LayerNorm was decomposed (ReduceMean/Pow/Sqrt), which overflows in an FP16 TensorRT engine"
        )
    if problems:
        raise OnnxExportError("exported ONNX graph rejected: " + "; ".join(problems))
    return layer_norms


def check_parity(
    graph: nn.Module,
    onnx_path: str | Path,
    *,
    batch_sizes: Sequence[int] = (1, 3),
    seed: int = 0,
    probability_tolerance: float = PROBABILITY_TOLERANCE,
    embedding_tolerance: float = EMBEDDING_TOLERANCE,
    attention_tolerance: float = ATTENTION_TOLERANCE,
    intra_op_threads: int = 0,
) -> ParityReport:
    """Run `graph` (PyTorch) and the ONNX file (ONNX Runtime, CPU) on the same inputs; report max |diff|."""
    import onnxruntime as ort  # the serving runtime of the cpu target; only needed here

    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    graph = graph.eval()
    names = list(_output_shapes(graph))
    results: list[BatchParity] = []
    for offset, batch_size in enumerate(batch_sizes):
        image = example_input(batch_size, seed=seed + offset)
        with torch.inference_mode():
            want = [t.float().numpy() for t in graph(image)]
        got = session.run(names, {contract.INPUT_NAME: image.numpy()})
        probability_diffs: list[float] = []
        embedding_diffs: list[float] = []
        attention_diffs: list[float] = [0.0]
        for name, ours, theirs in zip(names, got, want, strict=True):
            if ours.shape != theirs.shape:
                raise ParityError(f"{name}: onnxruntime shape {ours.shape} != torch shape {theirs.shape}")
            if is_probabilities_output(name):
                diffs = probability_diffs
            elif is_attention_output(name):
                diffs = attention_diffs
            else:
                diffs = embedding_diffs
            diffs.append(_max_abs_diff(ours, theirs))
        results.append(
            BatchParity(
                batch_size=batch_size,
                max_abs_probability_diff=_worst(probability_diffs),
                max_abs_embedding_diff=_worst(embedding_diffs),
                max_abs_attention_diff=_worst(attention_diffs),
            )
        )
    return ParityReport(
        batches=tuple(results),
        seed=seed,
        probability_tolerance=probability_tolerance,
        embedding_tolerance=embedding_tolerance,
        attention_tolerance=attention_tolerance,
    )


def _max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    if a.size == 0:
        return 0.0
    # NaN anywhere must not hide behind max(): it propagates and then fails the <= comparison.
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))
