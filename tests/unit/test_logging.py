"""Structured logs (api/logging_config.py; api/access_log.py, called by api/http/request_context.py): one
JSON access line per request with the request id, key hash and stage timings, and never a patient
identifier, a UID, the key or file contents, also not through an exception's traceback."""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from api.auth import key_id
from api.http.dependencies import get_model, get_prediction_service
from api.inference.service import InferenceResult, Prediction, PredictionService
from api.ingest import decode_upload
from api.logging_config import JsonFormatter, TextFormatter, configure_logging, safe_exception
from api.main import create_app
from api.settings import Settings
from demo.dicom_writer import ct_series, phantom_head, zip_bytes
from tests.unit.test_auth import FakeModel, _card

KEY = "k-logging-test-key-0123456789"
# Sentinels: if any of these shows up in a log line, the gateway leaked an identifier.
SENTINELS = {
    "PatientName": "SENTINEL^PATIENTNAME",
    "PatientID": "SENTINELPID42",
    "AccessionNumber": "SENTINELACC7",
    "PatientBirthDate": "19010203",
}
SERIES_UID = "1.2.826.0.1.3680043.8.498.99999999999999999"
STUDY_UID = "1.2.826.0.1.3680043.8.498.88888888888888888"


def _record(message: str, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("headct.test", logging.ERROR, __file__, 1, message, None, None)
    record.__dict__.update(extra)
    return record


def test_json_lines_carry_extras() -> None:
    line = json.loads(JsonFormatter().format(_record("request", request_id="r-1", timings_ms={"infer": 2.5})))
    assert line["msg"] == "request" and line["level"] == "ERROR" and line["logger"] == "headct.test"
    assert line["request_id"] == "r-1" and line["timings_ms"] == {"infer": 2.5}


def test_tracebacks_withhold_exception_messages() -> None:
    try:
        try:
            raise ValueError(f"bad value {SENTINELS['PatientName']!r} in element (0010,0010)")
        except ValueError as error:
            raise RuntimeError(f"decoding failed: {SENTINELS['PatientID']}") from error
    except RuntimeError:
        exc_info = sys.exc_info()
    record = _record("decoder crashed")
    record.exc_info = exc_info
    for text in (JsonFormatter().format(record), TextFormatter().format(record), safe_exception(exc_info)):
        assert "ValueError" in text and "RuntimeError" in text and "test_logging.py" in text
        for sentinel in SENTINELS.values():
            assert sentinel not in text


class DecodingService(PredictionService):
    """The real request handling (spooling, options, answer) that decodes the upload for real (the DICOM
    reader sees the sentinels) and fakes the inference."""

    def __init__(self) -> None:
        super().__init__(FakeModel(), Settings(grpc_enabled=False, preprocess_workers=0))  # type: ignore[arg-type]

    async def predict(  # type: ignore[override]
        self, upload: Path, content_type: str, *, series_uid: str | None = None, **options: object
    ) -> Prediction:
        scan = decode_upload(upload, content_type, series_uid=series_uid)
        result = InferenceResult({"hemorrhage": 0.9}, np.zeros(4, np.float32))
        timings = {"decode": 1.0, "validate": 0.1, "preprocess": 2.0, "queue": 0.0, "infer": 3.0}
        return Prediction(card=_card(), scan=scan, result=result, warnings=[], timings_ms=timings)


@pytest.fixture
def client() -> Iterator[TestClient]:
    settings = Settings(api_keys=KEY, grpc_enabled=False, log_format="json")
    app = create_app(settings)
    app.state.settings = settings
    app.dependency_overrides[get_model] = FakeModel
    app.dependency_overrides[get_prediction_service] = DecodingService
    with TestClient(app) as test_client:
        yield test_client


def _sentinel_zip() -> bytes:
    overrides = {**SENTINELS, "StudyInstanceUID": STUDY_UID, "SeriesInstanceUID": SERIES_UID}
    return zip_bytes(ct_series(phantom_head(), overrides=overrides))


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    formatter = JsonFormatter()
    return [formatter.format(record) for record in caplog.records]


def test_access_line_for_a_prediction_and_no_identifiers(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    response = client.post(
        "/v1/predict",
        content=_sentinel_zip(),
        params={"series_uid": SERIES_UID},
        headers={"Content-Type": "application/zip", "X-API-Key": KEY, "X-Request-ID": "req-log-1"},
    )
    assert response.status_code == 200, response.text
    access = [json.loads(line) for line in _lines(caplog) if '"logger": "headct.access"' in line]
    assert len(access) == 1
    (line,) = access
    assert line["request_id"] == "req-log-1" and line["route"] == "/v1/predict" and line["status"] == 200
    assert line["api_key"] == key_id(KEY) and line["timings_ms"]["infer"] == 3.0
    assert line["duration_ms"] >= 0
    everything = "\n".join(_lines(caplog))
    for secret in (*SENTINELS.values(), SERIES_UID, STUDY_UID, KEY):
        assert secret not in everything


def test_access_line_for_a_problem(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    response = client.get("/v1/models", headers={"X-API-Key": "wrong", "X-Request-ID": "req-log-2"})
    assert response.status_code == 401
    (line,) = [json.loads(x) for x in _lines(caplog) if '"logger": "headct.access"' in x]
    assert line["request_id"] == "req-log-2" and line["code"] == "invalid_api_key" and line["status"] == 401
    assert "api_key" not in line  # an unknown key has no identity, and is never logged


def test_probes_are_debug_only(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    client.get("/livez")
    assert not [r for r in caplog.records if r.name == "headct.access"]


def test_uncaught_thread_exceptions_go_through_the_redacting_formatter(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)  # restored after the test
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    configure_logging("INFO", "json")

    def crash() -> None:
        raise ValueError(f"pixel bytes {SENTINELS['PatientName']}")

    worker = threading.Thread(target=crash)
    worker.start()
    worker.join()
    (record,) = [r for r in caplog.records if r.name == "headct"]
    line = json.loads(JsonFormatter().format(record))
    assert line["exc_type"] == "ValueError" and "crash" in line["exc"]
    assert SENTINELS["PatientName"] not in JsonFormatter().format(record)


def test_uvicorns_coloured_copy_of_the_message_is_not_an_extra() -> None:
    record = logging.LogRecord("uvicorn.error", logging.INFO, __file__, 1, "Started", None, None)
    record.color_message = "Started server process [\x1b[36m%d\x1b[0m]"
    line = JsonFormatter().format(record)
    assert "color_message" not in json.loads(line) and "\x1b" not in line
