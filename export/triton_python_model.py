"""Triton Python-backend model for the `cpu` target: runs `model.onnx` with ONNX Runtime on the CPU.

The exporter copies this file verbatim to `<repo>/<model>/<version>/model.py`, next to `model.onnx`. It
runs inside Triton's Python-backend stub, so it imports only numpy, onnxruntime (and onnx, for a model
with several backbone groups) and the stub's `triton_python_backend_utils`; nothing from this repository.

A dynamic batch arrives as a list of requests; their images are concatenated along the batch axis,
run as one ONNX Runtime call per backbone group, and the outputs split back per request.

Backbone groups (one per fine-tuned task run, listed in the model card of the config's parameters):
ONNX Runtime computes every node of a graph whatever outputs are fetched (measured: fetching one of two
branches costs as much as both), so a model with several groups is split at load into one session per
group (`onnx.utils.Extractor`, input `image` -> that group's outputs), and a batch runs only the groups
whose outputs its requests ask for: a `tasks=` subset pays only for the backbones it needs.

Explanation maps: a group's `attention` output (model card `attention_output`) is optional work. Since ORT
cannot skip it inside one session, each group with one gets two sessions, one without the attention nodes
(what a request that does not name `attention` runs, the same nodes as a graph exported without it) and
one with them; Triton passes each request's requested output names, and a batch runs the second session
only when one of its requests asked for the map. The cost is a second copy of the group's weights in
memory.

A malformed request gets its own error response and does not fail the others. Nothing about inputs or
patients is logged: only shapes and dtypes ever appear in error messages.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

INPUT_NAME = "image"
MODEL_FILENAME = "model.onnx"
THREADS_PARAMETER = "intra_op_num_threads"
CARD_PARAMETER = "model_card"


def _error(message: str) -> Any:
    """A TritonError with code INVALID_ARG (HTTP 400) where the stub supports codes (Triton >= 23.xx)."""
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    return pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)


def _parameter(model_config: dict[str, Any], key: str, default: str) -> str:
    value = model_config.get("parameters", {}).get(key, {}).get("string_value")
    return default if value in (None, "") else str(value)


GroupOutputs = tuple[list[str], list[str]]


def _group_outputs(model_config: dict[str, Any], output_names: list[str]) -> list[GroupOutputs]:
    """Per backbone group, from the model card: (outputs always computed, optional outputs computed only
    when asked for: the attention maps); one group (all outputs, none optional) without a usable card."""
    try:
        card = json.loads(_parameter(model_config, CARD_PARAMETER, "{}"))
        groups = [
            (
                [name for name in (g.get("probabilities_output"), g["embedding_output"]) if name],
                [name for name in (g.get("attention_output"),) if name],
            )
            for g in card.get("groups", [])
        ]
    except (ValueError, KeyError, TypeError, AttributeError):
        groups = []
    if sorted(name for base, extra in groups for name in base + extra) != sorted(output_names):
        return [(list(output_names), [])]
    return groups


class _Group:
    """One backbone group's sessions: `base` computes `outputs`; `full` (if any) also `optional`."""

    def __init__(self, outputs: list[str], optional: list[str], base: Any, full: Any | None) -> None:
        self.outputs = outputs
        self.optional = optional
        self.base = base
        self.full = full

    def run(self, batch: np.ndarray, wanted: set[str]) -> dict[str, np.ndarray]:
        """This group's outputs by name, computing the optional ones only when `wanted` names one."""
        if not wanted.intersection(self.outputs + self.optional):
            return {}
        if self.full is not None and wanted.intersection(self.optional):
            names = self.outputs + self.optional
            return dict(zip(names, self.full.run(names, {INPUT_NAME: batch}), strict=True))
        return dict(zip(self.outputs, self.base.run(self.outputs, {INPUT_NAME: batch}), strict=True))


def _sessions(model_path: Path, groups: list[GroupOutputs], options: Any) -> list[_Group]:
    """ONNX Runtime sessions per group: the whole graph for one group without optional outputs,
    extracted subgraphs (image -> the group's outputs, with and without the optional ones) else."""
    providers = ["CPUExecutionProvider"]
    if len(groups) == 1 and not groups[0][1]:
        whole = ort.InferenceSession(str(model_path), options, providers=providers)
        return [_Group(groups[0][0], [], whole, None)]
    import onnx
    import onnx.utils

    extractor = onnx.utils.Extractor(onnx.load(str(model_path)))

    def session(outputs: list[str]) -> Any:
        subgraph = extractor.extract_model([INPUT_NAME], outputs).SerializeToString()
        return ort.InferenceSession(subgraph, options, providers=providers)

    return [
        _Group(outputs, optional, session(outputs), session(outputs + optional) if optional else None)
        for outputs, optional in groups
    ]


