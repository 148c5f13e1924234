"""The gateway's one shared connection to Triton (gRPC, asyncio)."""

from __future__ import annotations

import json

import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.utils import InferenceServerException

from api import metrics
from api.prediction import InferenceResult
from api.problems import ProblemError
from headct import contract
from headct.model_card import MODEL_CARD_PARAMETER, ModelCard

_INT32_MAX = 2**31 - 1
# tritonclient's defaults, plus a short reconnect backoff: gRPC's default grows to 120 s, so after a long
# Triton outage readiness (and predictions) could lag its return by up to two minutes.
_CHANNEL_ARGS = [
    ("grpc.max_send_message_length", _INT32_MAX),
    ("grpc.max_receive_message_length", _INT32_MAX),
    ("grpc.keepalive_time_ms", _INT32_MAX),
    ("grpc.keepalive_timeout_ms", 20000),
    ("grpc.keepalive_permit_without_calls", False),
    ("grpc.http2.max_pings_without_data", 2),
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.min_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


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
        self._client = grpcclient.InferenceServerClient(url=url, channel_args=_CHANNEL_ARGS)
        self._card: ModelCard | None = None
        self.max_batch_size: int | None = None  # from Triton's model config, once read

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
            # Triton's own limit (what it enforces), not only what the card says.
            self.max_batch_size = int(response["config"].get("max_batch_size", 0) or 0)
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

    async def infer(self, image: np.ndarray, timeout_s: float | None = None) -> InferenceResult:
        """One preprocessed scan ([3, 96, 96, 96] float16) → per-task probabilities and the embedding."""
        probabilities, embeddings = await self.infer_batch(image[np.newaxis], timeout_s)
        return InferenceResult(probabilities=probabilities[0], embedding=embeddings[0])

    async def infer_batch(
        self, batch: np.ndarray, timeout_s: float | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Preprocessed scans ([N, 3, 96, 96, 96] float16) → probabilities [N, T] and embeddings [N, D].

        The gRPC deadline is `timeout_s` (what is left of the callers' request deadline) or the
        inference timeout, whichever is shorter; running out of the first is 504 ``deadline_exceeded``,
        of the second 504 ``inference_timeout``.
        """
        limit = self.timeout_s if timeout_s is None else max(0.001, min(self.timeout_s, timeout_s))
        request_bound = timeout_s is not None and timeout_s <= self.timeout_s
        batch = np.ascontiguousarray(batch, dtype=np.float16)
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
                client_timeout=limit,
            )
        except InferenceServerException as error:
            code = _grpc_code(error)
            metrics.TRITON_ERRORS.labels(code=code).inc()
            if code == "DEADLINE_EXCEEDED":
                if request_bound:
                    raise ProblemError(
                        504, "deadline_exceeded", "the request deadline passed during inference"
                    ) from error
                raise ProblemError(
                    504,
                    "inference_timeout",
                    f"inference did not finish within {self.timeout_s:g} s",
                ) from error
            if code in ("UNAVAILABLE", "RESOURCE_EXHAUSTED"):
                # Triton down, restarting, or its queue full (max_queue_size): try again later.
                raise self.unavailable("the model is overloaded or not available; retry later") from error
            raise ProblemError(502, "inference_failed", "the inference server failed this request") from error
        probabilities = result.as_numpy(contract.PROBABILITIES_NAME)
        embeddings = result.as_numpy(contract.EMBEDDING_NAME)
        assert probabilities is not None and embeddings is not None
        return probabilities, embeddings

    def unavailable(self, detail: str) -> ProblemError:
        return ProblemError(
            503, "model_unavailable", detail, headers={"Retry-After": str(self.retry_after_s)}
        )
