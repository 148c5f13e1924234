"""Every case of the hostile-input corpus over real HTTP (and a handful over gRPC) against a running
gateway + Triton: each gets its own status and problem ``code``, none a 5xx or a hang; afterwards the
gateway's memory is back near where it was and a valid scan still gets findings."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import grpc
import httpx
import pytest

from api.grpc.problems import grpc_status
from api.grpc.proto.headct.v1 import headct_pb2, headct_pb2_grpc
from api.problem_codes import ProblemCode
from tests.hostile.conftest import REQUEST_TIMEOUT_S
from tests.hostile.corpus import Case, cases, valid_nifti
from tests.stack import LocalGateway, process_tree_rss_kib

pytestmark = pytest.mark.integration

PROBLEM = "application/problem+json"
#: LocalGateway RSS (process tree) after the corpus may exceed the warmed-up baseline by at most this.
MAX_RSS_GROWTH = 1.2
CASES = cases()
GRPC_CASES = [case for case in CASES if case.grpc]
#: Figures for the closing report, printed by the last test (pytest -s / -rA shows them).
FIGURES: dict[str, object] = {"tried": 0, "passed": 0}


def _predict_valid(client: httpx.Client) -> dict:
    response = client.post(
        "/v1/predict", content=valid_nifti(), headers={"Content-Type": "application/octet-stream"}
    )
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture(scope="module")
def rss_baseline_kib(hostile_client: httpx.Client, hostile_gateway: LocalGateway) -> int:
    """Gateway process-tree RSS after warm-up (two valid scans: lazy imports, pools, first Triton call)."""
    for _ in range(2):
        _predict_valid(hostile_client)
    return process_tree_rss_kib(hostile_gateway.pid)


def _check_problem(response: httpx.Response, case: Case) -> None:
    assert response.status_code < 500, f"{case.name}: 5xx {response.text[:500]}"
    assert response.status_code == case.status, f"{case.name}: {response.status_code} {response.text[:500]}"
    if case.code is None:
        assert response.json()["findings"], case.name
        return
    assert response.headers["content-type"] == PROBLEM, case.name
    body = response.json()
    assert body["code"] == case.code, f"{case.name}: {body}"
    assert body["status"] == case.status
    assert body["type"] == f"urn:headct:problem:{case.code}"
    assert response.headers.get("x-request-id") and body.get("request_id") == response.headers["x-request-id"]
    text = response.text
    assert "Traceback" not in text and 'File "' not in text, f"{case.name} leaks a stack trace: {text}"


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_hostile_upload_gets_its_problem(
    case: Case, hostile_client: httpx.Client, corpus_dir: Path, rss_baseline_kib: int
) -> None:
    path, content_type = case.build(corpus_dir)
    headers = {"Content-Type": content_type} if content_type else {}
    FIGURES["tried"] = int(FIGURES["tried"]) + 1  # type: ignore[call-overload]
    response = hostile_client.post(
        "/v1/predict", content=path.read_bytes(), headers=headers, params=case.params
    )
    _check_problem(response, case)
    FIGURES["passed"] = int(FIGURES["passed"]) + 1  # type: ignore[call-overload]


@pytest.mark.parametrize("case", GRPC_CASES, ids=[case.name for case in GRPC_CASES])
def test_hostile_upload_over_grpc(case: Case, hostile_gateway: LocalGateway, corpus_dir: Path) -> None:
    path, content_type = case.build(corpus_dir)
    with grpc.insecure_channel(f"127.0.0.1:{hostile_gateway.grpc_port}") as channel:
        stub = headct_pb2_grpc.HeadCTStub(channel)
        request = headct_pb2.PredictRequest(
            options=headct_pb2.PredictOptions(content_type=content_type), scan=path.read_bytes()
        )
        with pytest.raises(grpc.RpcError) as raised:
            stub.Predict(request, timeout=REQUEST_TIMEOUT_S)
    error = raised.value
    assert error.code() == grpc_status(ProblemCode(case.code)), (case.name, error.code(), error.details())
    trailers = dict(error.trailing_metadata() or ())
    assert trailers.get("headct-problem-code") == case.code, (case.name, trailers)
    problem = json.loads(trailers["headct-problem-bin"])
    assert problem["status"] == case.status and "Traceback" not in json.dumps(problem)


def test_content_length_claiming_a_terabyte_is_refused_before_reading(hostile_gateway: LocalGateway) -> None:
    """Only the request line and headers are sent: the gateway must answer 413 from Content-Length
    alone, not wait for a terabyte (a hang here is a read timeout)."""
    host, port = hostile_gateway.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=REQUEST_TIMEOUT_S) as connection:
        connection.sendall(
            b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Length: 1099511627776\r\n\r\n" + bytes(1024)
        )
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = connection.recv(65536)
            if not chunk:
                break
            answer += chunk
    status_line = answer.split(b"\r\n", 1)[0]
    assert b" 413 " in status_line, answer[:300]


def test_chunked_body_over_the_limit_is_refused(
    hostile_client: httpx.Client, hostile_gateway: LocalGateway
) -> None:
    """No Content-Length (chunked): the limit is enforced while spooling."""
    limit = int(hostile_gateway.settings["HEADCT_MAX_UPLOAD_BYTES"])
    chunk = bytes(1 << 20)

    def body() -> object:
        for _ in range(limit // len(chunk) + 2):
            yield chunk

    try:
        response = hostile_client.post(
            "/v1/predict", content=body(), headers={"Content-Type": "application/octet-stream"}
        )
    except httpx.WriteError:  # the gateway may answer and close before the client finished writing
        return
    assert response.status_code == 413, response.text
    assert response.json()["code"] == "payload_too_large"


def test_gateway_memory_is_bounded_and_still_serves(
    hostile_client: httpx.Client, hostile_gateway: LocalGateway, rss_baseline_kib: int, spool_dir: Path
) -> None:
    """Runs after the corpus (file order): RSS <= 1.2 x the warmed-up baseline; a valid scan succeeds;
    no upload or scratch file is left in the spool directory."""
    result = _predict_valid(hostile_client)
    assert result["findings"]
    after = process_tree_rss_kib(hostile_gateway.pid)
    FIGURES.update(rss_before_mib=round(rss_baseline_kib / 1024, 1), rss_after_mib=round(after / 1024, 1))
    print(f"\nhostile corpus figures: {FIGURES}")
    assert after <= MAX_RSS_GROWTH * rss_baseline_kib, FIGURES
    assert sorted(p.name for p in spool_dir.iterdir()) == []
    assert hostile_gateway.process.poll() is None, "the gateway died"
    assert httpx.get(f"{hostile_gateway.url}/livez", timeout=10).status_code == 200
