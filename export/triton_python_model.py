"""Triton Python-backend model for the `cpu` target: runs `model.onnx` with ONNX Runtime on the CPU.

The exporter copies this file verbatim to `<repo>/<model>/<version>/model.py`, next to `model.onnx`. It
runs inside Triton's Python-backend stub, so it imports only numpy, onnxruntime and the stub's
`triton_python_backend_utils`; nothing from this repository.

A dynamic batch arrives as a list of requests; their images are concatenated along the batch axis,
run as one ONNX Runtime call, and the outputs split back per request. A malformed request gets its own
error response and does not fail the others. Nothing about inputs or patients is logged: only shapes and
dtypes ever appear in error messages.
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
OUTPUT_NAMES = ("probabilities", "embedding")
MODEL_FILENAME = "model.onnx"
THREADS_PARAMETER = "intra_op_num_threads"


def _error(message: str) -> Any:
    """A TritonError with code INVALID_ARG (HTTP 400) where the stub supports codes (Triton >= 23.xx)."""
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    return pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)


def _parameter(model_config: dict[str, Any], key: str, default: str) -> str:
    value = model_config.get("parameters", {}).get(key, {}).get("string_value")
    return default if value in (None, "") else str(value)


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

        options = ort.SessionOptions()
        options.intra_op_num_threads = int(_parameter(model_config, THREADS_PARAMETER, "0"))
        # One model instance = one request stream; inter-op parallelism only adds thread contention.
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        self.logger = pb_utils.Logger
        self.logger.log_info(
            f"loaded {model_path.name} (onnxruntime {ort.__version__}, "
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

    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        images: list[np.ndarray] = []
        owners: list[int] = []
        for index, request in enumerate(requests):
            tensor = pb_utils.get_input_tensor_by_name(request, INPUT_NAME)
            image = tensor.as_numpy() if tensor is not None else None
            problem = self._validate(image)
            if problem is not None:
                responses[index] = pb_utils.InferenceResponse(output_tensors=[], error=_error(problem))
                continue
            images.append(image)
            owners.append(index)

        if images:
            batch = images[0] if len(images) == 1 else np.concatenate(images, axis=0)
            try:
                probabilities, embedding = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: batch})
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
                        pb_utils.Tensor(
                            OUTPUT_NAMES[0], np.ascontiguousarray(probabilities[start:stop], np.float32)
                        ),
                        pb_utils.Tensor(
                            OUTPUT_NAMES[1], np.ascontiguousarray(embedding[start:stop], np.float32)
                        ),
                    ]
                )
                start = stop
        return responses

    def finalize(self) -> None:
        self.session = None
