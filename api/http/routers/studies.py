"""`POST /v1/studies/{study_uid}/predict`: the PACS round trip. The gateway reads the study from the
configured DICOMweb server (QIDO-RS + WADO-RS, api/dicomweb/), predicts exactly as `POST /v1/predict`
does for a zip of the same instances, and with `store=true` stores the DICOM SR answer back into the
study (STOW-RS)."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path as FilePath
from typing import Annotated, Any

import pydicom
from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import JSONResponse, Response

from api.dicomweb import DicomwebConfig, PacsClient
from api.http.dependencies import PredictionServiceDep, SettingsDep
from api.http.map_answers import explain_formats, multipart_related, with_preview
from api.http.negotiation import negotiate
from api.http.params import IncludeQuery, PriorityHeader, PriorityQuery, TasksQuery, request_lane, split_list
from api.inference.service import ScanRequest
from api.problem_codes import ProblemCode
from api.problems import problem_responses
from api.results.dicom_sr import DICOM_MEDIA_TYPE
from api.results.dicom_sr_answer import answer_report, part10_bytes
from api.results.fhir import FHIR_MEDIA_TYPE, diagnostic_report
from api.schemas import StoredInstance, StudyPredictResponse

router = APIRouter(prefix="/v1", tags=["studies"])

#: A DICOM UID (PS3.5 9.1): dot-separated numbers, at most 64 characters.
UID_PATTERN = r"^[0-9]+(\.[0-9]+)*$"
ZIP_MEDIA_TYPE = "application/zip"
_CHUNK = 4 << 20

_BINARY: dict[str, Any] = {"schema": {"type": "string", "format": "binary"}}
_OPENAPI_OK: dict[int | str, dict[str, Any]] = {
    200: {
        "description": (
            "The findings for the study's CT series: JSON (`StudyPredictResponse`, with `stored` listing "
            "what `store=true` stored), or with `Accept: application/fhir+json` a FHIR R4 "
            "DiagnosticReport, or with `Accept: application/dicom` the DICOM Comprehensive 3D SR "
            "(TID 1500) in the study (with `include=attention`: `multipart/related` SR + Parametric Map)."
        ),
        "content": {
            FHIR_MEDIA_TYPE: {
                "schema": {
                    "type": "object",
                    "description": "FHIR R4 DiagnosticReport",
                    "required": ["resourceType", "status", "code"],
                    "properties": {"resourceType": {"type": "string", "enum": ["DiagnosticReport"]}},
                }
            },
            DICOM_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}},
            "multipart/related": _BINARY,
        },
    }
}


async def _file_chunks(path: FilePath) -> AsyncIterator[bytes]:
    with path.open("rb") as handle:
        while chunk := await asyncio.to_thread(handle.read, _CHUNK):
            yield chunk


@router.post(
    "/studies/{study_uid}/predict",
    summary="Findings for a study in the PACS, optionally stored back as a DICOM SR (and Parametric Map)",
    response_model=StudyPredictResponse,
    responses=_OPENAPI_OK
    | problem_responses(400, 403, ProblemCode.STUDY_NOT_FOUND, 406, 413, 415, 422, 429, 500, 502, 503, 504),
)
async def predict_study(
    request: Request,
    service: PredictionServiceDep,
    settings: SettingsDep,
    study_uid: Annotated[
        str, Path(max_length=64, pattern=UID_PATTERN, description="StudyInstanceUID of the study in the PACS")
    ],
    store: Annotated[
        bool,
        Query(
            description="store the answer as a DICOM SR into the study (STOW-RS); with "
            "`include=attention` also the maps as a DICOM Parametric Map"
        ),
    ] = False,
    tasks: TasksQuery = None,
    include: IncludeQuery = None,
    series_uid: Annotated[
        str | None,
        Query(
            max_length=64,
            pattern=UID_PATTERN,
            description="SeriesInstanceUID to read; default: the study's CT series (the usual selection)",
        ),
    ] = None,
    priority: PriorityQuery = None,
    priority_header: PriorityHeader = None,
) -> StudyPredictResponse | Response:
    media_type = negotiate(", ".join(request.headers.getlist("accept")))
    lane = request_lane(request, settings, priority or priority_header)
    extras = split_list(include)
    pacs = PacsClient(DicomwebConfig.from_settings(settings))  # 503 pacs_not_configured

    started = time.perf_counter()
    retrieved = await pacs.fetch_study(
        study_uid,
        series_uid=series_uid,
        directory=settings.spool_dir,
        max_bytes=settings.max_upload_bytes,
        max_instances=settings.max_archive_members,
    )
    pacs_ms = {"pacs_retrieve": round((time.perf_counter() - started) * 1000.0, 3)}
    try:
        handled = await service.handle(
            ScanRequest(
                chunks=_file_chunks(retrieved.path),
                content_type=ZIP_MEDIA_TYPE,
                request_id=request.state.request_id,
                started_at=request.state.started_at,
                tasks=split_list(tasks),
                include=extras,
                series_uid=series_uid,
                declared_length=retrieved.size_bytes,
                spool_prefix="headct-pacs-upload-",
                lane=lane,
                evidence=store or media_type == DICOM_MEDIA_TYPE,
                explain=explain_formats(None, extras, media_type, store=store),
            )
        )
    finally:
        retrieved.path.unlink(missing_ok=True)

    report: pydicom.Dataset | None = None
    stored: list[StoredInstance] = []
    if store or media_type == DICOM_MEDIA_TYPE:
        report = await asyncio.to_thread(answer_report, handled)
    parametric_map = handled.explanations.get("dicom")
    if store and report is not None:
        started = time.perf_counter()
        objects = [report]
        if parametric_map is not None:
            objects.append(await asyncio.to_thread(pydicom.dcmread, io.BytesIO(parametric_map)))
        stored = await _store(pacs, study_uid, objects)
        pacs_ms["pacs_store"] = round((time.perf_counter() - started) * 1000.0, 3)
    request.state.timings_ms = {**handled.timings_ms, **pacs_ms}  # for the access log line

    if media_type == FHIR_MEDIA_TYPE:
        fhir = diagnostic_report(handled.response, study_uid=handled.study_uid, issued=datetime.now(UTC))
        return JSONResponse(fhir, media_type=FHIR_MEDIA_TYPE)
    if media_type == DICOM_MEDIA_TYPE and report is not None:
        report_bytes = await asyncio.to_thread(part10_bytes, report)
        if parametric_map is not None:
            return multipart_related([report_bytes, parametric_map])
        return Response(report_bytes, media_type=DICOM_MEDIA_TYPE)
    return StudyPredictResponse(**dict(with_preview(handled)), stored=stored)


async def _store(pacs: PacsClient, study_uid: str, objects: list[pydicom.Dataset]) -> list[StoredInstance]:
    """STOW-RS of the answer's objects (the SR, then the Parametric Map) into the study."""
    stored = []
    for dataset in objects:
        result = await pacs.store(study_uid, dataset)
        stored.append(
            StoredInstance(
                sop_class_uid=result.sop_class_uid,
                sop_instance_uid=result.sop_instance_uid,
                series_instance_uid=result.series_instance_uid,
            )
        )
    return stored
