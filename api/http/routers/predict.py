"""`POST /v1/predict`: one head CT scan in, findings out."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response

from api.http.dependencies import PredictionServiceDep, SettingsDep
from api.http.map_answers import explain_formats, map_file, multipart_related, with_preview
from api.http.negotiation import negotiate
from api.http.params import (
    FormatQuery,
    IncludeQuery,
    PriorityHeader,
    PriorityQuery,
    TasksQuery,
    request_lane,
    split_list,
)
from api.inference.service import ScanRequest
from api.inference.uploads import declared_length
from api.problems import problem_responses
from api.results.dicom_sr import DICOM_MEDIA_TYPE
from api.results.dicom_sr_answer import answer_sr
from api.results.fhir import FHIR_MEDIA_TYPE, diagnostic_report
from api.schemas import PredictResponse

router = APIRouter(prefix="/v1", tags=["predict"])


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


_BINARY: dict[str, Any] = {"schema": {"type": "string", "format": "binary"}}
_OPENAPI_OK: dict[int | str, dict[str, Any]] = {
    200: {
        "description": (
            "The findings: JSON (`PredictResponse`), or with `Accept: application/fhir+json` a FHIR R4 "
            'DiagnosticReport with one contained Observation per finding (README, "FHIR results"), or '
            "for a DICOM upload with `Accept: application/dicom` a DICOM Comprehensive 3D SR (TID 1500) "
            "in the source study (with `include=attention`: `multipart/related` SR + Parametric Map), or "
            "with `format=nifti|png` the maps on the scan's grid."
        ),
        "content": {
            FHIR_MEDIA_TYPE: {
                "schema": {
                    "type": "object",
                    "description": "FHIR R4 DiagnosticReport",
                    "required": ["resourceType", "status", "code"],
                    "properties": {"resourceType": {"type": "string", "enum": ["DiagnosticReport"]}},
                    "externalDocs": {"url": "https://hl7.org/fhir/R4/diagnosticreport.html"},
                }
            },
            DICOM_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}},
            "multipart/related": _BINARY,
            "application/gzip": _BINARY,
            "image/png": _BINARY,
        },
    }
}


@router.post(
    "/predict",
    summary="Findings for one head CT scan",
    openapi_extra=_OPENAPI_BODY,
    response_model=PredictResponse,
    # Every code a prediction can answer with, per status, from the catalogue (api/problem_codes.py).
    responses=_OPENAPI_OK | problem_responses(400, 403, 406, 413, 415, 422, 429, 500, 502, 503, 504),
)
async def predict(
    request: Request,
    service: PredictionServiceDep,
    settings: SettingsDep,
    tasks: TasksQuery = None,
    include: IncludeQuery = None,
    series_uid: Annotated[
        str | None,
        Query(max_length=64, description="SeriesInstanceUID to read when the upload holds several series"),
    ] = None,
    priority: PriorityQuery = None,
    priority_header: PriorityHeader = None,
    map_format: FormatQuery = None,
) -> PredictResponse | Response:
    # Before the upload is read: a client that cannot take the answer should not wait for it.
    media_type = negotiate(", ".join(request.headers.getlist("accept")))
    lane = request_lane(request, settings, priority or priority_header)
    extras = split_list(include)
    explain = explain_formats(map_format, extras, media_type)
    handled = await service.handle(
        ScanRequest(
            chunks=request.stream(),
            content_type=request.headers.get("content-type", ""),
            request_id=request.state.request_id,
            started_at=request.state.started_at,
            tasks=split_list(tasks),
            include=extras,
            series_uid=series_uid,
            declared_length=declared_length(request),
            lane=lane,
            evidence=media_type == DICOM_MEDIA_TYPE and map_format is None,
            explain=explain,
        )
    )
    request.state.timings_ms = handled.timings_ms  # for the access log line
    if map_format is not None:
        return map_file(handled, map_format)
    if media_type == FHIR_MEDIA_TYPE:
        report = diagnostic_report(handled.response, study_uid=handled.study_uid, issued=datetime.now(UTC))
        return JSONResponse(report, media_type=FHIR_MEDIA_TYPE)
    if media_type == DICOM_MEDIA_TYPE:
        report_bytes = await asyncio.to_thread(answer_sr, handled)
        if "dicom" in handled.explanations:
            return multipart_related([report_bytes, handled.explanations["dicom"]])
        return Response(report_bytes, media_type=DICOM_MEDIA_TYPE)
    return with_preview(handled)
