"""The baseline the gateway is compared with: the same decode + preprocessing in-process (or in worker
processes) and the same tensor sent straight to Triton over gRPC, with no HTTP and no gateway."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Executor
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpc_sync
import tritonclient.grpc.aio as grpc_aio

from api.inference.pipeline import prepare_scan
from benchmarks.load import Sender
from headct import contract


def prepare_file(path: str, content_type: str) -> np.ndarray:
    """decode -> validate -> preprocess: the gateway worker's own function, so the baseline has its
    stages exactly, its reused volume memory included (top-level: picklable for pools)."""
    return prepare_scan(path, content_type, None)[1]


def timed_prepare(path: str, content_type: str) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    image = prepare_file(path, content_type)
    return image, time.perf_counter() - t0


def _inputs(image: np.ndarray, module: object) -> tuple[list[object], list[object]]:
    batch = np.ascontiguousarray(image[np.newaxis], dtype=np.float16)
    tensor = module.InferInput(contract.INPUT_NAME, list(batch.shape), contract.INPUT_DATATYPE)  # type: ignore[attr-defined]
    tensor.set_data_from_numpy(batch)
    outputs = [
        module.InferRequestedOutput(contract.PROBABILITIES_NAME),  # type: ignore[attr-defined]
        module.InferRequestedOutput(contract.EMBEDDING_NAME),  # type: ignore[attr-defined]
    ]
    return [tensor], outputs


class DirectTriton:
    """A persistent synchronous gRPC client straight to Triton (what a direct caller would keep open)."""

    def __init__(self, url: str, model: str = contract.DEFAULT_MODEL_NAME) -> None:
        self.model = model
        self._client = grpc_sync.InferenceServerClient(url=url)

    def infer(self, image: np.ndarray) -> None:
        inputs, outputs = _inputs(image, grpc_sync)
        self._client.infer(self.model, inputs, outputs=outputs)

    def timed_infer(self, image: np.ndarray) -> float:
        """Seconds for one inference, including building the request from the tensor."""
        t0 = time.perf_counter()
        self.infer(image)
        return time.perf_counter() - t0

    def close(self) -> None:
        self._client.close()


def infer_probabilities(url: str, image: np.ndarray, model: str = contract.DEFAULT_MODEL_NAME) -> np.ndarray:
    client = grpc_sync.InferenceServerClient(url=url)
    try:
        inputs, outputs = _inputs(image, grpc_sync)
        result = client.infer(model, inputs, outputs=outputs)
        probabilities = result.as_numpy(contract.PROBABILITIES_NAME)
        assert probabilities is not None
        return probabilities[0]
    finally:
        client.close()


def direct_sender(
    pool: Executor,
    client: grpc_aio.InferenceServerClient,
    path: Path,
    content_type: str,
    model: str = contract.DEFAULT_MODEL_NAME,
) -> Sender:
    """Best direct path: preprocessing in a worker process, then async gRPC straight to Triton."""

    async def send() -> dict[str, float]:
        t0 = time.perf_counter()
        image, prepare_s = await asyncio.get_running_loop().run_in_executor(
            pool, timed_prepare, str(path), content_type
        )
        t1 = time.perf_counter()
        inputs, outputs = _inputs(image, grpc_aio)
        await client.infer(model, inputs, outputs=outputs)
        # Same stage names as the gateway's timings_ms, so the two paths compare stage by stage.
        return {
            "queue": round((t1 - t0 - prepare_s) * 1000.0, 3),
            "decode+validate+preprocess": round(prepare_s * 1000.0, 3),
            "infer": round((time.perf_counter() - t1) * 1000.0, 3),
        }

    return send
