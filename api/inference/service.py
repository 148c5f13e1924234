"""One prediction from an uploaded file: admission → decode → validate → preprocess (process pool) →
micro-batched Triton call, all under one deadline.

Stages and their timings (``timings_ms`` and ``headct_stage_duration_seconds``):

- ``queue``: waiting for an in-flight slot (api/inference/admission.py);
- ``decode``, ``validate``, ``preprocess``: measured inside the worker process (api/inference/workers.py) and
  observed here, in the gateway process, so the metrics are those the gateway exports;
- ``infer``: waiting for the batch and the Triton call (api/inference/batching.py).

Only the Triton outputs the answer needs are asked for (`outputs_for`): the probabilities of the backbone
groups that hold the requested tasks, and the embedding group's embedding when it is included.

The deadline (`request_timeout_s`) starts once the upload is spooled; at it the caller gets 504
``deadline_exceeded``, and what is left of it is the Triton call's gRPC timeout.

Each prediction runs in a priority lane (api/inference/lanes.py) that admission, the preprocessing pool,
the micro-batcher and Triton all honour.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterable, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

import numpy as np

from api import metrics
from api.inference.admission import Admission
from api.inference.answers import MAP_INCLUDES, build_predict_response, check_includes, no_maps, select_tasks
from api.inference.batching import BatchAnswer, MicroBatcher, deadline_exceeded
from api.inference.explanations import ExplanationFormat, render_explanations
from api.inference.lanes import DEFAULT_LANE, Lane
from api.inference.pipeline import prepare_scan
from api.inference.uploads import check_declared_length, spool_chunks
from api.inference.workers import Leased, PreprocessPool
from api.ingest import DecodedScan
from api.problems import ProblemCode, ProblemError
from api.results.dicom_sr import Algorithm
from api.schemas import PredictResponse
from api.settings import Settings, ingest_limits

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from api.inference.backend import InferenceBackend
    from headct.model_card import ModelCard

T = TypeVar("T")


@dataclass(frozen=True)
class InferenceResult:
    probabilities: dict[str, float]  # task name -> probability, for the tasks that were run
    embedding: np.ndarray | None  # float32 [D] of the card's embedding group, when asked for
    # task name -> float32 [8, 8, 8] explanation map, for the tasks run when attention was asked for
    attention: dict[str, np.ndarray] = field(default_factory=dict)


def outputs_for(
    card: ModelCard, tasks: Sequence[str], include_embedding: bool, include_attention: bool = False
) -> list[str]:
    """Triton outputs that answer `tasks` (all when empty) and, if asked, the embedding and the
    attention maps of the groups that hold the tasks."""
    groups = card.groups_for(list(tasks) or card.task_names)
    names = [group.probabilities_output for group in groups if group.probabilities_output]
    if include_embedding:
        names.append(card.group(card.embedding_group).embedding_output)
    if include_attention:
        names.extend(group.attention_output for group in groups if group.attention_output)
    return list(dict.fromkeys(names))


def result_from(card: ModelCard, rows: Mapping[str, np.ndarray]) -> InferenceResult:
    """One scan's output rows ({output name: [width]}) as task probabilities and the embedding."""
    probabilities: dict[str, float] = {}
    for group in card.groups:
        output = group.probabilities_output
        if output is not None and output in rows:
            values = rows[output]
            probabilities.update((task, float(values[i])) for i, task in enumerate(group.tasks))
    embedding = rows.get(card.group(card.embedding_group).embedding_output)
    attention: dict[str, np.ndarray] = {}
    for group in card.groups:
        maps = rows.get(group.attention_output) if group.attention_output else None
        if maps is not None:
            attention.update((task, maps[i]) for i, task in enumerate(group.tasks))
    return InferenceResult(probabilities=probabilities, embedding=embedding, attention=attention)


@dataclass(frozen=True)
class ScanRequest:
    """One prediction as a transport hands it over: the scan's bytes as they arrive, and its options
    parsed but not yet checked (`PredictionService.handle` checks them against the model card)."""

    chunks: AsyncIterable[bytes]
    content_type: str
    request_id: str
    started_at: float  # time.perf_counter() when the request arrived
    tasks: list[str] = field(default_factory=list)
    include: list[str] = field(default_factory=list)
    series_uid: str | None = None
    declared_length: int | None = None  # Content-Length, when the transport knows it
    spool_prefix: str = "headct-upload-"
    lane: Lane = DEFAULT_LANE  # the priority lane (`lanes.resolve_lane`: asked for, and allowed the key)
    evidence: bool = False  # keep a DICOM scan's instances (no pixels) for a DICOM SR answer
    # The findings' attention maps on the scan's own grid, in these formats (`api.inference.explanations`).
    explain: tuple[ExplanationFormat, ...] = ()


