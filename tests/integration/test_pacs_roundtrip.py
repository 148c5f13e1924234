"""The PACS round trip against REAL parts: Orthanc with its DICOMweb plugin (tests/orthanc.py, HTTP basic
auth on), the real gateway (`python -m api`) and the session's real Triton.

A synthetic head series is STOWed into Orthanc; `POST /v1/studies/{uid}/predict?store=true` answers the
findings `POST /v1/predict` gives for the same series, and stores a DICOM SR into the study that QIDO-RS
finds (Modality SR) and whose content (probability, Present / Absent per finding) is the JSON answer.
The failures: unknown study 404 ``study_not_found``; a closed port 502 ``pacs_unreachable``; a PACS that
accepts connections and never answers 504 ``pacs_timeout``; wrong credentials 502 ``pacs_auth_failed``;
no PACS configured 503 ``pacs_not_configured`` (the session gateway).

Round-trip times (store=true) for a 5 mm and a 1 mm series are printed (`-s` shows them) and written to
the test's tmp folder as pacs_roundtrip.json."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import httpx
import numpy as np
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient

from api.dicomweb import DicomwebConfig, PacsClient
from api.problems import ProblemError
from api.results import dicom_sr
from demo.dicom_writer import SYNTHETIC_PATIENT, ct_series, zip_bytes
from demo.synthetic_head import make_head
from headct.local.triton import LocalTriton
from tests.orthanc import PASSWORD, USERNAME, LocalOrthanc, running_orthanc
from tests.stack import LocalGateway, free_port, running_gateway

pytestmark = pytest.mark.integration

TIMEOUT_S = 300.0
PARAMETRIC_MAP_STORAGE = "1.2.840.10008.5.1.4.1.1.30"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
UNKNOWN_STUDY = "1.2.826.0.1.3680043.8.498.999999999"
#: The studies the round trips stored, for the log check at the end.
_STUDIES: list[str] = []


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalOrthanc]:
    try:
        with running_orthanc(tmp_path_factory.mktemp("orthanc")) as server:
            yield server
    except FileNotFoundError as missing:
        pytest.fail(str(missing))


def _pacs(orthanc: LocalOrthanc) -> DICOMwebClient:
    session = requests.Session()
    session.auth = (USERNAME, PASSWORD)
    return DICOMwebClient(orthanc.dicomweb_url, session=session)


def _series(spacing_mm: float, seed: str) -> list[pydicom.Dataset]:
    volume = make_head(
        np.random.default_rng(7), hemorrhage=True, edema=False, spacing_mm=(1.0, 1.0, spacing_mm)
    )
    return ct_series(volume.with_hu(np.rint(volume.hu)), seed=seed, description=f"HEAD {spacing_mm:g}mm")


def _stow(orthanc: LocalOrthanc, datasets: list[pydicom.Dataset]) -> None:
    """STOW-RS as a modality would: Part 10 files (dicomweb-client writes what pydicom writes, and pydicom 3
    leaves the preamble and "DICM" out of a dataset without `preamble`)."""
    for dataset in datasets:
        dataset.preamble = b"\0" * 128
    pacs = _pacs(orthanc)
    for start in range(0, len(datasets), 50):
        pacs.store_instances(datasets[start : start + 50])


@pytest.fixture(scope="module")
def pacs_gateway(
    triton: LocalTriton, orthanc: LocalOrthanc, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalGateway]:
    log = tmp_path_factory.mktemp("pacs-gateway") / "gateway.log"
    with running_gateway(
        triton,
        log,
        HEADCT_DICOMWEB_URL=orthanc.dicomweb_url,
        HEADCT_DICOMWEB_USERNAME=USERNAME,
        HEADCT_DICOMWEB_PASSWORD=PASSWORD,
        HEADCT_DICOMWEB_TIMEOUT_S="60",
        HEADCT_MAX_UPLOAD_BYTES=str(512 << 20),
        HEADCT_REQUEST_TIMEOUT_S="240",
    ) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def pacs_client(pacs_gateway: LocalGateway) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=pacs_gateway.url, timeout=TIMEOUT_S) as session:
        yield session


def _check_sr(sr_bytes: bytes, study_uid: str, answer: dict[str, object]) -> None:
    """The stored SR: in the study, one group per finding with the JSON answer's probability and
    Present / Absent."""
    sr = hd.sr.srread(io.BytesIO(sr_bytes))
    assert isinstance(sr, hd.sr.Comprehensive3DSR)
    assert sr.StudyInstanceUID == study_uid and sr.Modality == "SR"
    assert sr.PatientName == SYNTHETIC_PATIENT["PatientName"]
    content = sr.content
    assert isinstance(content, hd.sr.MeasurementReport)
    groups = {group.tracking_identifier: group for group in content.get_image_measurement_groups()}
    findings = answer["findings"]
    assert isinstance(findings, list)
    assert sorted(groups) == sorted(f["name"] for f in findings)
    for finding in findings:
        group = groups[finding["name"]]
        (probability,) = group.get_measurements(name=dicom_sr.PROBABILITY)
        assert float(probability.value) == pytest.approx(finding["probability"], abs=1e-9)
        (evaluation,) = group.get_qualitative_evaluations()
        assert evaluation.value == (dicom_sr.PRESENT if finding["positive"] else dicom_sr.ABSENT)


@pytest.mark.parametrize("spacing_mm", [5.0, 1.0], ids=["5mm", "1mm"])
def test_round_trip_stores_the_answer_in_the_study(
    orthanc: LocalOrthanc,
    pacs_client: httpx.Client,
    spacing_mm: float,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    datasets = _series(spacing_mm, seed=f"pacs-{spacing_mm:g}")
    study_uid = str(datasets[0].StudyInstanceUID)
    _STUDIES.append(study_uid)
    _stow(orthanc, datasets)
    plain = pacs_client.post(
        "/v1/predict", content=zip_bytes(datasets), headers={"Content-Type": "application/zip"}
    )
    assert plain.status_code == 200, plain.text

    started = time.perf_counter()
    answer = pacs_client.post(f"/v1/studies/{study_uid}/predict", params={"store": "true"})
    seconds = time.perf_counter() - started
    assert answer.status_code == 200, answer.text
    body = answer.json()
    expected = {f["name"]: f for f in plain.json()["findings"]}
    assert {f["name"]: f for f in body["findings"]} == expected
    assert body["input"] == plain.json()["input"] and body["model"] == plain.json()["model"]
    (stored,) = body["stored"]
    assert stored["sop_class_uid"] == COMPREHENSIVE_3D_SR

    pacs = _pacs(orthanc)
    sr_series = pacs.search_for_series(study_uid, search_filters={"Modality": "SR"})
    assert [item["0020000E"]["Value"][0] for item in sr_series] == [stored["series_instance_uid"]]
    sr = pacs.retrieve_instance(study_uid, stored["series_instance_uid"], stored["sop_instance_uid"])
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, sr, enforce_file_format=True)
    _check_sr(buffer.getvalue(), study_uid, body)

    # A second call reads the CT series only (the study now holds our SR too) and gives the same findings.
    again = pacs_client.post(f"/v1/studies/{study_uid}/predict")
    assert again.status_code == 200, again.text
    assert {f["name"]: f for f in again.json()["findings"]} == expected and again.json()["stored"] == []

    timing = {
        "spacing_mm": spacing_mm,
        "slices": len(datasets),
        "round_trip_store_s": round(seconds, 3),
        "gateway_total_ms": body["timings_ms"]["total"],
    }
    print(f"\nPACS round trip: {json.dumps(timing)}")
    (tmp_path_factory.getbasetemp() / f"pacs_roundtrip_{spacing_mm:g}mm.json").write_text(json.dumps(timing))


def test_store_with_attention_files_the_parametric_map_too(
    orthanc: LocalOrthanc, pacs_client: httpx.Client
) -> None:
    """`store=true&include=attention`: the SR and a Parametric Map of the maps go into the study; QIDO
    finds the map's series and the retrieved map sits on the source series' frame of reference."""
    datasets = _series(5.0, seed="pacs-attention")
    study_uid = str(datasets[0].StudyInstanceUID)
    _STUDIES.append(study_uid)
    _stow(orthanc, datasets)
    started = time.perf_counter()
    answer = pacs_client.post(
        f"/v1/studies/{study_uid}/predict", params={"store": "true", "include": "attention,preview"}
    )
    seconds = time.perf_counter() - started
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert set(body["attention"]) == {f["name"] for f in body["findings"]}
    assert body["preview"]["media_type"] == "image/png" and body["preview"]["data_base64"]
    sr, pm = body["stored"]
    assert sr["sop_class_uid"] == COMPREHENSIVE_3D_SR and pm["sop_class_uid"] == PARAMETRIC_MAP_STORAGE
    pacs = _pacs(orthanc)
    found = pacs.search_for_series(study_uid, search_filters={"SeriesInstanceUID": pm["series_instance_uid"]})
    assert [item["0020000E"]["Value"][0] for item in found] == [pm["series_instance_uid"]]
    stored_map = pacs.retrieve_instance(study_uid, pm["series_instance_uid"], pm["sop_instance_uid"])
    assert stored_map.FrameOfReferenceUID == datasets[0].FrameOfReferenceUID
    assert int(stored_map.NumberOfFrames) >= len(datasets)
    print(f"\nPACS round trip with attention (5 mm, {len(datasets)} slices): {seconds:.2f} s")


def test_series_choice_and_answer_formats(orthanc: LocalOrthanc, pacs_client: httpx.Client) -> None:
    """`series_uid` picks the series (422 ``series_not_found`` when the study has no such series);
    `Accept: application/dicom` answers the SR itself (nothing stored without `store`), FHIR a
    DiagnosticReport."""
    datasets = _series(5.0, seed="pacs-formats")
    study_uid, series_uid = str(datasets[0].StudyInstanceUID), str(datasets[0].SeriesInstanceUID)
    _STUDIES.append(study_uid)
    _stow(orthanc, datasets)
    path = f"/v1/studies/{study_uid}/predict"
    chosen = pacs_client.post(path, params={"series_uid": series_uid, "priority": "stat"})
    assert chosen.status_code == 200, chosen.text
    assert chosen.json()["priority"] == "stat" and chosen.json()["stored"] == []
    missing = pacs_client.post(path, params={"series_uid": "1.2.3.4"})
    assert missing.status_code == 422 and missing.json()["code"] == "series_not_found", missing.text
    sr = pacs_client.post(path, headers={"Accept": "application/dicom"})
    assert sr.status_code == 200 and sr.headers["content-type"] == "application/dicom", sr.text
    _check_sr(sr.content, study_uid, chosen.json())
    assert _pacs(orthanc).search_for_series(study_uid, search_filters={"Modality": "SR"}) == []
    fhir = pacs_client.post(path, headers={"Accept": "application/fhir+json"})
    assert fhir.status_code == 200 and fhir.json()["resourceType"] == "DiagnosticReport", fhir.text


def test_unknown_study_is_404(pacs_client: httpx.Client) -> None:
    response = pacs_client.post(f"/v1/studies/{UNKNOWN_STUDY}/predict")
    assert response.status_code == 404, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["code"] == "study_not_found"


def test_a_malformed_study_uid_is_400(pacs_client: httpx.Client) -> None:
    response = pacs_client.post("/v1/studies/not-a-uid/predict")
    assert response.status_code == 400 and response.json()["code"] == "invalid_request", response.text


def test_wrong_credentials_are_pacs_auth_failed(orthanc: LocalOrthanc) -> None:
    config = DicomwebConfig(url=orthanc.dicomweb_url, username=USERNAME, password="wrong", timeout_s=10)
    with pytest.raises(ProblemError) as raised:
        asyncio.run(PacsClient(config).fetch_study(UNKNOWN_STUDY, max_bytes=1 << 20, max_instances=10))
    assert (raised.value.status, raised.value.code) == (502, "pacs_auth_failed")


def test_no_pacs_configured_is_503(client: httpx.Client) -> None:
    """The session gateway has no HEADCT_DICOMWEB_URL."""
    response = client.post(f"/v1/studies/{UNKNOWN_STUDY}/predict")
    assert response.status_code == 503, response.text
    assert response.json()["code"] == "pacs_not_configured"


@contextlib.contextmanager
def _silent_server() -> Iterator[int]:
    """A port that accepts connections and never answers (a hung PACS)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError, OSError):
                connection, _ = listener.accept()
                held.append(connection)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        stop.set()
        thread.join(5)
        for connection in held:
            connection.close()
        listener.close()


