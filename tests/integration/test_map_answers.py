"""The explanation maps on the caller's own grid, through the real gateway and Triton: `format=nifti`
(a NIfTI in the upload's affine whose maxima sit where the 8x8x8 maps are hottest), `format=png`,
`include=preview`, and `include=attention` with `Accept: application/dicom` (the SR and a Parametric
Map that dciodvfy accepts, in the source study)."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image

from headct.explain import read_attention_nifti
from tests.integration.test_fhir import dicom_series, nifti  # noqa: F401  (module fixtures)
from tests.unit.test_dicom_sr import dciodvfy

pytestmark = pytest.mark.integration

PARAMETRIC_MAP_STORAGE = "1.2.840.10008.5.1.4.1.1.30"


def _post(client: httpx.Client, body: bytes, content_type: str, **params: str) -> httpx.Response:
    response = client.post("/v1/predict", content=body, params=params, headers={"Content-Type": content_type})
    assert response.status_code == 200, response.text
    return response


def test_format_nifti_gives_the_maps_in_the_uploads_grid(
    client: httpx.Client,
    nifti: bytes,  # noqa: F811
    tmp_path: Path,
) -> None:
    answer = _post(client, nifti, "application/octet-stream", format="nifti")
    assert answer.headers["content-type"] == "application/gzip"
    assert "attention.nii.gz" in answer.headers["content-disposition"]
    maps, affine = read_attention_nifti(answer.content)
    source = tmp_path / "scan.nii"
    source.write_bytes(nifti)
    image = nib.load(source)
    np.testing.assert_allclose(affine, image.affine, atol=1e-3)
    plain = _post(client, nifti, "application/octet-stream", include="attention").json()
    assert list(maps) == list(plain["attention"])
    for task, volume in maps.items():
        assert volume.shape == image.shape
        assert volume.max() > 0 and volume.min() >= 0
        # Trilinear between patch-cell centres: never above the hottest cell, close to it near its centre.
        grid = np.asarray(plain["attention"][task]["values"]).reshape(8, 8, 8)
        assert 0.5 * grid.max() <= volume.max() <= grid.max() * (1 + 1e-5)


def test_format_png_and_include_preview(client: httpx.Client, nifti: bytes) -> None:  # noqa: F811
    png = _post(client, nifti, "application/octet-stream", format="png")
    assert png.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(png.content)).format == "PNG"
    body = _post(client, nifti, "application/octet-stream", include="preview").json()
    assert body["preview"]["media_type"] == "image/png" and "attention" not in body
    assert Image.open(io.BytesIO(base64.b64decode(body["preview"]["data_base64"]))).format == "PNG"
    assert "preview" not in _post(client, nifti, "application/octet-stream").json()


def test_dicom_answer_with_attention_is_the_sr_and_a_parametric_map(
    client: httpx.Client,
    dicom_series: tuple[bytes, str],  # noqa: F811
    tmp_path: Path,
) -> None:
    body, study_uid = dicom_series
    answer = client.post(
        "/v1/predict",
        content=body,
        params={"include": "attention"},
        headers={"Content-Type": "application/zip", "Accept": "application/dicom"},
    )
    assert answer.status_code == 200, answer.text
    content_type = answer.headers["content-type"]
    assert content_type.startswith("multipart/related") and 'type="application/dicom"' in content_type
    boundary = re.search(r"boundary=([^;]+)", content_type)
    assert boundary is not None
    parts = [
        part.split(b"\r\n\r\n", 1)[1].rstrip(b"\r\n")
        for part in answer.content.split(b"--" + boundary.group(1).encode())[1:-1]
    ]
    datasets = [pydicom.dcmread(io.BytesIO(part)) for part in parts]
    assert len(datasets) == 2 and datasets[0].Modality == "SR"
    pm = datasets[1]
    assert pm.SOPClassUID == PARAMETRIC_MAP_STORAGE and pm.StudyInstanceUID == study_uid
    path = tmp_path / "pm.dcm"
    path.write_bytes(parts[1])
    errors, _ = dciodvfy(path)
    assert errors == []


def test_an_unknown_format_is_refused_with_a_code(client: httpx.Client, nifti: bytes) -> None:  # noqa: F811
    answer = client.post(
        "/v1/predict",
        content=nifti,
        params={"format": "gif"},
        headers={"Content-Type": "application/octet-stream"},
    )
    assert answer.status_code == 400 and answer.headers["content-type"].startswith("application/problem+json")
    assert answer.json()["code"] == "invalid_request"


def test_a_parametric_map_needs_a_dicom_upload(client: httpx.Client, nifti: bytes) -> None:  # noqa: F811
    answer = client.post(
        "/v1/predict",
        content=nifti,
        params={"include": "attention"},
        headers={"Content-Type": "application/octet-stream", "Accept": "application/dicom"},
    )
    assert answer.status_code == 406 and answer.json()["code"] == "not_acceptable"
