"""The gateway's one shared connection to Triton (gRPC, asyncio)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import numpy as np
import tritonclient.grpc.aio as grpcclient
from pydantic import ValidationError
from tritonclient.utils import InferenceServerException

from api import metrics
from api.inference.batching import BatchAnswer
from api.inference.lanes import DEFAULT_LANE, Lane
from api.inference.triton_shm import DEFAULT_REGIONS, InputRegions, SharedMemoryMode
from api.problems import ProblemCode, ProblemError
from headct import contract
from headct.model_card import MODEL_CARD_PARAMETER, InputContract, ModelCard

log = logging.getLogger(__name__)

_INT32_MAX = 2**31 - 1
# A refused model card (503) is read again at most this often, so /readyz follows a fixed repository.
_REFUSAL_RECHECK_S = 1.0
_REFUSALS = frozenset(
    {ProblemCode.MODEL_CARD_INVALID, ProblemCode.MODEL_CONTRACT_MISMATCH, ProblemCode.MODEL_CARD_STALE}
)
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


def _version_key(version: str) -> tuple[int, str]:
    return (int(version), version) if version.isdigit() else (-1, version)


def _grpc_code(error: InferenceServerException) -> str:
    status = error.status() or "StatusCode.UNKNOWN"
    return status.removeprefix("StatusCode.")


def _input_tensor(batch: np.ndarray, in_message: bool = False) -> grpcclient.InferInput:
    """The model input of a call; its data in the gRPC message when `in_message` (else the caller
    names a shared-memory region)."""
    tensor = grpcclient.InferInput(contract.INPUT_NAME, list(batch.shape), contract.INPUT_DATATYPE)
    if in_message:
        tensor.set_data_from_numpy(batch)
    return tensor


class TritonModel:
    """The served FM-HCT model as seen through Triton: readiness, model card, inference."""

    def __init__(
        self,
        url: str,
        model_name: str,
        model_version: str,
        timeout_s: float,
        retry_after_s: int,
        shared_memory: SharedMemoryMode = "auto",
        shared_memory_regions: int = DEFAULT_REGIONS,
    ):
        self.model_name = model_name
        self.model_version = model_version
        self.timeout_s = timeout_s
        self.retry_after_s = retry_after_s
        self._client = grpcclient.InferenceServerClient(url=url, channel_args=_CHANNEL_ARGS)
        self.max_batch_size: int | None = None  # from Triton's model config, once read
        # Whether the model's dynamic batcher has the lanes' priority levels (config, once read): an older
        # export has none, and Triton refuses a priority beyond the levels a model has.
        self.priority_levels = 0
        # The card as last read (None: read it on the next `card()`), or the problem it was refused with.
        self._card: ModelCard | None = None
        self._refused: ProblemError | None = None
        self._refused_at = 0.0
        # Bumped by every invalidation: a read that was in flight meanwhile is returned, never cached.
        self._generation = 0
        self._read_lock = asyncio.Lock()  # single flight: one get_model_config at a time
        self._was_ready: bool | None = None
        # The model input through shared memory when Triton is on this host (api/inference/triton_shm.py).
        self._input_regions = (
            InputRegions(self._client, shared_memory_regions) if shared_memory == "auto" else None
        )

    async def close(self) -> None:
        if self._input_regions is not None:
            await self._input_regions.close()
        await self._client.close()

    def share_input_memory(self, owner: str, segments: Mapping[str, SharedMemory]) -> None:
        """Let Triton read inputs that already lie in `segments` (a preprocessing pool's result slots,
        replacing `owner`'s earlier ones) where they are, when it can map them; the owner keeps them
        until after `close()`."""
        if self._input_regions is not None:
            self._input_regions.adopt(owner, segments)

    @property
    def reads_shared_memory(self) -> bool:
        """Whether inputs may reach Triton through shared memory (until it turns out it cannot map it)."""
        return self._input_regions is not None and not self._input_regions.disabled

    @property
    def input_in_shared_memory(self) -> bool:
        """Whether inputs go to Triton through shared memory now (registered on first inference)."""
        return self._input_regions is not None and self._input_regions.registered

    async def is_ready(self) -> bool:
        """Whether Triton serves the model. With a cached card (and no pinned version) this asks about
        the card's version first: once Triton no longer serves it (a newer version replaced it), the
        card is invalidated here, without waiting for an inference response to say so."""
        card = self._card
        ready = False
        try:
            if card is not None and not self.model_version:
                with contextlib.suppress(InferenceServerException):  # an unknown version may be an error
                    ready = bool(await self._client.is_model_ready(self.model_name, str(card.triton_version)))
            if not ready:
                ready = bool(await self._client.is_model_ready(self.model_name, self.model_version))
                if ready and card is not None and not self.model_version:
                    self.invalidate_card(f"version {card.triton_version} is no longer served by Triton")
        except InferenceServerException:
            ready = False
        metrics.MODEL_READY.set(1 if ready else 0)
        if self._was_ready is not None and ready != self._was_ready:
            # Not ready, then ready again: Triton (re)loaded the model, maybe another version or config,
            # or restarted, forgetting the shared-memory regions this gateway registered.
            self.invalidate_card(f"model readiness changed to {'ready' if ready else 'not ready'}")
            if self._input_regions is not None:
                self._input_regions.invalidate()
        self._was_ready = ready
        return ready

    def note_served_version(self, version: str) -> None:
        """Called with the version Triton reports in each inference response: another version than the
        cached card describes means the model was updated, so the card is read again on the next `card()`.

        The requests of that call took the old card; `PredictionService.predict` compares the version
        each answer carries with its card and refuses a mismatch (503 ``model_card_stale``)."""
        card = self._card
        if version and card is not None and version != str(card.triton_version):
            self.invalidate_card(
                f"Triton served version {version}, the cached model card describes {card.triton_version}"
            )

    def invalidate_card(self, reason: str) -> None:
        """Forget the cached card (and any refusal): the next `card()` reads Triton's config again."""
        if self._card is not None or self._refused is not None:
            log.info("model card of %r invalidated: %s", self.model_name, reason)
        self._card = None
        self._refused = None
        self._generation += 1

    async def card(self) -> ModelCard:
        """The model card from Triton's model config, checked against this gateway's input contract.

        Cached until Triton reports another version in an inference response (`note_served_version`),
        no longer serves the card's version or the model's readiness changes (`is_ready`, called before
        every prediction and by /readyz); then the next call reads it again, one read at a time
        (concurrent callers wait for that read). A refused card (503 ``model_card_invalid``,
        ``model_contract_mismatch``, ``model_card_stale``) is read again at most once a second.

        A request takes its card before its scan is preprocessed and inferred; if Triton switches
        versions meanwhile, the answer carries the new version and `PredictionService.predict` refuses it
        (503 ``model_card_stale``) instead of labelling it with the old card.
        """
        card = self._card
        if card is not None:
            return card
        async with self._read_lock:
            if self._card is not None:  # another caller read it while this one waited
                return self._card
            if self._refused is not None and time.monotonic() - self._refused_at < _REFUSAL_RECHECK_S:
                raise self._refused
            generation = self._generation
            try:
                card = await self._read_card()
            except ProblemError as error:
                if error.problem in _REFUSALS and generation == self._generation:
                    self._refused, self._refused_at = error, time.monotonic()
                raise
            if generation == self._generation:
                self._card, self._refused = card, None
                log.info(
                    "model card of %r read: Triton version %d, model version %r, tasks %s",
                    self.model_name,
                    card.triton_version,
                    card.model_version,
                    ",".join(card.task_names),
                )
            return card

    async def _read_card(self) -> ModelCard:
        """Read, validate and check the card in Triton's model config (no caching here)."""
        try:
            response = await self._client.get_model_config(
                self.model_name, self.model_version, as_json=True, client_timeout=self.timeout_s
            )
            metadata = await self._client.get_model_metadata(
                self.model_name, self.model_version, as_json=True, client_timeout=self.timeout_s
            )
        except InferenceServerException as error:
            raise self.unavailable(f"model configuration unavailable: {error.message()}") from error
        config = response["config"]
        parameters = config.get("parameters", {})
        if MODEL_CARD_PARAMETER not in parameters:
            raise ProblemError(
                ProblemCode.MODEL_CARD_MISSING,
                f"Triton model {self.model_name!r} has no {MODEL_CARD_PARAMETER!r} parameter; "
                "was the repository written by `python -m export`?",
            )
        card = self._validated(parameters[MODEL_CARD_PARAMETER].get("string_value", ""))
        self._check_contract(card)
        self._check_served_version(card, metadata.get("versions", []))
        # Triton's own limit (what it enforces), not only what the card says.
        self.max_batch_size = int(config.get("max_batch_size", 0) or 0)
        self.priority_levels = int(config.get("dynamic_batching", {}).get("priority_levels", 0) or 0)
        return card

    def _refusal(self, problem: ProblemCode, detail: str, **fields: Any) -> ProblemError:
        return ProblemError(problem, detail, headers={"Retry-After": str(self.retry_after_s)}, **fields)

    def _validated(self, text: str) -> ModelCard:
        supported = ModelCard.model_fields["schema_version"].default
        try:
            raw = json.loads(text)
            if not isinstance(raw, dict):
                raise ValueError("the model card is not a JSON object")
            schema = raw.get("schema_version", 1)
            if schema != supported:
                raise ValueError(f"model card schema_version {schema!r}; this gateway reads {supported}")
            return ModelCard.model_validate(raw)
        except (ValueError, ValidationError) as error:  # JSONDecodeError is a ValueError
            if isinstance(error, ValidationError):
                reasons = "; ".join(
                    f"{'.'.join(str(part) for part in item['loc']) or 'card'}: {item['msg']}"
                    for item in error.errors()[:5]
                )
            else:
                reasons = str(error)
            raise self._refusal(
                ProblemCode.MODEL_CARD_INVALID,
                f"Triton model {self.model_name!r} has a model card this gateway cannot use ({reasons}); "
                "re-export the model with this release's `python -m export`",
            ) from None

    def _check_contract(self, card: ModelCard) -> None:
        """Refuse a model validated with another preprocessing or expecting another input tensor."""
        if card.preprocessing_version != contract.PREPROCESSING_VERSION:
            raise self._refusal(
                ProblemCode.MODEL_CONTRACT_MISMATCH,
                f"model {card.name!r} {card.model_version!r} was exported for preprocessing version "
                f"{card.preprocessing_version!r}, but this gateway preprocesses with "
                f"{contract.PREPROCESSING_VERSION!r}",
                field="preprocessing_version",
                observed=card.preprocessing_version,
                expected=contract.PREPROCESSING_VERSION,
            )
        expected = InputContract().model_dump()
        observed = card.input.model_dump()
        for key, value in expected.items():
            if observed.get(key) != value:
                raise self._refusal(
                    ProblemCode.MODEL_CONTRACT_MISMATCH,
                    f"model {card.name!r} {card.model_version!r} expects input {key} {observed.get(key)!r}, "
                    f"but this gateway (preprocessing version {contract.PREPROCESSING_VERSION!r}) sends "
                    f"{value!r}; the model's preprocessing version is {card.preprocessing_version!r}",
                    field=f"input.{key}",
                    observed=observed.get(key),
                    expected=value,
                )

    def _check_served_version(self, card: ModelCard, versions: list[str]) -> None:
        """The config describes one version (`card.triton_version`): refuse while Triton serves another
        (e.g. a version directory was added but config.pbtxt not rewritten yet)."""
        served = self.model_version or max(versions, key=_version_key, default="")
        if served and served != str(card.triton_version):
            raise self._refusal(
                ProblemCode.MODEL_CARD_STALE,
                f"Triton serves version {served} of {self.model_name!r}, but its config's model card "
                f"describes version {card.triton_version}",
                field="triton_version",
                observed=card.triton_version,
                expected=served,
            )

    async def infer_batch(
        self,
        batch: np.ndarray,
        timeout_s: float | None = None,
        outputs: Sequence[str] = (),
        *,
        lane: Lane = DEFAULT_LANE,
    ) -> BatchAnswer:
        """Preprocessed scans ([N, 3, 96, 96, 96] float16) → the named outputs, each [N, width, ...] (an
        attention output is [N, n_tasks, 8, 8, 8]), and the
        model version Triton computed them with.

        `outputs` are Triton output names (a card group's ``probabilities_output``/``embedding_output``);
        only those are asked for, so a model with several backbone groups runs only the groups they
        belong to. Empty: the one-group contract outputs ``probabilities`` and ``embedding``.

        The gRPC deadline is `timeout_s` (what is left of the callers' request deadline) or the
        inference timeout, whichever is shorter; running out of the first is 504 ``deadline_exceeded``,
        of the second 504 ``inference_timeout``.

        The request's Triton priority is `lane`'s (1 = STAT is queued first) when the model's config has
        the lanes' priority levels; otherwise the model's default.
        """
        names = list(outputs) or [contract.PROBABILITIES_NAME, contract.EMBEDDING_NAME]
        limit = self.timeout_s if timeout_s is None else max(0.001, min(self.timeout_s, timeout_s))
        request_bound = timeout_s is not None and timeout_s <= self.timeout_s
        batch = np.ascontiguousarray(batch, dtype=np.float16)
        try:
            result = await self._infer_call(batch, names, limit, lane)
        except InferenceServerException as error:
            code = _grpc_code(error)
            metrics.TRITON_ERRORS.labels(code=code).inc()
            if code == "DEADLINE_EXCEEDED":
                if request_bound:
                    raise ProblemError(
                        ProblemCode.DEADLINE_EXCEEDED, "the request deadline passed during inference"
                    ) from error
                raise ProblemError(
                    ProblemCode.INFERENCE_TIMEOUT,
                    f"inference did not finish within {self.timeout_s:g} s",
                ) from error
            if code in ("UNAVAILABLE", "RESOURCE_EXHAUSTED"):
                # Triton down, restarting, or its queue full (max_queue_size): try again later.
                raise self.unavailable("the model is overloaded or not available; retry later") from error
            raise ProblemError(
                ProblemCode.INFERENCE_FAILED, "the inference server failed this request"
            ) from error
        served = result.get_response().model_version
        self.note_served_version(served)
        answer: dict[str, np.ndarray] = {}
        for name in names:
            array = result.as_numpy(name)
            if array is None or array.ndim < 2 or len(array) != len(batch):
                # e.g. the model was replaced by one without this output between card read and call
                raise ProblemError(
                    ProblemCode.INFERENCE_FAILED, f"the inference server did not return {name!r}"
                )
            answer[name] = array
        return BatchAnswer(answer, served)

    async def _infer_call(
        self, batch: np.ndarray, names: list[str], limit: float, lane: Lane
    ) -> grpcclient.InferResult:
        """One Triton call, its input in a shared-memory region when one is free; sent again in the
        message when Triton no longer knows the region (it restarted since the registration)."""
        regions = self._input_regions
        region: str | None = None
        placed: tuple[str, int] | None = None
        if regions is not None and await regions.ensure_registered(self._region_bytes(batch)):
            placed = regions.locate(batch)  # already where a worker wrote it: no copy at all
            region = None if placed is not None else regions.lend(batch.nbytes)
        try:
            if placed is not None:
                tensor = _input_tensor(batch)
                tensor.set_shared_memory(placed[0], batch.nbytes, offset=placed[1])
            elif region is not None and regions is not None:
                tensor = _input_tensor(batch)
                tensor.set_shared_memory(region, regions.write(region, batch))
            else:
                tensor = _input_tensor(batch, in_message=True)
            in_memory = placed is not None or region is not None
            transport = "in_place" if placed is not None else "shared_memory" if in_memory else "message"
            metrics.TRITON_INPUTS.labels(transport=transport).inc()
            try:
                return await self._send(tensor, names, limit, lane)
            except InferenceServerException as error:
                if not in_memory or regions is None or "shared memory" not in (error.message() or ""):
                    raise
                log.info("Triton forgot this gateway's shared-memory regions; registering them again")
                regions.invalidate()
                metrics.TRITON_INPUTS.labels(transport="message").inc()
                return await self._send(_input_tensor(batch, in_message=True), names, limit, lane)
        finally:
            if region is not None and regions is not None:
                regions.give_back(region)

    async def _send(
        self, tensor: grpcclient.InferInput, names: list[str], limit: float, lane: Lane
    ) -> grpcclient.InferResult:
        return await self._client.infer(
            self.model_name,
            [tensor],
            model_version=self.model_version,
            outputs=[grpcclient.InferRequestedOutput(name) for name in names],
            client_timeout=limit,
            priority=lane.triton_priority if self.priority_levels >= contract.PRIORITY_LEVELS else 0,
        )

    def _region_bytes(self, batch: np.ndarray) -> int:
        """What one of the gateway's own input regions holds: a batch of Triton's maximum size."""
        return batch.nbytes // max(1, len(batch)) * max(len(batch), self.max_batch_size or 1)

    def unavailable(self, detail: str) -> ProblemError:
        return ProblemError(
            ProblemCode.MODEL_UNAVAILABLE, detail, headers={"Retry-After": str(self.retry_after_s)}
        )
