"""The HeadCT-Serve gateway: FastAPI app factory.

Run with `uvicorn api.main:app` (settings from `HEADCT_*` environment variables) or `python -m api`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST

from api import metrics
from api.auth import KEY_LIMIT_RESPONSE, UNAUTHORIZED_RESPONSE, predict_slot, require_api_key
from api.grpc.server import GrpcGateway
from api.http.request_context import RequestContextMiddleware
from api.http.routers import health, models, predict, studies
from api.inference.service import PredictionService
from api.inference.triton import TritonModel
from api.lifecycle import Lifecycle
from api.logging_config import configure_logging
from api.problems import install_problem_handlers
from api.settings import Settings, get_settings
from headct.model_card import SYNTHETIC_DEMO_NOTICE


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_logging(settings.log_level, settings.log_format)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        model = TritonModel(
            settings.triton_grpc_url,
            settings.model_name,
            settings.model_version,
            timeout_s=settings.inference_timeout_s,
            retry_after_s=settings.retry_after_s,
            shared_memory=settings.triton_shared_memory,
        )
        app.state.settings = settings
        app.state.model = model
        service = PredictionService(model, settings)
        app.state.prediction_service = service
        await service.start()  # the preprocessing processes (api/inference/workers.py)
        grpc_gateway = GrpcGateway(service, settings) if settings.grpc_enabled else None
        if grpc_gateway is not None:
            await grpc_gateway.start()
        # SIGTERM: stop admitting, readiness off, wait for in-flight, then uvicorn exits (api/lifecycle.py).
        lifecycle = Lifecycle(
            service.admission,
            grace_s=settings.shutdown_grace_s,
            delay_s=settings.shutdown_delay_s,
            on_drain=[grpc_gateway.health.enter_graceful_shutdown] if grpc_gateway is not None else [],
        )
        app.state.lifecycle = lifecycle
        lifecycle.install()
        try:
            yield
        finally:
            lifecycle.uninstall()
            if grpc_gateway is not None:
                await grpc_gateway.stop(lifecycle.remaining_s())
            await service.close()
            await model.close()
            metrics.mark_process_dead()

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

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    app.include_router(health.router)
    # API keys (when configured) guard the /v1 routes only: probes and /metrics stay open.
    app.include_router(
        models.router, dependencies=[Depends(require_api_key)], responses=UNAUTHORIZED_RESPONSE
    )
    for prediction in (predict.router, studies.router):
        app.include_router(
            prediction,
            dependencies=[Depends(predict_slot)],
            responses={**UNAUTHORIZED_RESPONSE, **KEY_LIMIT_RESPONSE},
        )
    # Outermost of ours: it sees the final status, also of requests that raise.
    app.add_middleware(RequestContextMiddleware)
    return app


app = create_app()
