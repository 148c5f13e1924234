"""headct.client / the `headct` CLI against an httpx MockTransport: what is sent (content type, key,
query, a directory zipped), problem+json errors, the table and the exit codes."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest

from headct.client import HeadCTClient, HeadCTProblem, cli, media_type_for

KEY = "k-client-test-key"

PREDICTION = {
    "request_id": "r-1",
    "model": {"name": "fmhct", "version": "demo-1", "sha256": "a" * 64},
    "findings": [
        {"name": "hemorrhage", "probability": 0.91, "threshold": 0.5, "positive": True},
        {"name": "edema", "probability": 0.12, "threshold": 0.3, "positive": False},
    ],
    "input": {"shape": [64, 64, 24], "spacing_mm": [3.5, 3.5, 5.0], "source_format": "dicom"},
    "warnings": [{"code": "series_selected", "detail": "picked the thinnest series"}],
    "timings_ms": {"decode": 10.0, "infer": 20.0, "total": 35.0},
}
MODELS = {
    "models": [
        {
            "name": "fmhct",
            "version": "demo-1",
            "sha256": "a" * 64,
            "tasks": [{"name": "hemorrhage", "threshold": 0.5}],
            "input": {"shape": [1, 3, 96, 96, 96]},
            "preprocessing_version": "1",
        }
    ]
}


class Recorder:
    """Answers like the gateway and keeps what was sent."""

    def __init__(self, status: int = 200, body: dict[str, Any] | None = None) -> None:
        self.status = status
        self.body = body
        self.requests: list[httpx.Request] = []
        self.contents: list[bytes] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        self.contents.append(request.read())
        if self.status != 200:
            problem = self.body or {}
            return httpx.Response(
                self.status, json=problem, headers={"Content-Type": "application/problem+json"}
            )
        return httpx.Response(
            200, json=self.body or (MODELS if request.url.path == "/v1/models" else PREDICTION)
        )


def _client(recorder: Recorder, api_key: str | None = KEY) -> HeadCTClient:
    return HeadCTClient("http://gw:8080", api_key=api_key, transport=httpx.MockTransport(recorder))


def test_media_types_by_name() -> None:
    assert media_type_for(Path("a/scan.NII.GZ")) == "application/gzip"
    assert media_type_for(Path("scan.nii")) == "application/octet-stream"
    assert media_type_for(Path("scan.nrrd")) == "application/x-nrrd"
    assert media_type_for(Path("series.zip")) == "application/zip"
    assert media_type_for(Path("enhanced.dcm")) == "application/dicom"
    assert media_type_for(Path("IM0001")) == "application/octet-stream"


def test_predict_a_file_sends_bytes_key_and_query(tmp_path: Path) -> None:
    scan = tmp_path / "head.nii.gz"
    scan.write_bytes(b"\x1f\x8b fake gzip")
    recorder = Recorder()
    with _client(recorder) as client:
        result = client.predict(
            scan, tasks=["hemorrhage", "edema"], include_embedding=True, series_uid="1.2.3"
        )
    assert result == PREDICTION
    (request,) = recorder.requests
    assert request.method == "POST" and request.url.path == "/v1/predict"
    assert request.headers["X-API-Key"] == KEY
    assert request.headers["Content-Type"] == "application/gzip"
    assert dict(request.url.params) == {
        "tasks": "hemorrhage,edema",
        "include": "embedding",
        "series_uid": "1.2.3",
    }
    assert recorder.contents == [b"\x1f\x8b fake gzip"]


def test_predict_a_directory_zips_every_file_without_local_names(tmp_path: Path) -> None:
    series = tmp_path / "DOE_JOHN"
    (series / "sub").mkdir(parents=True)
    for n in range(3):
        (series / f"IM{n}").write_bytes(b"DICM" + bytes([n]) * 100)
    (series / "sub" / "IM9").write_bytes(b"nested")
    (series / ".DS_Store").write_bytes(b"junk")
    recorder = Recorder()
    with _client(recorder, api_key=None) as client:
        client.predict(series)
    (request,) = recorder.requests
    assert request.headers["Content-Type"] == "application/zip" and "X-API-Key" not in request.headers
    archive = zipfile.ZipFile(io.BytesIO(recorder.contents[0]))
    contents = sorted(archive.read(info) for info in archive.infolist())
    assert contents == sorted([b"DICM" + bytes([n]) * 100 for n in range(3)] + [b"nested"])
    assert not any("DOE" in name or "IM" in name for name in archive.namelist())


def test_problem_is_a_typed_error() -> None:
    problem = {"type": "urn:headct:problem:invalid_api_key", "status": 401, "code": "invalid_api_key",
               "detail": "the API key is not valid", "request_id": "r-9"}  # fmt: skip
    with _client(Recorder(401, problem)) as client, pytest.raises(HeadCTProblem) as raised:
        client.models()
    error = raised.value
    assert error.status == 401 and error.code == "invalid_api_key" and error.request_id == "r-9"
    assert error.problem == problem


def _run(monkeypatch: pytest.MonkeyPatch, recorder: Recorder, argv: list[str]) -> tuple[int, str, str]:
    factory: Callable[..., HeadCTClient] = partial(HeadCTClient, transport=httpx.MockTransport(recorder))
    monkeypatch.setattr(cli, "HeadCTClient", factory)
    out, err = io.StringIO(), io.StringIO()
    return cli.run(argv, out=out, err=err), out.getvalue(), err.getvalue()


def test_cli_predict_prints_a_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scan = tmp_path / "head.nii"
    scan.write_bytes(b"fake")
    monkeypatch.setenv("HEADCT_API_KEY", KEY)
    recorder = Recorder()
    code, out, _ = _run(monkeypatch, recorder, ["predict", str(scan), "--tasks", "hemorrhage"])
    assert code == 0
    assert "hemorrhage  0.910" in out and "YES" in out and "edema" in out
    assert "series_selected" in out
    assert recorder.requests[0].headers["X-API-Key"] == KEY
    assert recorder.requests[0].url.params["tasks"] == "hemorrhage"


def test_cli_json_and_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scan = tmp_path / "head.nrrd"
    scan.write_bytes(b"NRRD0004")
    code, out, _ = _run(monkeypatch, Recorder(), ["predict", str(scan), "--json", "--api-key", KEY])
    assert code == 0 and json.loads(out) == PREDICTION
    code, out, _ = _run(monkeypatch, Recorder(), ["models"])
    assert code == 0 and "fmhct demo-1" in out and "hemorrhage" in out


def test_cli_exit_codes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scan = tmp_path / "head.nii"
    scan.write_bytes(b"fake")
    problem = {"status": 422, "code": "not_a_head", "detail": "no skull found"}
    code, _, err = _run(monkeypatch, Recorder(422, problem), ["predict", str(scan)])
    assert code == 1 and "422 not_a_head: no skull found" in err
    code, _, err = _run(monkeypatch, Recorder(), ["predict", str(tmp_path / "missing.nii")])
    assert code == 2 and "no such file" in err
    code, _, _ = _run(monkeypatch, Recorder(), ["predict"])
    assert code == 2
    code, _, _ = _run(monkeypatch, Recorder(), ["frobnicate"])
    assert code == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = _run(monkeypatch, Recorder(), ["predict", str(empty)])
    assert code == 2 and "no files" in err


def test_client_imports_neither_torch_nor_the_gateway() -> None:
    probe = (
        "import sys, headct.client.cli; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'api'}))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
