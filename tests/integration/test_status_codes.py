"""Each status code of `POST /v1/predict`, over REST and over gRPC, against the session stack (real
gateway + real Triton), plus every other route and the X-Request-ID rule on every answer.

Proven here: 200, 400 (unreadable, empty, bad query), 413 (body over HEADCT_MAX_UPLOAD_BYTES, declared
and streamed), 415, 422; GET /v1/models, /livez, /readyz, /metrics, /docs, /openapi.json; 404.
Proven elsewhere (each needs a gateway or a Triton with its own settings or faults), not repeated here:

- 401 missing / wrong API key, REST and gRPC: tests/faults/test_gateway_guards.py::test_api_keys;
- 413 zip limits and 422 volume_too_large: test_gateway_guards.py::test_upload_limit_settings;
- 429 gateway_busy: test_gateway_guards.py::test_admission_sheds_load_with_429,
  tests/faults/test_overload.py; 429 key_concurrency_exceeded: tests/unit/test_auth.py (in-process);
- 503 Triton down / not ready, 504 deadline: tests/faults/test_triton_faults.py;
- 503 shutting_down (SIGTERM): test_gateway_guards.py and tests/integration/test_lifecycle.py;
- the hostile-input corpus (each case's specific 4xx): tests/hostile/test_corpus.py.
"""

from __future__ import annotations

import copy
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import httpx
import pytest

from api.grpc.proto.headct.v1 import headct_pb2, headct_pb2_grpc
from tests.hostile.corpus import series, valid_nifti, zip_of

pytestmark = pytest.mark.integration

#: HEADCT_MAX_UPLOAD_BYTES of the session gateway (tests/integration/conftest.py).
SESSION_UPLOAD_LIMIT = 64 << 20
TIMEOUT_S = 120.0
PROBLEM = "application/problem+json"
_GRPC_STATUS = {
    200: grpc.StatusCode.OK,
    400: grpc.StatusCode.INVALID_ARGUMENT,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
}


def _mr_series_zip() -> bytes:
    # Readable DICOM, but not CT: the validation rules (422), not the decoders (400), refuse it.
    datasets = [copy.deepcopy(dataset) for dataset in series()]  # series() is cached: do not mutate it
    for dataset in datasets:
        dataset.Modality = "MR"
    return zip_of(datasets)


@dataclass(frozen=True)
class Case:
    name: str
    status: int
    code: str | None  # the problem code; None for 200
    content_type: str
    body: bytes
    params: dict[str, str] | None = None


@pytest.fixture(scope="module")
def cases() -> dict[str, Case]:
    nifti = valid_nifti()
    return {
        case.name: case
        for case in (
            Case("ok_nifti", 200, None, "application/octet-stream", nifti),
            Case("ok_dicom_zip", 200, None, "application/zip", zip_of(series())),
            Case("unreadable", 400, "unreadable_file", "application/octet-stream", b"not a scan " * 64),
            Case("empty", 400, "empty_body", "application/octet-stream", b""),
            Case("unknown_task", 400, "unknown_task", "application/octet-stream", nifti, {"tasks": "x"}),
            Case("bad_include", 400, "invalid_include", "application/octet-stream", nifti, {"include": "x"}),
            Case("wrong_media_type", 415, "unsupported_media_type", "text/plain", nifti),
            Case("not_ct", 422, "not_ct", "application/zip", _mr_series_zip()),
        )
    }


@pytest.fixture(scope="module")
def stub(gateway_url: str, gateway_grpc_port: int) -> Iterator[headct_pb2_grpc.HeadCTStub]:
    with grpc.insecure_channel(f"127.0.0.1:{gateway_grpc_port}") as channel:
        yield headct_pb2_grpc.HeadCTStub(channel)


CASE_NAMES = ["ok_nifti", "ok_dicom_zip", "unreadable", "empty", "unknown_task", "bad_include"]
CASE_NAMES += ["wrong_media_type", "not_ct"]
# gRPC has a boolean include_embedding: no unknown extra can be asked for.
GRPC_CASE_NAMES = [name for name in CASE_NAMES if name != "bad_include"]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_predict_status_over_rest(client: httpx.Client, cases: dict[str, Case], name: str) -> None:
    case = cases[name]
    request_id = f"rest-{name}"
    response = client.post(
        "/v1/predict",
        content=case.body,
        params=case.params,
        headers={"Content-Type": case.content_type, "X-Request-ID": request_id},
    )
    assert response.status_code == case.status, response.text
    assert response.headers["X-Request-ID"] == request_id
    body = response.json()
    assert body["request_id"] == request_id
    if case.code is None:
        assert [finding["name"] for finding in body["findings"]] == ["hemorrhage", "edema"]
    else:
        assert response.headers["content-type"] == PROBLEM
        assert body["status"] == case.status and body["code"] == case.code, body


