"""The gRPC front end (`headct.v1.HeadCT`, see api/grpc/proto/headct/v1/headct.proto), served from the same
process and event loop as REST, sharing its Triton connection, prediction service and error codes.

Also serves the standard `grpc.health.v1` health service (status follows the model's readiness and its
card check, as /readyz) and server reflection.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from api import metrics
from api.auth import ANONYMOUS, keyring
from api.grpc.interceptors import call_notes, interceptors
from api.grpc.problems import abort_with_problem, grpc_status
from api.grpc.proto.headct.v1 import headct_pb2, headct_pb2_grpc
from api.http.routers.models import model_info
from api.inference.lanes import resolve_lane
from api.inference.service import PredictionService, ScanRequest
from api.problems import ProblemCode, ProblemError
from api.request_id import sanitize_request_id
from api.schemas import PredictResponse
from api.settings import Settings

SERVICE_NAME = headct_pb2.DESCRIPTOR.services_by_name["HeadCT"].full_name


def _to_proto(response: PredictResponse) -> headct_pb2.PredictResponse:
    timings = response.timings_ms
    return headct_pb2.PredictResponse(
        request_id=response.request_id,
        model=headct_pb2.ModelRef(**response.model.model_dump()),
        findings=[headct_pb2.Finding(**finding.model_dump()) for finding in response.findings],
        embedding=response.embedding or [],
        input=headct_pb2.InputSummary(**response.input.model_dump()),
        warnings=[headct_pb2.Warning(**warning.model_dump()) for warning in response.warnings],
        timings_ms=headct_pb2.Timings(
            decode=timings.decode,
            validate=timings.validate_,
            preprocess=timings.preprocess,
            queue=timings.queue,
            infer=timings.infer,
            total=timings.total,
        ),
        notice=response.notice or "",
        priority=response.priority,
        attention={
            name: headct_pb2.AttentionMap(**attention.model_dump())
            for name, attention in (response.attention or {}).items()
        },
    )


class HeadCTServicer(headct_pb2_grpc.HeadCTServicer):
    def __init__(self, service: PredictionService, settings: Settings) -> None:
        self.service = service
        self.settings = settings

    async def _predict(
        self,
        options: headct_pb2.PredictOptions,
        chunks: AsyncIterator[bytes],
        context: grpc.aio.ServicerContext,
        route: str,
    ) -> headct_pb2.PredictResponse:
        started_at = time.perf_counter()
        metadata = dict(context.invocation_metadata() or ())
        request_id = sanitize_request_id(options.request_id or str(metadata.get("x-request-id", "")))
        context.set_trailing_metadata((("x-request-id", request_id),))
        notes = call_notes(context)
        status = "OK"
        try:
            lane = resolve_lane(
                options.priority or None, keyring(self.settings).lanes(notes.api_key or ANONYMOUS)
            )
            notes.lane = lane.value
            handled = await self.service.handle(
                ScanRequest(
                    chunks=chunks,
                    content_type=options.content_type,
                    request_id=request_id,
                    started_at=started_at,
                    tasks=list(options.tasks),
                    include=[
                        extra
                        for extra, asked in (
                            ("embedding", options.include_embedding),
                            ("attention", options.include_attention),
                        )
                        if asked
                    ],
                    series_uid=options.series_uid or None,
                    spool_prefix="headct-grpc-",
                    lane=lane,
                )
            )
            notes.timings_ms = handled.timings_ms
            return _to_proto(handled.response)
        except ProblemError as error:
            status = grpc_status(error).name
            await abort_with_problem(context, error, request_id)
            raise  # unreachable: abort raises
        finally:
            metrics.REQUESTS.labels(route=route, status=status).inc()
            metrics.REQUEST_DURATION.labels(route=route).observe(time.perf_counter() - started_at)

    async def Predict(
        self, request: headct_pb2.PredictRequest, context: grpc.aio.ServicerContext
    ) -> headct_pb2.PredictResponse:
        async def single() -> AsyncIterator[bytes]:
            yield request.scan

        return await self._predict(request.options, single(), context, f"/{SERVICE_NAME}/Predict")

    async def PredictStream(
        self, request_iterator: AsyncIterator[headct_pb2.PredictChunk], context: grpc.aio.ServicerContext
    ) -> headct_pb2.PredictResponse:
        iterator = aiter(request_iterator)
        first = await anext(iterator, None)
        if first is None or first.WhichOneof("part") != "options":
            error = ProblemError(
                ProblemCode.INVALID_REQUEST,
                "the first PredictChunk must carry the options, the following ones the data",
                field="options",
            )
            await abort_with_problem(context, error, sanitize_request_id())

        async def data() -> AsyncIterator[bytes]:
            async for chunk in iterator:
                if chunk.WhichOneof("part") != "data":
                    raise ProblemError(
                        ProblemCode.INVALID_REQUEST, "options may only be sent once, first", field="options"
                    )
                yield chunk.data

        assert first is not None
        return await self._predict(first.options, data(), context, f"/{SERVICE_NAME}/PredictStream")

    async def GetModel(
        self, request: headct_pb2.GetModelRequest, context: grpc.aio.ServicerContext
    ) -> headct_pb2.ModelInfo:
        try:
            info = model_info(await self.service.model.card())
        except ProblemError as error:
            await abort_with_problem(context, error, sanitize_request_id())
            raise
        return headct_pb2.ModelInfo(
            name=info.name,
            version=info.version,
            triton_version=info.triton_version,
            sha256=info.sha256,
            synthetic_demo=info.synthetic_demo,
            notice=info.notice,
            tasks=[headct_pb2.TaskInfo(**task.model_dump(exclude_none=True)) for task in info.tasks],
            input_shape=info.input.shape,
            input_datatype=info.input.datatype,
            preprocessing_version=info.preprocessing_version,
            embedding_dim=info.embedding_dim,
            max_batch_size=info.max_batch_size,
        )


# Room for the options and protobuf framing around the scan bytes in one PredictRequest.
REQUEST_OVERHEAD_BYTES = 1 << 20
# A PredictResponse is findings + at most one 768-float embedding: far below this.
MAX_RESPONSE_BYTES = 1 << 24
# How often the grpc.health.v1 status is brought in line with /readyz.
HEALTH_REFRESH_S = 2.0


class GrpcGateway:
    """The gRPC server plus a task that keeps `grpc.health.v1` in step with the model's readiness."""

    def __init__(self, service: PredictionService, settings: Settings) -> None:
        limit = settings.max_upload_bytes + REQUEST_OVERHEAD_BYTES
        self.server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", MAX_RESPONSE_BYTES),
            ],
            # API keys, the per-key limit and the outcome log line, as for REST (api/grpc/interceptors.py).
            interceptors=interceptors(settings, SERVICE_NAME),
        )
        self.service = service
        self.health = HealthServicer()
        headct_pb2_grpc.add_HeadCTServicer_to_server(HeadCTServicer(service, settings), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            self.server,
        )
        self.port = self.server.add_insecure_port(f"{settings.host}:{settings.grpc_port}")
        self._watch: asyncio.Task[None] | None = None

    async def _follow_readiness(self, interval_s: float = HEALTH_REFRESH_S) -> None:
        serving = health_pb2.HealthCheckResponse.SERVING
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        while True:
            status = serving if await self._ready() else not_serving
            await self.health.set("", status)
            await self.health.set(SERVICE_NAME, status)
            await asyncio.sleep(interval_s)

    async def _ready(self) -> bool:
        """What /readyz says: the model is ready and its card is accepted (not stale, same contract)."""
        if not await self.service.model.is_ready():
            return False
        try:
            await self.service.model.card()
        except ProblemError:
            return False
        return True

    async def start(self) -> None:
        await self.server.start()
        self._watch = asyncio.create_task(self._follow_readiness())

    async def stop(self, grace_s: float) -> None:
        if self._watch is not None:
            self._watch.cancel()
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)