@dataclass(frozen=True)
class HandledRequest:
    response: PredictResponse
    timings_ms: dict[str, float]  # per stage, for the access log
    lane: Lane
    # StudyInstanceUID of a DICOM upload, for answers that link the study (FHIR); not in the JSON answer.
    study_uid: str | None = None
    # The DICOM series' instances without pixels, when `ScanRequest.evidence` asked for them (DICOM SR).
    evidence: tuple[Dataset, ...] = ()
    # The maps on the scan's grid, per format `ScanRequest.explain` asked for.
    explanations: dict[ExplanationFormat, bytes] = field(default_factory=dict)


@dataclass
class Prediction:
    card: ModelCard
    scan: DecodedScan  # its `volume` is a placeholder: the voxels stayed in the worker
    result: InferenceResult
    warnings: list[tuple[str, str]]
    timings_ms: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class SharesInputMemory(Protocol):
    """A backend that can read model inputs where the preprocessing workers wrote them
    (`TritonModel.share_input_memory`)."""

    @property
    def reads_shared_memory(self) -> bool: ...

    def share_input_memory(self, owner: str, segments: Mapping[str, SharedMemory]) -> None: ...


def _preprocess_pools(
    settings: Settings, on_slots: Callable[[str, Mapping[str, SharedMemory]], None] | None = None
) -> tuple[PreprocessPool, PreprocessPool | None]:
    """The pool for STAT and routine scans, and the bulk pool: its own processes at a lower CPU
    priority, started with the first bulk scan (None when `bulk_preprocess_workers` is 0 or the
    pipeline runs in a thread: bulk then shares the pool, kept off one of its workers).

    A scan's model input stays in its pool's result slot until its inference is done, so each pool
    has a slot per scan that may be in flight besides two per worker."""
    workers = settings.preprocess_workers
    bulk_workers = workers if settings.bulk_preprocess_workers is None else settings.bulk_preprocess_workers

    def pool(name: str, size: int, **options: Any) -> PreprocessPool:
        return PreprocessPool(
            size,
            retry_after_s=settings.retry_after_s,
            log_level=settings.log_level,
            log_format=settings.log_format,
            result_slots=2 * size + settings.max_inflight,
            on_slots=functools.partial(on_slots, name) if on_slots is not None else None,
            **options,
        )

    if workers == 0 or bulk_workers == 0:
        return pool("pool", workers, lane_limits={Lane.BULK: workers - 1}), None
    return pool("pool", workers), pool("bulk", bulk_workers, nice=settings.bulk_nice)