@pytest.mark.parametrize("name", GRPC_CASE_NAMES)
def test_predict_status_over_grpc(
    stub: headct_pb2_grpc.HeadCTStub, cases: dict[str, Case], name: str
) -> None:
    case = cases[name]
    params = case.params or {}
    options = headct_pb2.PredictOptions(
        content_type=case.content_type,
        tasks=[params["tasks"]] if "tasks" in params else [],
        request_id=f"grpc-{name}",
    )
    if case.code is None:
        answer, call = stub.Predict.with_call(
            headct_pb2.PredictRequest(options=options, scan=case.body), timeout=TIMEOUT_S
        )
        assert [finding.name for finding in answer.findings] == ["hemorrhage", "edema"]
        assert answer.request_id == f"grpc-{name}"
        assert ("x-request-id", f"grpc-{name}") in call.trailing_metadata()
        return
    with pytest.raises(grpc.RpcError) as raised:
        stub.Predict(headct_pb2.PredictRequest(options=options, scan=case.body), timeout=TIMEOUT_S)
    _assert_grpc_problem(raised.value, case.status, case.code or "", f"grpc-{name}")


def _assert_grpc_problem(error: grpc.RpcError, status: int, code: str, request_id: str) -> None:
    assert error.code() == _GRPC_STATUS[status], (error.code(), error.details())
    metadata = dict(error.trailing_metadata())
    assert metadata["headct-problem-code"] == code
    assert metadata["headct-problem-http-status"] == str(status)
    assert metadata["x-request-id"] == request_id
    problem = json.loads(metadata["headct-problem-bin"])
    assert problem["status"] == status and problem["code"] == code and problem["request_id"] == request_id


def test_413_over_the_upload_limit(client: httpx.Client, stub: headct_pb2_grpc.HeadCTStub) -> None:
    oversize = SESSION_UPLOAD_LIMIT + (1 << 20)
    # Declared by Content-Length: refused before the body is read.
    response = client.post("/v1/predict", content=bytes(oversize), headers={"X-Request-ID": "big-1"})
    assert response.status_code == 413 and response.json()["code"] == "payload_too_large"
    assert response.headers["X-Request-ID"] == "big-1" and "Retry-After" not in response.headers

    # Chunked (no Content-Length): refused while streaming.
    def chunked() -> Iterator[bytes]:
        for _ in range(oversize >> 22):
            yield bytes(4 << 20)
        yield bytes(oversize % (4 << 20))

    response = client.post("/v1/predict", content=chunked(), headers={"Content-Type": "application/zip"})
    assert response.status_code == 413 and response.json()["code"] == "payload_too_large"

    # gRPC: a client stream over the same limit (a unary message that large is refused by gRPC itself).
    def chunks() -> Iterator[headct_pb2.PredictChunk]:
        yield headct_pb2.PredictChunk(options=headct_pb2.PredictOptions(request_id="big-grpc"))
        for _ in range((oversize >> 22) + 1):  # 17 x 4 MiB: 4 MiB over the limit
            yield headct_pb2.PredictChunk(data=bytes(4 << 20))

    with pytest.raises(grpc.RpcError) as raised:
        stub.PredictStream(chunks(), timeout=TIMEOUT_S)
    _assert_grpc_problem(raised.value, 413, "payload_too_large", "big-grpc")


def test_get_model(client: httpx.Client, stub: headct_pb2_grpc.HeadCTStub) -> None:
    response = client.get("/v1/models")
    assert response.status_code == 200
    served = response.json()
    assert "fmhct" in json.dumps(served) and "hemorrhage" in json.dumps(served)
    model = stub.GetModel(headct_pb2.GetModelRequest(), timeout=TIMEOUT_S)
    assert model.name == "fmhct" and [task.name for task in model.tasks] == ["hemorrhage", "edema"]


@pytest.mark.parametrize(
    ("path", "content_type", "marker"),
    [
        ("/livez", "application/json", "alive"),
        ("/readyz", "application/json", "ready"),
        ("/metrics", "text/plain", "headct_requests_total"),
        ("/docs", "text/html", "swagger"),
        ("/openapi.json", "application/json", "/v1/predict"),
        ("/v1/models", "application/json", "fmhct"),
    ],
)
def test_routes_answer_and_carry_a_request_id(
    client: httpx.Client, path: str, content_type: str, marker: str
) -> None:
    generated = client.get(path)
    assert generated.status_code == 200
    assert generated.headers["content-type"].startswith(content_type)
    assert marker in generated.text.lower() if marker == "swagger" else marker in generated.text
    assert len(generated.headers["X-Request-ID"]) == 32  # a fresh uuid4 hex when none was sent
    echoed = client.get(path, headers={"X-Request-ID": f"echo-{path}"})
    assert echoed.headers["X-Request-ID"] == f"echo-{path}"


def test_request_id_on_errors_and_unknown_routes(client: httpx.Client) -> None:
    for method, path in (("GET", "/nope"), ("DELETE", "/v1/predict"), ("POST", "/v1/predict")):
        response = client.request(method, path, content=b"x" if method == "POST" else None)
        assert response.status_code in {400, 404, 405}, (method, path, response.status_code)
        assert response.headers["content-type"] == PROBLEM
        generated = response.headers["X-Request-ID"]
        assert len(generated) == 32 and response.json()["request_id"] == generated
    # A caller id that is not a sane token (too long, not printable ASCII) is replaced, not echoed.
    for bad in ("x" * 200, "tab\there"):
        response = client.get("/livez", headers={"X-Request-ID": bad})
        assert response.headers["X-Request-ID"] != bad
        uuid.UUID(hex=response.headers["X-Request-ID"])