class TritonPythonModel:
    """One ONNX Runtime session per model instance."""

    def initialize(self, args: dict[str, str]) -> None:
        model_config = json.loads(args["model_config"])
        version_dir = Path(args["model_repository"]) / str(args["model_version"])
        model_path = version_dir / MODEL_FILENAME
        if not model_path.is_file():  # some launchers point model_repository at the version dir itself
            model_path = Path(__file__).resolve().parent / MODEL_FILENAME

        inputs = {tensor["name"]: tensor for tensor in model_config["input"]}
        self.sample_shape = tuple(int(d) for d in inputs[INPUT_NAME]["dims"])
        self.max_batch_size = int(model_config.get("max_batch_size", 0))
        self.output_names = [tensor["name"] for tensor in model_config["output"]]

        options = ort.SessionOptions()
        options.intra_op_num_threads = int(_parameter(model_config, THREADS_PARAMETER, "0"))
        # One model instance = one request stream; inter-op parallelism only adds thread contention.
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.sessions = _sessions(model_path, _group_outputs(model_config, self.output_names), options)
        self.logger = pb_utils.Logger
        self.logger.log_info(
            f"loaded {model_path.name} as {len(self.sessions)} backbone group(s) "
            f"({sum(1 for g in self.sessions if g.full is not None)} with optional attention maps) "
            f"(onnxruntime {ort.__version__}, "
            f"intra-op threads {options.intra_op_num_threads or 'default'}, "
            f"instance {args.get('model_instance_name', '?')}, pid {os.getpid()})"
        )

    def _validate(self, image: Any) -> str | None:
        """Why this request's input is unusable, or None. Messages carry shapes/dtypes only."""
        if image is None:
            return f"missing input {INPUT_NAME!r}"
        if image.dtype != np.float16:
            return f"{INPUT_NAME} must be FP16, got {image.dtype}"
        if image.ndim != 1 + len(self.sample_shape) or tuple(image.shape[1:]) != self.sample_shape:
            expected = ", ".join(map(str, self.sample_shape))
            return f"{INPUT_NAME} must have shape [batch, {expected}], got {list(image.shape)}"
        if image.shape[0] < 1:
            return f"{INPUT_NAME} has an empty batch"
        if not np.isfinite(image).all():
            return f"{INPUT_NAME} contains NaN or infinite values"
        return None

    def _requested(self, request: Any) -> list[str]:
        """The outputs a request asks for (all of them when it names none)."""
        names = getattr(request, "requested_output_names", None)
        asked = [name for name in (names() if names is not None else []) if name in self.output_names]
        return asked or list(self.output_names)

    def _run(self, batch: np.ndarray, wanted: set[str]) -> dict[str, np.ndarray]:
        """Run the groups that produce any of `wanted`; their outputs by name."""
        results: dict[str, np.ndarray] = {}
        for group in self.sessions:
            results.update(group.run(batch, wanted))
        return results

    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        images: list[np.ndarray] = []
        owners: list[int] = []
        wanted: dict[int, list[str]] = {}
        for index, request in enumerate(requests):
            tensor = pb_utils.get_input_tensor_by_name(request, INPUT_NAME)
            image = tensor.as_numpy() if tensor is not None else None
            problem = self._validate(image)
            if problem is not None:
                responses[index] = pb_utils.InferenceResponse(output_tensors=[], error=_error(problem))
                continue
            assert image is not None  # _validate refuses a missing input
            images.append(image)
            owners.append(index)
            wanted[index] = self._requested(request)

        if images:
            batch = images[0] if len(images) == 1 else np.concatenate(images, axis=0)
            try:
                results = self._run(batch, {name for names in wanted.values() for name in names})
            except Exception as error:  # an ORT failure fails the requests of this batch, never the server
                # ORT messages name nodes and shapes, never tensor values: safe to log and return.
                message = f"inference failed for a batch of {batch.shape[0]}: {type(error).__name__}: {error}"
                self.logger.log_error(message)
                for index in owners:
                    responses[index] = pb_utils.InferenceResponse(
                        output_tensors=[], error=pb_utils.TritonError(message)
                    )
                return responses
            start = 0
            for index, image in zip(owners, images, strict=True):
                stop = start + image.shape[0]
                responses[index] = pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor(name, np.ascontiguousarray(results[name][start:stop], np.float32))
                        for name in wanted[index]
                    ]
                )
                start = stop
        return responses

    def finalize(self) -> None:
        self.sessions = []
