"""API keys, the JSON logs and the `headct` CLI against the running stack: a second gateway process with
keys configured (from a keys file, as the Helm chart mounts it) in front of the real Triton."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest

from api.auth import key_id
from api.grpc.proto.headct.v1 import headct_pb2, headct_pb2_grpc
from demo.dicom_writer import ct_series, reorient, write_series
from demo.synthetic_head import make_head
from headct.local.triton import LocalTriton
from headct.volume import Volume
from tests.stack import LocalGateway, running_gateway

pytestmark = pytest.mark.integration

KEY = "k-integration-0123456789abcdef"
OTHER_KEY = "k-integration-second-key"
SENTINELS = {
    "PatientName": "SENTINEL^INTEGRATION",
    "PatientID": "SENTINELPID9001",
    "AccessionNumber": "SENTINELACC9002",
}
HEADCT = Path(sys.executable).with_name("headct")


@pytest.fixture(scope="module")
def keyed_gateway(triton: LocalTriton, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalGateway]:
    home = tmp_path_factory.mktemp("keyed-gateway")
    keys_file = home / "api-keys"
    keys_file.write_text(f"# test keys\n{KEY}\n{OTHER_KEY}\n")
    with running_gateway(
        triton,
        home / "gateway.log",
        HEADCT_MAX_UPLOAD_BYTES=str(256 << 20),
        HEADCT_API_KEYS_FILE=str(keys_file),  # as the Helm chart mounts its Secret
        HEADCT_LOG_FORMAT="json",
        HEADCT_LOG_LEVEL="INFO",
    ) as gateway:  # /readyz needs no key: probes stay open
        yield gateway


@pytest.fixture(scope="module")
def head() -> Volume:
    volume = make_head(np.random.default_rng(4242), hemorrhage=True, edema=False)
    return volume.with_hu(np.rint(volume.hu))


@pytest.fixture(scope="module")
def nifti_file(head: Volume, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("nifti") / "head.nii.gz"
    head.to_nifti().to_filename(path)
    return path


@pytest.fixture(scope="module")
def dicom_dir(head: Volume, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("dicom") / "SENTINEL_INTEGRATION"
    write_series(ct_series(reorient(head, "LPS"), overrides=SENTINELS), directory)
    return directory


def test_rest_needs_the_key(keyed_gateway: LocalGateway) -> None:
    with httpx.Client(base_url=keyed_gateway.url, timeout=60) as http:
        missing = http.get("/v1/models")
        assert missing.status_code == 401 and missing.json()["code"] == "missing_api_key"
        assert missing.headers["content-type"] == "application/problem+json"
        wrong = http.post("/v1/predict", content=b"x" * 100, headers={"X-API-Key": "k-wrong"})
        assert wrong.status_code == 401 and wrong.json()["code"] == "invalid_api_key"
        assert http.get("/v1/models", headers={"X-API-Key": KEY}).status_code == 200
        assert http.get("/v1/models", headers={"Authorization": f"Bearer {OTHER_KEY}"}).status_code == 200
        assert http.get("/livez").status_code == 200 and http.get("/metrics").status_code == 200


def test_rest_predict_with_the_key(keyed_gateway: LocalGateway, nifti_file: Path) -> None:
    response = httpx.post(
        f"{keyed_gateway.url}/v1/predict",
        content=nifti_file.read_bytes(),
        headers={"X-API-Key": KEY, "Content-Type": "application/gzip"},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    assert {f["name"] for f in response.json()["findings"]}


def test_grpc_needs_the_key(keyed_gateway: LocalGateway, nifti_file: Path) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{keyed_gateway.grpc_port}") as channel:
        stub = headct_pb2_grpc.HeadCTStub(channel)
        for metadata, code in (((), "missing_api_key"), ((("x-api-key", "k-wrong"),), "invalid_api_key")):
            with pytest.raises(grpc.RpcError) as raised:
                stub.GetModel(headct_pb2.GetModelRequest(), metadata=metadata, timeout=30)
            assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
            trailing = dict(raised.value.trailing_metadata())
            assert trailing["headct-problem-code"] == code
            assert json.loads(trailing["headct-problem-bin"])["status"] == 401
        assert stub.GetModel(headct_pb2.GetModelRequest(), metadata=(("x-api-key", KEY),)).name
        options = headct_pb2.PredictOptions(content_type="application/gzip", request_id="grpc-keyed-1")
        request = headct_pb2.PredictRequest(options=options, scan=nifti_file.read_bytes())
        answer = stub.Predict(request, metadata=(("authorization", f"Bearer {OTHER_KEY}"),), timeout=120)
        assert answer.findings and answer.request_id == "grpc-keyed-1"


def _headct(*args: str, key: str | None = KEY) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "HEADCT_API_KEY"}
    if key:
        env["HEADCT_API_KEY"] = key
    return subprocess.run([str(HEADCT), *args], capture_output=True, text=True, env=env, timeout=300)


def test_cli_predict_on_nifti(keyed_gateway: LocalGateway, nifti_file: Path) -> None:
    done = _headct("predict", str(nifti_file), "--url", keyed_gateway.url)
    assert done.returncode == 0, done.stderr
    assert "finding" in done.stdout and "probability" in done.stdout and "hemorrhage" in done.stdout
    as_json = _headct(
        "predict", str(nifti_file), "--url", keyed_gateway.url, "--json", "--tasks", "hemorrhage"
    )
    assert as_json.returncode == 0, as_json.stderr
    assert [f["name"] for f in json.loads(as_json.stdout)["findings"]] == ["hemorrhage"]
    refused = _headct("predict", str(nifti_file), "--url", keyed_gateway.url, key=None)
    assert refused.returncode == 1 and "missing_api_key" in refused.stderr


def test_cli_predict_on_a_dicom_directory_and_the_logs(keyed_gateway: LocalGateway, dicom_dir: Path) -> None:
    done = _headct("predict", str(dicom_dir), "--url", keyed_gateway.url, "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["input"]["source_format"] == "dicom" and result["findings"]
    models = _headct("models", "--url", keyed_gateway.url)
    assert models.returncode == 0 and "hemorrhage" in models.stdout

    # The gateway's log: JSON lines; the prediction's access line; no identifier, no key.
    lines = keyed_gateway.log_path.read_text().splitlines()
    records = [json.loads(line) for line in lines if line.startswith("{")]
    access = [r for r in records if r.get("logger") == "headct.access"]
    (mine,) = [r for r in access if r.get("request_id") == result["request_id"]]
    assert mine["route"] == "/v1/predict" and mine["status"] == 200 and mine["api_key"] == key_id(KEY)
    assert set(mine["timings_ms"]) >= {"decode", "infer"}
    assert any(r["route"].endswith("/Predict") and r["status"] == "OK" for r in access)  # the gRPC call
    text = keyed_gateway.log_path.read_text()
    for secret in (*SENTINELS.values(), KEY, OTHER_KEY):
        assert secret not in text
    assert not [line for line in lines if line and not line.startswith("{")], "non-JSON log lines"
