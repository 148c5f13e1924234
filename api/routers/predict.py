"""`POST /v1/predict`: one head CT scan in, findings out."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from api import metrics
from api.dependencies import PredictionServiceDep, SettingsDep
from api.problems import PROBLEM_MEDIA_TYPE, Problem, ProblemError
from api.schemas import Finding, InputSummary, ModelRef, PredictResponse, Timings, Warning
from api.uploads import spool_body
from headct.model_card import ModelCard

router = APIRouter(prefix="/v1", tags=["predict"])

_INCLUDABLE = frozenset({"embedding"})


def _problem(description: str) -> dict[str, Any]:
    return {"description": description, "model": Problem, "content": {PROBLEM_MEDIA_TYPE: {}}}


_BINARY_BODY = {"schema": {"type": "string", "format": "binary"}}
_OPENAPI_BODY = {
    "requestBody": {
        "required": True,
        "description": "One head CT scan: a NIfTI file (.nii or .nii.gz), recognised by its magic bytes.",
        "content": {
            "application/octet-stream": _BINARY_BODY,
            "application/gzip": _BINARY_BODY,
        },
    }
}


def _split(value: str | None) -> list[str]:
    return [part.strip() for part in (value or "").split(",") if part.strip()]


def _select_tasks(card: ModelCard, requested: list[str]) -> list[int]:
    names = card.task_names
    unknown = [name for name in requested if name not in names]
    if unknown:
        raise ProblemError(
            400,
            "unknown_task",
            f"unknown task(s): {', '.join(unknown)}",
            field="tasks",
            observed=unknown,
            expected=names,
        )
    return [names.index(name) for name in requested] if requested else list(range(len(names)))


@router.post(
    "/predict",
    summary="Findings for one head CT scan",
    openapi_extra=_OPENAPI_BODY,
    responses={
        400: _problem("unreadable input or bad query parameters"),
        413: _problem("body larger than the configured limit"),
        415: _problem("unsupported media type"),
        422: _problem("a readable scan that fails validation (code says which rule)"),
        502: _problem("the inference server failed the request"),
        503: _problem("model not ready or overloaded; see Retry-After"),
        504: _problem("inference timed out"),
    },
)
async def predict(
    request: Request,
    service: PredictionServiceDep,
    settings: SettingsDep,
    tasks: Annotated[str | None, Query(description="comma-separated subset of findings")] = None,
    include: Annotated[str | None, Query(description="comma-separated extras: `embedding`")] = None,
) -> PredictResponse:
    extras = _split(include)
    if bad := [extra for extra in extras if extra not in _INCLUDABLE]:
        raise ProblemError(
            400,
            "invalid_include",
            f"cannot include {', '.join(bad)}",
            field="include",
            observed=bad,
            expected=sorted(_INCLUDABLE),
        )
    card = await service.model.card()
    selected = _select_tasks(card, _split(tasks))
    upload: Path = await spool_body(request, limit=settings.max_upload_bytes, directory=settings.spool_dir)
    try:
        prediction = await service.predict(upload, request.headers.get("content-type", ""))
    finally:
        upload.unlink(missing_ok=True)

    findings = []
    for index in selected:
        task = card.tasks[index]
        probability = float(prediction.result.probabilities[index])
        metrics.FINDING_PROBABILITY.labels(finding=task.name).observe(probability)
        findings.append(
            Finding(
                name=task.name,
                probability=probability,
                threshold=task.threshold,
                positive=probability >= task.threshold,
            )
        )
    scan = prediction.scan
    timings = dict(prediction.timings_ms)
    timings["total"] = round((time.perf_counter() - request.state.started_at) * 1000.0, 3)
    return PredictResponse(
        request_id=request.state.request_id,
        model=ModelRef(name=card.name, version=card.model_version, sha256=card.checkpoint_sha256),
        findings=findings,
        embedding=prediction.result.embedding.tolist() if "embedding" in extras else None,
        input=InputSummary(
            shape=list(scan.file_shape),
            spacing_mm=[round(s, 4) for s in scan.file_spacing_mm],
            source_format=scan.source_format,
        ),
        warnings=[Warning(code=code, detail=detail) for code, detail in prediction.warnings],
        timings_ms=Timings.model_validate(timings),
        notice=card.notice if card.synthetic_demo else None,
    )
