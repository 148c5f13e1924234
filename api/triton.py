"""The gateway's one shared connection to Triton (gRPC, asyncio)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.utils import InferenceServerException

from api import metrics
from api.problems import ProblemError
from headct import contract
from headct.model_card import MODEL_CARD_PARAMETER, ModelCard


@dataclass(frozen=True)
class InferenceResult:
    probabilities: np.ndarray  # float32 [N tasks], in model-card task order
    embedding: np.ndarray  # float32 [D]


def _grpc_code(error: InferenceServerException) -> str:
    status = error.status() or "StatusCode.UNKNOWN"
    return status.removeprefix("StatusCode.")


class TritonModel:
    """The served FM-HCT model as seen through Triton: readiness, model card, inference."""

    def __init__(self, url: str, model_name: str, model_version: str, timeout_s: float, retry_after_s: int):
        self.model_name = model_name
        self.model_version = model_version
        self.timeout_s = timeout_s
        self.retry_after_s = retry_after_s
        self._client = grpcclient.InferenceServerClient(url=url)
        self._card: ModelCard | None = None

    async def close(self) -> None:
        await self._client.close()

    async def is_ready(self) -> bool:
        try:
            ready = bool(await self._client.is_model_ready(self.model_name, self.model_version))
        except InferenceServerException:
            ready = False
        metrics.MODEL_READY.set(1 if ready else 0)
        return ready

    async def card(self) -> ModelCard:
        """The model card from Triton's model config (cached once read)."""
        if self._card is None:
            try:
                response = await self._client.get_model_config(
                    self.model_name, self.model_version, as_json=True
                )
            except InferenceServerException as error:
                raise self.unavailable(f"model configuration unavailable: {error.message()}") from error
            parameters = response["config"].get("parameters", {})
            if MODEL_CARD_PARAMETER not in parameters:
                raise ProblemError(
                    500,
                    "model_card_missing",
                    f"Triton model {self.model_name!r} has no {MODEL_CARD_PARAMETER!r} parameter; "
                    "was the repository written by `python -m export`?",
                )
            self._card = ModelCard.model_validate(
                json.loads(parameters[MODEL_CARD_PARAMETER]["string_value"])
            )
        return self._card

    async def infer(self, image: np.ndarray) -> InferenceResult:
        """One preprocessed scan ([3, 96, 96, 96] float16) → per-task probabilities and the embedding."""
        batch = np.ascontiguousarray(image[np.newaxis], dtype=np.float16)
        tensor = grpcclient.InferInput(contract.INPUT_NAME, list(batch.shape), contract.INPUT_DATATYPE)
        tensor.set_data_from_numpy(batch)
        outputs = [
            grpcclient.InferRequestedOutput(contract.PROBABILITIES_NAME),
            grpcclient.InferRequestedOutput(contract.EMBEDDING_NAME),
        ]
        try:
            result = await self._client.infer(
                self.model_name,
                [tensor],
                model_version=self.model_version,
                outputs=outputs,
                client_timeout=self.timeout_s,
            )
        except InferenceServerException as error:
            code = _grpc_code(error)
            metrics.TRITON_ERRORS.labels(code=code).inc()
            if code == "DEADLINE_EXCEEDED":
                raise ProblemError(
                    504,
                    "inference_timeout",
                    f"inference did not finish within {self.timeout_s:g} s",
                ) from error
            if code == "UNAVAILABLE":
                raise self.unavailable("the model is overloaded or not available; retry later") from error
            raise ProblemError(502, "inference_failed", "the inference server failed this request") from error
        metrics.BATCH_SIZE.observe(1)
        probabilities = result.as_numpy(contract.PROBABILITIES_NAME)
        embedding = result.as_numpy(contract.EMBEDDING_NAME)
        assert probabilities is not None and embedding is not None
        return InferenceResult(probabilities=probabilities[0], embedding=embedding[0])

    def unavailable(self, detail: str) -> ProblemError:
        return ProblemError(
            503, "model_unavailable", detail, headers={"Retry-After": str(self.retry_after_s)}
        )
