"""`POST /v1/predict`: one head CT scan in, findings out."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from api.dependencies import PredictionServiceDep, SettingsDep
from api.problems import PROBLEM_MEDIA_TYPE, Problem
from api.responses import build_predict_response, check_includes, select_tasks
from api.schemas import PredictResponse
from api.uploads import spool_body

router = APIRouter(prefix="/v1", tags=["predict"])


def _problem(description: str) -> dict[str, Any]:
    # The schema goes under the media type we actually send (problem+json); `model` registers the
    # component (FastAPI also lists it under application/json, which is harmless).
    return {
        "description": description,
        "model": Problem,
        "content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
    }


_BINARY_BODY = {"schema": {"type": "string", "format": "binary"}}
_OPENAPI_BODY = {
    "requestBody": {
        "required": True,
        "description": (
            "One head CT scan, recognised by its bytes: a zip of a DICOM series (or study), one DICOM "
            "instance per part of a multipart body, one multi-frame DICOM object, NIfTI (.nii, .nii.gz) "
            "or NRRD."
        ),
        "content": {
            "application/zip": _BINARY_BODY,
            "application/dicom": _BINARY_BODY,
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "files": {"type": "array", "items": {"type": "string", "format": "binary"}}
                    },
                }
            },
            "multipart/related": _BINARY_BODY,
            "application/octet-stream": _BINARY_BODY,
            "application/gzip": _BINARY_BODY,
            "application/x-nrrd": _BINARY_BODY,
        },
    }
}


def _split(value: str | None) -> list[str]:
    return [part.strip() for part in (value or "").split(",") if part.strip()]


@router.post(
    "/predict",
    summary="Findings for one head CT scan",
    openapi_extra=_OPENAPI_BODY,
    responses={
        400: _problem("unreadable input or bad query parameters"),
        413: _problem("body larger than the configured limit"),
        429: _problem(
            "the gateway is at capacity (`gateway_busy`) or this API key's concurrent predictions are at"
            " its limit (`key_concurrency_exceeded`); see Retry-After"
        ),
        415: _problem("unsupported media type"),
        422: _problem("a readable scan that fails validation (code says which rule)"),
        502: _problem("the inference server failed the request"),
        503: _problem("model not ready or overloaded, worker lost or shutting down; see Retry-After"),
        504: _problem("request deadline (`deadline_exceeded`) or inference timeout"),
    },
)
async def predict(
    request: Request,
    service: PredictionServiceDep,
    settings: SettingsDep,
    tasks: Annotated[str | None, Query(description="comma-separated subset of findings")] = None,
    include: Annotated[str | None, Query(description="comma-separated extras: `embedding`")] = None,
    series_uid: Annotated[
        str | None,
        Query(max_length=64, description="SeriesInstanceUID to read when the upload holds several series"),
    ] = None,
) -> PredictResponse:
    extras = _split(include)
    check_includes(extras)
    card = await service.model.card()
    selected = select_tasks(card, _split(tasks))
    # Admission first (429 gateway_busy / 503 shutting_down) so an overloaded gateway refuses before reading.
    with service.admission.enter():
        upload: Path = await spool_body(
            request, limit=settings.max_upload_bytes, directory=settings.spool_dir
        )
        try:
            prediction = await service.predict(
                upload,
                request.headers.get("content-type", ""),
                series_uid=series_uid,
                tasks=selected,
                include_embedding="embedding" in extras,
            )
        finally:
            upload.unlink(missing_ok=True)
    request.state.timings_ms = prediction.timings_ms  # for the access log line
    return build_predict_response(
        prediction,
        selected=selected,
        include_embedding="embedding" in extras,
        request_id=request.state.request_id,
        started_at=request.state.started_at,
    )