def _problem_from_gateway(
    triton: LocalTriton, log: Path, url: str, timeout_s: str = "30"
) -> tuple[httpx.Response, float]:
    with running_gateway(
        triton,
        log,
        HEADCT_DICOMWEB_URL=url,
        HEADCT_DICOMWEB_TIMEOUT_S=timeout_s,
        HEADCT_PREPROCESS_WORKERS="0",
    ) as gateway:
        started = time.perf_counter()
        response = httpx.post(f"{gateway.url}/v1/studies/{UNKNOWN_STUDY}/predict", timeout=60)
        return response, time.perf_counter() - started


def test_a_closed_port_is_pacs_unreachable(triton: LocalTriton, tmp_path: Path) -> None:
    response, _ = _problem_from_gateway(
        triton, tmp_path / "gateway.log", f"http://127.0.0.1:{free_port()}/dicom-web"
    )
    assert response.status_code == 502, response.text
    assert response.json()["code"] == "pacs_unreachable"


def test_a_pacs_that_never_answers_is_pacs_timeout(triton: LocalTriton, tmp_path: Path) -> None:
    with _silent_server() as port:
        response, seconds = _problem_from_gateway(
            triton, tmp_path / "gateway.log", f"http://127.0.0.1:{port}/dicom-web", timeout_s="2"
        )
    assert response.status_code == 504, response.text
    assert response.json()["code"] == "pacs_timeout"
    assert seconds < 10


def test_no_identifier_in_the_gateway_log(pacs_gateway: LocalGateway, pacs_client: httpx.Client) -> None:
    """After the round trips above: the PACS gateway's log holds no patient identifier and no study UID."""
    text = pacs_gateway.log_text()
    assert "pacs study retrieved" in text  # the log is the right one, and at INFO
    for value in [UNKNOWN_STUDY, *_STUDIES, *SYNTHETIC_PATIENT.values()]:
        assert str(value) not in text
