"""The HeadCT-Serve gateway: FastAPI app factory.

Run with `uvicorn api.main:app` (settings from `HEADCT_*` environment variables) or `python -m api`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api import metrics
from api.grpc_server import GrpcGateway
from api.prediction import PredictionService
from api.problems import install_problem_handlers
from api.routers import health, models, predict
from api.settings import Settings, get_settings
from api.triton import TritonModel
from headct.model_card import SYNTHETIC_DEMO_NOTICE

REQUEST_ID_HEADER = "X-Request-ID"
_MAX_REQUEST_ID = 128


def _request_id(request: Request) -> str:
    supplied = request.headers.get(REQUEST_ID_HEADER, "")
    # Echo a caller's id only when it is a sane token: it lands in our logs and headers.
    if 0 < len(supplied) <= _MAX_REQUEST_ID and supplied.isascii() and supplied.isprintable():
        return supplied
    return uuid.uuid4().hex


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        model = TritonModel(
            settings.triton_grpc_url,
            settings.model_name,
            settings.model_version,
            timeout_s=settings.inference_timeout_s,
            retry_after_s=settings.retry_after_s,
        )
        app.state.settings = settings
        app.state.model = model
        service = PredictionService(model, settings.preprocess_concurrency)
        app.state.prediction_service = service
        grpc_gateway = GrpcGateway(service, settings) if settings.grpc_enabled else None
        if grpc_gateway is not None:
            await grpc_gateway.start()
        try:
            yield
        finally:
            if grpc_gateway is not None:
                await grpc_gateway.stop(settings.shutdown_grace_s)
            await model.close()

    app = FastAPI(
        title="HeadCT-Serve",
        version="0.1.0",
        summary="Findings for non-contrast head CT from the FM-HCT foundation model, served by Triton.",
        description=(
            "Send one head CT scan, get per-finding probabilities back. When the served model is the "
            f"bundled demo: {SYNTHETIC_DEMO_NOTICE}"
        ),
        lifespan=lifespan,
    )
    install_problem_handlers(app)

    @app.middleware("http")
    async def request_context(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        request.state.request_id = _request_id(request)
        request.state.started_at = time.perf_counter()
        predicting = request.url.path == "/v1/predict"
        if predicting:
            metrics.INFLIGHT.inc()
        try:
            response = await call_next(request)
        finally:
            if predicting:
                metrics.INFLIGHT.dec()
        response.headers[REQUEST_ID_HEADER] = request.state.request_id
        # Label by route template, never by raw path, so scanners cannot blow up label cardinality.
        route = getattr(request.scope.get("route"), "path", "unmatched")
        if route != "/metrics":
            metrics.REQUESTS.labels(route=route, status=str(response.status_code)).inc()
            metrics.REQUEST_DURATION.labels(route=route).observe(
                time.perf_counter() - request.state.started_at
            )
        return response

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    app.include_router(health.router)
    app.include_router(models.router)
    app.include_router(predict.router)
    return app


app = create_app()
