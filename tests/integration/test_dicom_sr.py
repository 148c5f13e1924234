"""`Accept: application/dicom` through the real gateway and Triton: a DICOM upload is answered with a
Comprehensive 3D SR (TID 1500) in its study that dciodvfy accepts and whose content equals the JSON
answer; a NIfTI upload cannot be answered in DICOM (406)."""

from __future__ import annotations

import io
from pathlib import Path

import highdicom as hd
import httpx
import pydicom
import pytest

from tests.integration.test_fhir import dicom_series, nifti  # noqa: F401  (module fixtures)
from tests.unit.test_dicom_sr import dciodvfy

pytestmark = pytest.mark.integration

DICOM = "application/dicom"


def test_a_dicom_upload_is_answered_with_a_valid_sr_in_its_study(
    client: httpx.Client,
    dicom_series: tuple[bytes, str],  # noqa: F811
    tmp_path: Path,
) -> None:
    body, study_uid = dicom_series
    plain = client.post("/v1/predict", content=body, headers={"Content-Type": "application/zip"})
    answer = client.post(
        "/v1/predict", content=body, headers={"Content-Type": "application/zip", "Accept": DICOM}
    )
    assert plain.status_code == 200 and answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == DICOM
    path = tmp_path / "answer.dcm"
    path.write_bytes(answer.content)
    errors, _ = dciodvfy(path)
    assert errors == []
    sr = hd.sr.srread(io.BytesIO(answer.content))
    assert sr.StudyInstanceUID == study_uid and sr.Modality == "SR"
    expected = sorted(round(f["probability"], 6) for f in plain.json()["findings"])
    found = _probabilities(pydicom.dcmread(io.BytesIO(answer.content)))
    assert sorted(round(value, 6) for value in found) == expected


def test_a_nifti_upload_cannot_be_answered_in_dicom(client: httpx.Client, nifti: bytes) -> None:  # noqa: F811
    response = client.post(
        "/v1/predict", content=nifti, headers={"Content-Type": "application/octet-stream", "Accept": DICOM}
    )
    assert response.status_code == 406, response.text
    assert response.json()["code"] == "not_acceptable"


def _content_items(dataset: pydicom.Dataset) -> list[pydicom.Dataset]:
    items = []
    for item in dataset.get("ContentSequence", []):
        items.append(item)
        items.extend(_content_items(item))
    return items


def _probabilities(dataset: pydicom.Dataset) -> list[float]:
    return [
        float(item.MeasuredValueSequence[0].NumericValue)
        for item in _content_items(dataset)
        if item.ValueType == "NUM" and str(item.ConceptNameCodeSequence[0].CodeMeaning) == "Probability"
    ]