class PredictionService:
    """Owns the preprocessing pool, admission, the micro-batcher and the deadline of each prediction."""

    def __init__(self, model: InferenceBackend, settings: Settings) -> None:
        self.model = model
        self.settings = settings
        self.limits = ingest_limits(settings)
        self.admission = Admission(
            settings.max_inflight,
            settings.max_queue,
            busy_retry_after_s=settings.busy_retry_after_s,
            shutdown_retry_after_s=settings.retry_after_s,
            bulk_max_inflight=settings.bulk_inflight_limit,
            bulk_max_queue=settings.bulk_max_queue,
        )
        self.pool, self.bulk_pool = _preprocess_pools(settings, self._share_slots)
        self.batcher = MicroBatcher(
            self._infer_batch,
            max_size=settings.batch_max_size,
            max_delay_s=settings.batch_max_delay_ms / 1000.0,
            enabled=settings.batching_enabled,
        )
        self._batch_limit_checked = False

    async def start(self) -> None:
        await self.pool.start()

    def _share_slots(self, pool: str, segments: Mapping[str, SharedMemory]) -> None:
        """A pool's result slots, for a backend that can read the scans' inputs where they lie."""
        if isinstance(self.model, SharesInputMemory):
            self.model.share_input_memory(pool, segments)

    async def close(self) -> None:
        await self.batcher.close()
        pools = [pool for pool in (self.pool, self.bulk_pool) if pool is not None]
        await asyncio.gather(*(asyncio.to_thread(pool.shutdown) for pool in pools))

    async def _infer_batch(
        self, batch: np.ndarray, timeout_s: float, outputs: Sequence[str], *, lane: Lane
    ) -> BatchAnswer | Mapping[str, np.ndarray]:
        return await self.model.infer_batch(batch, timeout_s, outputs, lane=lane)

    def _limit_batch_size(self, card: ModelCard) -> None:
        """Never send Triton more scans at once than the model accepts (its config's max_batch_size)."""
        if not self._batch_limit_checked:
            self._batch_limit_checked = True
            limit = getattr(self.model, "max_batch_size", None) or card.max_batch_size
            if limit and limit < self.batcher.max_size:
                self.batcher.max_size = limit

    async def handle(self, request: ScanRequest) -> HandledRequest:
        """The whole of one prediction for any transport: its lane, options checked against the model
        card, admission, the upload spooled to disk (and removed), `predict`, and the answer built.
        Raises ProblemError; REST and gRPC only translate requests in and answers or problems out."""
        lane = request.lane
        try:
            handled = await self._handle(request, lane)
        except ProblemError as error:
            metrics.PREDICTIONS.labels(lane=lane.value, outcome=error.code).inc()
            raise
        metrics.PREDICTIONS.labels(lane=lane.value, outcome="ok").inc()
        metrics.PREDICTION_DURATION.labels(lane=lane.value).observe(time.perf_counter() - request.started_at)
        return handled

    async def _handle(self, request: ScanRequest, lane: Lane) -> HandledRequest:
        check_includes(request.include)
        card = await self.model.card()
        selected = select_tasks(card, request.tasks)
        include_embedding = "embedding" in request.include
        include_attention = "attention" in request.include
        wants_maps = include_attention or bool(request.explain)
        # Admission first (429 gateway_busy / 503 shutting_down): an overloaded gateway refuses before
        # reading the body.
        with self.admission.enter(lane):
            if request.declared_length is not None:
                check_declared_length(request.declared_length, limit=self.settings.max_upload_bytes)
            # Triton's readiness is asked while the upload arrives, not after it (a round trip saved).
            readiness = asyncio.ensure_future(self.model.is_ready())
            try:
                upload = await spool_chunks(
                    request.chunks,
                    limit=self.settings.max_upload_bytes,
                    directory=self.settings.spool_dir,
                    prefix=request.spool_prefix,
                )
                try:
                    prediction = await self.predict(
                        upload,
                        request.content_type,
                        series_uid=request.series_uid,
                        tasks=selected,
                        include_embedding=include_embedding,
                        include_attention=wants_maps,
                        lane=lane,
                        evidence=request.evidence,
                        readiness=readiness,
                    )
                    explanations = await self._explain(request, upload, prediction, selected)
                finally:
                    upload.unlink(missing_ok=True)
            finally:
                readiness.cancel()  # (done by now unless the upload or `predict` failed before it)
        response = build_predict_response(
            prediction,
            selected=selected,
            include_embedding=include_embedding,
            include_attention=include_attention,
            request_id=request.request_id,
            started_at=request.started_at,
            lane=lane,
        )
        dicom = prediction.scan.dicom
        return HandledRequest(
            response=response,
            timings_ms=prediction.timings_ms,
            lane=lane,
            study_uid=(dicom.study_uid or None) if dicom else None,
            evidence=prediction.scan.evidence,
            explanations=explanations,
        )

    async def _explain(
        self, request: ScanRequest, upload: Path, prediction: Prediction, selected: list[str]
    ) -> dict[ExplanationFormat, bytes]:
        """The selected findings' maps on the upload's own grid, in the formats asked for: a second
        pass over the upload in the lane's pool (the voxels never leave a worker). A Parametric Map
        holds the positive findings' maps, or the most probable finding's when none is positive: each
        map is a float frame per source slice (~1 MB each for 512x512)."""
        if not request.explain:
            return {}
        maps = prediction.result.attention
        if missing := [task for task in selected if task not in maps]:
            raise no_maps(missing, asked=sorted(MAP_INCLUDES))
        tasks = list(selected)
        card = prediction.card
        if "dicom" in request.explain:
            if prediction.scan.dicom is None:
                raise ProblemError(
                    ProblemCode.NOT_ACCEPTABLE,
                    "a DICOM Parametric Map needs a DICOM upload (its series' geometry, patient and study); "
                    "ask for the maps as NIfTI or PNG (`format=nifti|png`)",
                    field="Accept",
                    observed="application/dicom",
                    expected=["application/json", "format=nifti", "format=png"],
                )
            thresholds = {task.name: task.threshold for task in card.tasks}
            probabilities = prediction.result.probabilities
            positive = [task for task in tasks if probabilities[task] >= thresholds[task]]
            tasks = positive or [max(tasks, key=lambda task: probabilities[task])]
        algorithm = Algorithm(
            name=card.name,
            version=card.model_version,
            model_sha256=card.checkpoint_sha256,
            synthetic_demo=card.synthetic_demo,
        )
        started = time.perf_counter()
        rendered = await self._run_in_lane_pool(
            request.lane,
            render_explanations,
            str(upload),
            request.content_type,
            request.series_uid,
            self.limits,
            {task: maps[task] for task in tasks},
            request.explain,
            algorithm,
        )
        prediction.timings_ms["explain"] = round((time.perf_counter() - started) * 1000.0, 3)
        return rendered

    async def _prepare_in_pool(
        self, lane: Lane, upload: Path, content_type: str, series_uid: str | None, evidence: bool
    ) -> Leased[tuple[DecodedScan, np.ndarray, list[tuple[str, str]], dict[str, float]]]:
        """`prepare_scan` in the lane's pool; when the backend can read it there, the model input is left
        in the worker's result slot until the lease is released (after inference)."""
        in_place = isinstance(self.model, SharesInputMemory) and self.model.reads_shared_memory
        return await self._leased_in_lane_pool(
            lane, in_place, prepare_scan, str(upload), content_type, series_uid, self.limits, evidence
        )

    async def _run_in_lane_pool(self, lane: Lane, function: Callable[..., T], *args: Any) -> T:
        """`function(*args)` in the lane's pool (`_leased_in_lane_pool`), its result the caller's own."""
        return (await self._leased_in_lane_pool(lane, False, function, *args)).value

    async def _leased_in_lane_pool(
        self, lane: Lane, in_place: bool, function: Callable[..., T], *args: Any
    ) -> Leased[T]:
        """`function(*args)` in the lane's pool (`PreprocessPool.run_leased`). While a STAT or routine
        scan is in a worker no new bulk job starts: on a small node even a lower-priority bulk worker
        on the other core slows it (memory bandwidth, shared caches) by half again."""
        if self.bulk_pool is None:
            return await self.pool.run_leased(function, *args, lane=lane, in_place=in_place)
        if lane is Lane.BULK:
            return await self.bulk_pool.run_leased(function, *args, lane=lane, in_place=in_place)
        with self.bulk_pool.gate.held():
            return await self.pool.run_leased(function, *args, lane=lane, in_place=in_place)

    async def predict(
        self,
        upload: Path,
        content_type: str,
        *,
        series_uid: str | None = None,
        tasks: Sequence[str] = (),
        include_embedding: bool = False,
        include_attention: bool = False,
        lane: Lane = DEFAULT_LANE,
        evidence: bool = False,
        readiness: Awaitable[bool] | None = None,
    ) -> Prediction:
        """One scan's prediction for `tasks` (all the card's tasks when empty), in `lane`; `readiness`:
        the model's `is_ready()` when the caller asked already."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.request_timeout_s
        if not await (readiness if readiness is not None else self.model.is_ready()):
            raise self.model.unavailable("the model is not ready yet")
        card = await self.model.card()
        if missing := [task for task in tasks if task not in card.task_names]:
            # Only when the model was replaced between reading the request and now.
            raise self.model.unavailable(f"the model changed; it no longer has {missing}: retry")
        outputs = outputs_for(card, tasks, include_embedding, include_attention)
        self._limit_batch_size(card)
        timings_ms: dict[str, float] = {}

        def observe(stage: str, seconds: float) -> None:
            timings_ms[stage] = round(seconds * 1000.0, 3)
            metrics.STAGE_DURATION.labels(stage=stage).observe(seconds)

        try:
            async with asyncio.timeout_at(deadline):
                started = time.perf_counter()
                async with self.admission.slot(lane):
                    observe("queue", time.perf_counter() - started)
                    with self.batcher.expecting():
                        prepared = await self._prepare_in_pool(
                            lane, upload, content_type, series_uid, evidence
                        )
                        try:
                            scan, image, warnings, seconds = prepared.value
                            for stage, value in seconds.items():
                                observe(stage, value)
                            started = time.perf_counter()
                            answer = self.batcher.enqueue(image, deadline, outputs, lane)
                        except BaseException:
                            prepared.release()
                            raise
                    try:
                        rows = await answer
                    finally:
                        prepared.release()  # the input's slot, once Triton has read it
                    observe("infer", time.perf_counter() - started)
        except TimeoutError:
            raise deadline_exceeded(
                f"no answer within the {self.settings.request_timeout_s:g} s request deadline"
            ) from None
        if rows.model_version and rows.model_version != str(card.triton_version):
            # The model was replaced while this scan was in flight: its outputs would be labelled and
            # thresholded by a card that does not describe them.
            self.model.invalidate_card(
                f"version {rows.model_version} answered a request for {card.triton_version}"
            )
            raise ProblemError(
                ProblemCode.MODEL_CARD_STALE,
                f"the model was updated to version {rows.model_version} during this request; retry",
                headers={"Retry-After": str(self.settings.retry_after_s)},
            )
        result = result_from(card, rows)
        return Prediction(card=card, scan=scan, result=result, warnings=warnings, timings_ms=timings_ms)
