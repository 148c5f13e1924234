"""One prediction from an uploaded file: decode → validate → preprocess (worker thread) → Triton."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import numpy as np

from api import metrics
from api.ingest import DecodedScan, decode_upload
from api.problems import ProblemError
from api.triton import InferenceResult, TritonModel
from api.validation import validate
from headct.model_card import ModelCard
from headct.preprocess import PreprocessingError, preprocess


@dataclass
class Prediction:
    card: ModelCard
    scan: DecodedScan
    result: InferenceResult
    warnings: list[tuple[str, str]]
    timings_ms: dict[str, float] = field(default_factory=dict)


class _Stopwatch:
    def __init__(self) -> None:
        self.timings_ms: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        seconds = now - self._last
        self._last = now
        self.timings_ms[stage] = round(seconds * 1000.0, 3)
        metrics.STAGE_DURATION.labels(stage=stage).observe(seconds)


def _prepare(
    upload: Path, content_type: str, series_uid: str | None, watch: _Stopwatch
) -> tuple[DecodedScan, np.ndarray, list]:
    scan = decode_upload(upload, content_type, series_uid=series_uid)
    watch.lap("decode")
    warnings = validate(scan)
    watch.lap("validate")
    try:
        image = preprocess(scan.volume)
    except PreprocessingError as error:
        raise ProblemError(422, error.code, str(error)) from error
    watch.lap("preprocess")
    return scan, image, warnings


class PredictionService:
    """Owns the CPU-bound stages' concurrency limit and the call to Triton."""

    def __init__(self, model: TritonModel, preprocess_concurrency: int) -> None:
        self.model = model
        self._cpu_slots = anyio.CapacityLimiter(preprocess_concurrency)

    async def predict(self, upload: Path, content_type: str, *, series_uid: str | None = None) -> Prediction:
        if not await self.model.is_ready():
            raise self.model.unavailable("the model is not ready yet")
        card = await self.model.card()
        watch = _Stopwatch()
        metrics.QUEUE_DEPTH.inc()
        try:
            await self._cpu_slots.acquire()
        finally:
            metrics.QUEUE_DEPTH.dec()
        watch.lap("queue")
        try:
            # Decoding and resampling are CPU-bound: never on the event loop.
            scan, image, warnings = await anyio.to_thread.run_sync(
                _prepare, upload, content_type, series_uid, watch
            )
        finally:
            self._cpu_slots.release()
        result = await self.model.infer(image)
        watch.lap("infer")
        return Prediction(card=card, scan=scan, result=result, warnings=warnings, timings_ms=watch.timings_ms)
