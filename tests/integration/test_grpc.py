"""The gRPC API over the network against the running stack: same answers and error codes as REST."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import httpx
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from api.grpc.proto.headct.v1 import headct_pb2, headct_pb2_grpc
from demo.synthetic_head import make_head, to_nifti

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def channel(gateway_url: str, gateway_grpc_port: int) -> Iterator[grpc.Channel]:
    # gateway_url: the gateway process is up (its gRPC server starts with it)
    with grpc.insecure_channel(f"127.0.0.1:{gateway_grpc_port}") as opened:
        yield opened


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> headct_pb2_grpc.HeadCTStub:
    return headct_pb2_grpc.HeadCTStub(channel)


@pytest.fixture(scope="module")
def scan() -> bytes:
    return to_nifti(make_head(np.random.default_rng(777), hemorrhage=True, edema=False)).to_bytes()


def test_unary_and_streaming_predict_agree_with_rest(
    stub: headct_pb2_grpc.HeadCTStub, client: httpx.Client, scan: bytes
) -> None:
    options = headct_pb2.PredictOptions(
        content_type="application/octet-stream", include_embedding=True, request_id="grpc-1"
    )
    unary, call = stub.Predict.with_call(headct_pb2.PredictRequest(options=options, scan=scan))
    assert unary.request_id == "grpc-1"
    assert ("x-request-id", "grpc-1") in call.trailing_metadata()

    def chunks() -> Iterator[headct_pb2.PredictChunk]:
        yield headct_pb2.PredictChunk(options=options)
        for start in range(0, len(scan), 1 << 20):
            yield headct_pb2.PredictChunk(data=scan[start : start + (1 << 20)])

    streamed = stub.PredictStream(chunks())
    rest = client.post("/v1/predict", content=scan, params={"include": "embedding"}).json()
    for answer in (unary, streamed):
        assert [f.name for f in answer.findings] == [f["name"] for f in rest["findings"]]
        for got, expected in zip(answer.findings, rest["findings"], strict=True):
            assert got.probability == pytest.approx(expected["probability"], abs=1e-6)
            assert got.positive == expected["positive"]
        assert len(answer.embedding) == len(rest["embedding"])
        assert answer.model.sha256 == rest["model"]["sha256"]
        assert answer.input.source_format == "nifti"
        assert "NOT FOR CLINICAL USE" in answer.notice


def test_errors_carry_the_problem_code(stub: headct_pb2_grpc.HeadCTStub, scan: bytes) -> None:
    cases = [
        (
            headct_pb2.PredictRequest(scan=b"garbage" * 100),
            grpc.StatusCode.INVALID_ARGUMENT,
            "unreadable_file",
        ),
        (headct_pb2.PredictRequest(scan=b""), grpc.StatusCode.INVALID_ARGUMENT, "empty_body"),
        (
            headct_pb2.PredictRequest(options=headct_pb2.PredictOptions(tasks=["fracture"]), scan=scan),
            grpc.StatusCode.INVALID_ARGUMENT,
            "unknown_task",
        ),
    ]
    for request, status, code in cases:
        with pytest.raises(grpc.RpcError) as raised:
            stub.Predict(request)
        error = raised.value
        assert error.code() == status
        metadata = dict(error.trailing_metadata())
        assert metadata["headct-problem-code"] == code
        assert metadata["headct-problem-http-status"] in {"400", "422"}
        assert b'"code":"' + code.encode() + b'"' in metadata["headct-problem-bin"]

    def options_twice() -> Iterator[headct_pb2.PredictChunk]:
        yield headct_pb2.PredictChunk(data=b"data before options")

    with pytest.raises(grpc.RpcError) as raised:
        stub.PredictStream(options_twice())
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_get_model_health_and_reflection(stub: headct_pb2_grpc.HeadCTStub, channel: grpc.Channel) -> None:
    model = stub.GetModel(headct_pb2.GetModelRequest())
    assert model.name == "fmhct" and model.synthetic_demo
    assert list(model.input_shape) == [-1, 3, 96, 96, 96]
    assert [t.name for t in model.tasks] == ["hemorrhage", "edema"]

    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "headct.v1.HeadCT"):
        answer = health.Check(health_pb2.HealthCheckRequest(service=service))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING

    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    (answer,) = reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    names = {service.name for service in answer.list_services_response.service}
    assert {"headct.v1.HeadCT", "grpc.health.v1.Health"} <= names
