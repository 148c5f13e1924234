"""FHIR answers (`api.results.fhir`, ``Accept: application/fhir+json`` on ``POST /v1/predict``): the
DiagnosticReport built from a PredictResponse is valid FHIR (re-parsed by the fhir.resources models), has
one Observation per finding that says what the JSON says, links the study only for DICOM, holds no patient
data and is the same every time; the route negotiates Accept with q-values and answers 406 otherwise.
Triton is faked here (tests/unit/test_gateway.py); tests/integration/test_fhir.py uses the real one."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from fastapi.testclient import TestClient
from fhir.resources.R4B.device import Device
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.observation import Observation
from pydantic import ValidationError

from api.http.negotiation import JSON_MEDIA_TYPE, negotiate
from api.main import create_app
from api.problems import ProblemError
from api.results.fhir import (
    FHIR_MEDIA_TYPE,
    FINDING_SYSTEM,
    INTERPRETATION,
    MODEL_SHA256_SYSTEM,
    SNOMED,
    THRESHOLD_CODE,
    URI_SYSTEM,
    diagnostic_report,
    observation_id,
)
from api.schemas import PredictResponse
from demo.dicom_writer import SYNTHETIC_PATIENT
from tests.hostile.corpus import series, zip_of
from tests.unit.test_gateway import FakeModel, _head_nifti, fake_client

ISSUED = datetime(2024, 5, 6, 7, 8, 9, 123000, tzinfo=UTC)
STUDY_UID = "1.2.826.0.1.3680043.8.498.12345678901234567890"
NOTICE = "SYNTHETIC DEMO MODEL - NOT FOR CLINICAL USE."
FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")


def _response(*findings: tuple[str, float, float], notice: str | None = NOTICE) -> PredictResponse:
    return PredictResponse.model_validate(
        {
            "request_id": "0d9c4e0a6f6b4d7f9a1c2b3e4f5a6b7c",
            "model": {"name": "fmhct", "version": "fmhct-synthetic-demo-1", "sha256": "3f1c" * 16},
            "findings": [
                {"name": name, "probability": p, "threshold": t, "positive": p >= t}
                for name, p, t in findings or (("hemorrhage", 0.9731, 0.5), ("edema", 0.0412, 0.3))
            ],
            "input": {"shape": [230, 230, 45], "spacing_mm": [0.9, 0.9, 4.0], "source_format": "dicom"},
            "timings_ms": {"decode": 1, "validate": 1, "preprocess": 1, "queue": 0, "infer": 1, "total": 4},
            "notice": notice,
        }
    )


@pytest.fixture
def response() -> PredictResponse:
    return _response()


def _observations(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["id"]: item for item in report["contained"] if item["resourceType"] == "Observation"}


def _keys(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from _keys(item)
    elif isinstance(value, list):
        for item in value:
            yield from _keys(item)


# --- the report -------------------------------------------------------------------------------------------


def test_the_report_is_valid_fhir_and_round_trips(response: PredictResponse) -> None:
    report = diagnostic_report(response, study_uid=STUDY_UID, issued=ISSUED)
    json.dumps(report)  # JSON-ready as returned
    parsed = DiagnosticReport.model_validate(report)
    assert parsed.model_dump(mode="json") == report
    assert next(iter(report)) == "resourceType" and report["resourceType"] == "DiagnosticReport"
    assert (report["status"], report["issued"]) == ("final", "2024-05-06T07:08:09.123000Z")
    assert report["category"][0]["coding"][0]["code"] == "RAD"
    (loinc,) = report["code"]["coding"]
    assert loinc == {"system": "http://loinc.org", "code": "24725-4", "display": "CT Head"}
    assert report["identifier"][0]["value"] == response.request_id
    kinds = [type(resource) for resource in parsed.contained or []]
    assert kinds == [Device, Observation, Observation]


def test_one_observation_per_finding_says_what_the_json_says(response: PredictResponse) -> None:
    report = diagnostic_report(response, study_uid=None, issued=ISSUED)
    observations = _observations(report)
    assert list(observations) == ["obs-hemorrhage", "obs-edema"]
    assert [reference["reference"] for reference in report["result"]] == ["#obs-hemorrhage", "#obs-edema"]
    for finding in response.findings:
        observation = observations[observation_id(finding.name)]
        Observation.model_validate(observation)
        assert observation["status"] == "final" and observation["issued"] == report["issued"]
        codes = {(c["system"], c["code"]) for c in observation["code"]["coding"]}
        assert (FINDING_SYSTEM, finding.name) in codes
        assert observation["valueQuantity"] == {
            "value": finding.probability,
            "unit": "1",
            "system": "http://unitsofmeasure.org",
            "code": "1",
        }
        (interpretation,) = observation["interpretation"][0]["coding"]
        assert interpretation["system"] == INTERPRETATION
        assert interpretation["code"] == ("POS" if finding.positive else "NEG")
        (component,) = observation["component"]
        assert component["code"]["coding"][0]["code"] == THRESHOLD_CODE
        assert component["valueQuantity"]["value"] == finding.threshold
        assert observation["device"] == {"reference": "#device"}
    hemorrhage, edema = observations["obs-hemorrhage"], observations["obs-edema"]
    assert (SNOMED, "1386000") in {(c["system"], c["code"]) for c in hemorrhage["code"]["coding"]}
    assert (SNOMED, "2032001") in {(c["system"], c["code"]) for c in edema["code"]["coding"]}
    assert "hemorrhage (probability 0.97, threshold 0.50)" in report["conclusion"]
    assert "edema" not in report["conclusion"]


def test_a_finding_without_a_known_concept_carries_our_code_alone() -> None:
    report = diagnostic_report(_response(("midline_shift", 0.2, 0.5)), study_uid=None, issued=ISSUED)
    (observation,) = _observations(report).values()
    assert observation["code"]["coding"] == [
        {"system": FINDING_SYSTEM, "code": "midline_shift", "display": "midline_shift"}
    ]
    assert report["conclusion"] == f"{NOTICE} No finding at or above its threshold (midline_shift)."


def test_probabilities_read_back_as_the_same_floats() -> None:
    probabilities = [0.1 + 0.2, 1e-7, 0.999999940395355, 0.0, 1.0]
    response = _response(*((f"t{k}", p, 0.5) for k, p in enumerate(probabilities)))
    text = json.dumps(diagnostic_report(response, study_uid=None, issued=ISSUED))
    values = [o["valueQuantity"]["value"] for o in _observations(json.loads(text)).values()]
    assert values == probabilities


def test_the_study_is_linked_for_dicom_only(response: PredictResponse) -> None:
    linked = diagnostic_report(response, study_uid=STUDY_UID, issued=ISSUED)
    assert linked["imagingStudy"] == [
        {"type": "ImagingStudy", "identifier": {"system": URI_SYSTEM, "value": f"urn:oid:{STUDY_UID}"}}
    ]
    for study_uid in (None, "", "1.2.3 4", "not-a-uid"):  # NIfTI / NRRD, or no usable UID in the headers
        assert "imagingStudy" not in diagnostic_report(response, study_uid=study_uid, issued=ISSUED)


def test_no_patient_data_anywhere(response: PredictResponse) -> None:
    report = diagnostic_report(response, study_uid=STUDY_UID, issued=ISSUED)
    keys = set(_keys(report))
    assert not keys & {"subject", "patient", "encounter", "specimen", "performer", "basedOn"}
    assert {item["resourceType"] for item in report["contained"]} == {"Device", "Observation"}


def test_the_device_is_the_model_and_says_it_is_a_demo(response: PredictResponse) -> None:
    report = diagnostic_report(response, study_uid=None, issued=ISSUED)
    device = report["contained"][0]
    assert device["id"] == "device"
    assert device["deviceName"] == [{"name": "fmhct", "type": "model-name"}]
    assert device["version"] == [{"value": "fmhct-synthetic-demo-1"}]
    assert device["identifier"] == [{"system": MODEL_SHA256_SYSTEM, "value": "3f1c" * 16}]
    assert device["note"] == [{"text": NOTICE}]
    assert report["conclusion"].startswith(NOTICE)
    real = diagnostic_report(_response(notice=None), study_uid=None, issued=ISSUED)
    assert "note" not in real["contained"][0]
    assert real["conclusion"] == "Positive: hemorrhage (probability 0.97, threshold 0.50)."


def test_the_report_is_deterministic(response: PredictResponse) -> None:
    first = diagnostic_report(response, study_uid=STUDY_UID, issued=ISSUED)
    again = diagnostic_report(response.model_copy(deep=True), study_uid=STUDY_UID, issued=ISSUED)
    assert json.dumps(first) == json.dumps(again)


def test_any_finding_name_gets_a_valid_unique_id() -> None:
    names = ["hemorrhage", "a b", "a/b", "a:b", "ä", "x" * 100, "x" * 101, "ich.v2-final"]
    ids = [observation_id(name) for name in names]
    assert all(FHIR_ID.fullmatch(id_) for id_ in ids), ids
    assert len(set(ids)) == len(ids)
    assert ids[0] == "obs-hemorrhage" and ids[-1] == "obs-ich.v2-final"
    report = diagnostic_report(
        _response(*((name, 0.5, 0.5) for name in [*names, "two  spaces"])), study_uid=None, issued=ISSUED
    )
    DiagnosticReport.model_validate(report)


def test_issued_must_carry_a_timezone(response: PredictResponse) -> None:
    with pytest.raises(ValidationError, match="timezone"):
        diagnostic_report(response, study_uid=None, issued=datetime(2024, 5, 6, 7, 8, 9))


# --- content negotiation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        (None, JSON_MEDIA_TYPE),
        ("", JSON_MEDIA_TYPE),
        ("*/*", JSON_MEDIA_TYPE),
        ("application/*", JSON_MEDIA_TYPE),
        ("application/json", JSON_MEDIA_TYPE),
        ("application/fhir+json, application/json", JSON_MEDIA_TYPE),  # a tie: today's answer
        ("application/fhir+json;q=0.5, application/json", JSON_MEDIA_TYPE),
        ("nonsense", JSON_MEDIA_TYPE),  # nothing well-formed: as if absent
        ("application/fhir+json;q=x, application/json;q=0.1", JSON_MEDIA_TYPE),
        ("application/fhir+json", FHIR_MEDIA_TYPE),
        ("Application/FHIR+JSON", FHIR_MEDIA_TYPE),
        ("application/fhir+json; fhirVersion=4.0", FHIR_MEDIA_TYPE),
        ("application/fhir+json, */*", FHIR_MEDIA_TYPE),  # named beats matched by a wildcard
        ("application/fhir+json, application/*;q=0.8", FHIR_MEDIA_TYPE),
        ("application/json;q=0.5, application/fhir+json", FHIR_MEDIA_TYPE),
        ("application/json;q=0, application/fhir+json;q=0.1", FHIR_MEDIA_TYPE),
        ("text/html, application/fhir+json;q=0.9", FHIR_MEDIA_TYPE),
    ],
)
def test_negotiate(accept: str | None, expected: str) -> None:
    assert negotiate(accept) == expected


@pytest.mark.parametrize(
    "accept", ["image/png", "text/*", "application/json;q=0", "*/*;q=0", "application/problem+json"]
)
def test_negotiate_refuses_what_allows_neither(accept: str) -> None:
    with pytest.raises(ProblemError) as raised:
        negotiate(accept)
    error = raised.value
    assert (error.status, error.code) == (406, "not_acceptable")
    assert (error.field, error.observed) == ("Accept", accept)


# --- the route, Triton faked --------------------------------------------------------------------------


@pytest.fixture
def fake() -> FakeModel:
    return FakeModel()


@pytest.fixture
def client(fake: FakeModel) -> Iterator[TestClient]:
    with fake_client(fake, max_upload_bytes=8 << 20) as test_client:
        yield test_client


def test_the_route_answers_fhir_when_asked(client: TestClient) -> None:
    body = _head_nifti()
    plain = client.post("/v1/predict", content=body)
    assert plain.status_code == 200 and plain.headers["content-type"] == JSON_MEDIA_TYPE
    answer = client.post("/v1/predict", content=body, headers={"Accept": FHIR_MEDIA_TYPE})
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == FHIR_MEDIA_TYPE and answer.headers["x-request-id"]
    report = answer.json()
    DiagnosticReport.model_validate(report)
    assert "imagingStudy" not in report  # NIfTI
    assert report["identifier"][0]["value"] == answer.headers["x-request-id"]
    probabilities = {f["name"]: f["probability"] for f in plain.json()["findings"]}
    observations = _observations(report)
    assert {name: observations[f"obs-{name}"]["valueQuantity"]["value"] for name in probabilities} == (
        probabilities
    )


def test_the_route_links_a_dicom_study_and_copies_no_patient_data(client: TestClient) -> None:
    datasets = series("fhir")
    answer = client.post(
        "/v1/predict",
        content=zip_of(datasets),
        headers={"Content-Type": "application/zip", "Accept": "application/fhir+json, */*;q=0.1"},
    )
    assert answer.status_code == 200, answer.text
    report = answer.json()
    (link,) = report["imagingStudy"]
    assert link["identifier"]["value"] == f"urn:oid:{datasets[0].StudyInstanceUID}"
    for value in SYNTHETIC_PATIENT.values():
        assert value not in answer.text
    assert str(datasets[0].SeriesInstanceUID) not in answer.text


def test_the_route_refuses_an_unacceptable_answer_before_reading_the_scan(
    client: TestClient, fake: FakeModel
) -> None:
    answer = client.post("/v1/predict", content=_head_nifti(), headers={"Accept": "image/png"})
    assert answer.status_code == 406
    assert answer.headers["content-type"] == "application/problem+json"
    assert answer.json()["code"] == "not_acceptable" and answer.json()["field"] == "Accept"
    assert fake.images == []


def test_openapi_documents_the_fhir_answer_and_406() -> None:
    responses = create_app().openapi()["paths"]["/v1/predict"]["post"]["responses"]
    assert set(responses["200"]["content"]) == {
        JSON_MEDIA_TYPE,
        FHIR_MEDIA_TYPE,
        "application/dicom",
        "multipart/related",  # the SR and the Parametric Map (include=attention)
        "application/gzip",  # format=nifti
        "image/png",  # format=png
    }
    assert "$ref" in responses["200"]["content"][JSON_MEDIA_TYPE]["schema"]
    assert "`not_acceptable`" in responses["406"]["description"]
