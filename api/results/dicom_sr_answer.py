"""The gateway's answer (`HandledRequest`) as a DICOM SR: maps the JSON answer onto the dataclasses of
`api.results.dicom_sr` (which stays independent of the gateway's schemas). Used by `POST /v1/predict`
(`Accept: application/dicom`) and by `POST /v1/studies/{study_uid}/predict` (the SR it stores)."""

from __future__ import annotations

import io
from datetime import UTC, datetime

import pydicom

from api.inference.service import HandledRequest
from api.problem_codes import ProblemCode
from api.problems import ProblemError
from api.results.dicom_sr import DICOM_MEDIA_TYPE, Algorithm, FindingResult, structured_report
from api.results.fhir import FHIR_MEDIA_TYPE


def answer_report(handled: HandledRequest) -> pydicom.Dataset:
    """The answer as a DICOM Comprehensive 3D SR (TID 1500) in the source study. Only a DICOM upload
    has the patient and study to file it under: any other is 406 ``not_acceptable``. (~0.4 s of CPU for
    300 slices: call it in a thread.)"""
    if not handled.evidence:
        raise ProblemError(
            ProblemCode.NOT_ACCEPTABLE,
            "a DICOM SR answer needs a DICOM upload (its patient and study); ask for JSON or FHIR",
            field="Accept",
            observed=DICOM_MEDIA_TYPE,
            expected=["application/json", FHIR_MEDIA_TYPE],
        )
    answer = handled.response
    findings = [
        FindingResult(name=f.name, probability=f.probability, threshold=f.threshold, positive=f.positive)
        for f in answer.findings
    ]
    algorithm = Algorithm(
        name=answer.model.name,
        version=answer.model.version,
        model_sha256=answer.model.sha256,
        synthetic_demo=answer.notice is not None,
    )
    return structured_report(handled.evidence, findings, algorithm, now=datetime.now(UTC))


def part10_bytes(report: pydicom.Dataset) -> bytes:
    """`report` as a DICOM Part 10 file."""
    buffer = io.BytesIO()
    report.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def answer_sr(handled: HandledRequest) -> bytes:
    """`answer_report` as Part 10 bytes: the `Accept: application/dicom` answer."""
    return part10_bytes(answer_report(handled))
