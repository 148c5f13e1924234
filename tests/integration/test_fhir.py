"""FHIR answers against the session stack (the real gateway + the real Triton): the same scan asked for
as JSON and as ``application/fhir+json`` gives a DiagnosticReport that fhir.resources parses, whose
Observations carry the JSON answer's probabilities, linked to the DICOM series' study (not for NIfTI);
an Accept that allows neither answer type is 406. The report's details: tests/unit/test_fhir.py."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.observation import Observation

from demo.dicom_writer import SYNTHETIC_PATIENT, ct_series, zip_bytes
from demo.synthetic_head import make_head, to_nifti

pytestmark = pytest.mark.integration

FHIR = "application/fhir+json"


def _head() -> np.random.Generator:
    return np.random.default_rng(7)


@pytest.fixture(scope="module")
def nifti() -> bytes:
    return to_nifti(make_head(_head(), hemorrhage=True, edema=False)).to_bytes()


@pytest.fixture(scope="module")
def dicom_series() -> tuple[bytes, str]:
    """The synthetic head as a zipped DICOM series (3 mm slices: a small upload), and its study UID."""
    volume = make_head(_head(), hemorrhage=True, edema=False, spacing_mm=(1.0, 1.0, 3.0))
    datasets = ct_series(volume.with_hu(np.rint(volume.hu)), seed="fhir")
    return zip_bytes(datasets), str(datasets[0].StudyInstanceUID)


def _both(client: httpx.Client, body: bytes, content_type: str) -> tuple[httpx.Response, httpx.Response]:
    """The plain JSON answer and the FHIR answer for the same upload."""
    plain = client.post("/v1/predict", content=body, headers={"Content-Type": content_type})
    fhir = client.post("/v1/predict", content=body, headers={"Content-Type": content_type, "Accept": FHIR})
    assert plain.status_code == 200, plain.text
    assert fhir.status_code == 200, fhir.text
    assert plain.headers["content-type"] == "application/json"
    assert fhir.headers["content-type"] == FHIR
    return plain, fhir


def _check_observations(plain: httpx.Response, report: DiagnosticReport) -> None:
    findings = {f["name"]: f for f in plain.json()["findings"]}
    observations = [item for item in report.contained or [] if isinstance(item, Observation)]
    assert [reference.reference for reference in report.result or []] == [f"#{o.id}" for o in observations]
    assert len(observations) == len(findings)
    for observation in observations:
        name = observation.code.text
        assert name in findings and observation.id == f"obs-{name}"
        assert observation.valueQuantity is not None and observation.valueQuantity.value is not None
        probability = float(observation.valueQuantity.value)
        assert probability == pytest.approx(findings[name]["probability"], abs=1e-6)
        (interpretation,) = observation.interpretation or []
        assert interpretation.coding is not None
        assert interpretation.coding[0].code == ("POS" if findings[name]["positive"] else "NEG")
        (threshold,) = observation.component or []
        assert threshold.valueQuantity is not None and threshold.valueQuantity.value is not None
        assert float(threshold.valueQuantity.value) == findings[name]["threshold"]


def test_nifti_as_fhir(client: httpx.Client, nifti: bytes) -> None:
    plain, fhir = _both(client, nifti, "application/octet-stream")
    report = DiagnosticReport.model_validate(fhir.json())
    assert report.status == "final" and report.imagingStudy is None and report.subject is None
    _check_observations(plain, report)


def test_dicom_as_fhir_links_the_study(client: httpx.Client, dicom_series: tuple[bytes, str]) -> None:
    body, study_uid = dicom_series
    plain, fhir = _both(client, body, "application/zip")
    report = DiagnosticReport.model_validate(fhir.json())
    (link,) = report.imagingStudy or []
    assert link.type == "ImagingStudy" and link.identifier is not None
    assert (link.identifier.system, link.identifier.value) == ("urn:ietf:rfc:3986", f"urn:oid:{study_uid}")
    assert report.subject is None
    for value in SYNTHETIC_PATIENT.values():  # in every header of the upload, never in the answer
        assert value not in fhir.text
    _check_observations(plain, report)


def test_an_unacceptable_answer_is_406(client: httpx.Client, nifti: bytes) -> None:
    response = client.post(
        "/v1/predict",
        content=nifti,
        headers={"Content-Type": "application/octet-stream", "Accept": "image/png"},
    )
    assert response.status_code == 406, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["code"] == "not_acceptable"
    assert response.headers["x-request-id"]
