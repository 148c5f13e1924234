"""The gRPC interceptors (api/grpc/interceptors.py) on an in-process server with a stand-in servicer:
UNAUTHENTICATED with the problem code in the trailing metadata, both metadata forms accepted, the
per-key limit, health left open, one access line per call."""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from api.auth import key_id
from api.grpc.interceptors import interceptors
from api.grpc.proto.headct.v1 import headct_pb2, headct_pb2_grpc
from api.grpc.server import SERVICE_NAME
from api.settings import Settings

KEY = "k-grpc-unit-key-0001"


class HoldingServicer(headct_pb2_grpc.HeadCTServicer):
    """Predict waits until released, so a second call of the same key meets the limit."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def Predict(self, request: headct_pb2.PredictRequest, context: grpc.aio.ServicerContext) -> object:
        self.entered.set()
        await self.release.wait()
        context.set_trailing_metadata((("x-request-id", "grpc-unit-1"),))
        return headct_pb2.PredictResponse(request_id="grpc-unit-1")

    async def GetModel(
        self, request: headct_pb2.GetModelRequest, context: grpc.aio.ServicerContext
    ) -> object:
        return headct_pb2.ModelInfo(name="fmhct")


def _code(error: grpc.aio.AioRpcError) -> str:
    return dict(error.trailing_metadata() or ())["headct-problem-code"]


def test_grpc_keys_and_limit(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    settings = Settings(api_keys=KEY, per_key_concurrency=1)

    async def scenario() -> None:
        servicer = HoldingServicer()
        server = grpc.aio.server(interceptors=interceptors(settings, SERVICE_NAME))
        headct_pb2_grpc.add_HeadCTServicer_to_server(servicer, server)
        health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = headct_pb2_grpc.HeadCTStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as missing:
                    await stub.GetModel(headct_pb2.GetModelRequest())
                assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert _code(missing.value) == "missing_api_key"
                with pytest.raises(grpc.aio.AioRpcError) as wrong:
                    await stub.GetModel(headct_pb2.GetModelRequest(), metadata=(("x-api-key", "nope"),))
                assert _code(wrong.value) == "invalid_api_key"
                assert (
                    await stub.GetModel(headct_pb2.GetModelRequest(), metadata=(("x-api-key", KEY),))
                ).name
                bearer = (("authorization", f"Bearer {KEY}"),)
                assert (await stub.GetModel(headct_pb2.GetModelRequest(), metadata=bearer)).name

                # Health is not behind the key.
                await health.set("", health_pb2.HealthCheckResponse.SERVING)
                check = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
                assert check.status == health_pb2.HealthCheckResponse.SERVING

                first = asyncio.ensure_future(stub.Predict(headct_pb2.PredictRequest(), metadata=bearer))
                await servicer.entered.wait()
                with pytest.raises(grpc.aio.AioRpcError) as limited:
                    await stub.Predict(headct_pb2.PredictRequest(), metadata=bearer)
                assert limited.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert _code(limited.value) == "key_concurrency_exceeded"
                # GetModel is not a prediction: not limited.
                assert (await stub.GetModel(headct_pb2.GetModelRequest(), metadata=bearer)).name
                servicer.release.set()
                assert (await first).request_id == "grpc-unit-1"
                assert (await stub.Predict(headct_pb2.PredictRequest(), metadata=bearer)).request_id
        finally:
            await server.stop(None)

    asyncio.run(scenario())
    access = [r.__dict__ for r in caplog.records if r.name == "headct.access"]
    statuses = [(r["route"].rsplit("/", 1)[1], r["status"], r.get("code")) for r in access]
    assert ("GetModel", "UNAUTHENTICATED", "missing_api_key") in statuses
    assert ("Predict", "RESOURCE_EXHAUSTED", "key_concurrency_exceeded") in statuses
    ok = [r for r in access if r["route"].endswith("/Predict") and r["status"] == "OK"]
    assert ok and all(r["api_key"] == key_id(KEY) for r in ok)
    assert ok[0]["request_id"] == "grpc-unit-1"
    assert KEY not in "\n".join(r.getMessage() + str(r.__dict__) for r in caplog.records)
