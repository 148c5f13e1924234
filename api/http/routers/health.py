"""Liveness and readiness probes."""

from __future__ import annotations

from fastapi import APIRouter

from api.http.dependencies import ModelDep, PredictionServiceDep
from api.problem_codes import MODEL_CARD_PROBLEMS
from api.problems import ProblemCode, problem_responses

router = APIRouter(tags=["health"])


@router.get("/livez", summary="The gateway process is alive")
async def livez() -> dict[str, str]:
    return {"status": "alive"}


@router.get(
    "/readyz",
    summary="Triton is reachable and the model is ready (warm)",
    responses=problem_responses(ProblemCode.SHUTTING_DOWN, *MODEL_CARD_PROBLEMS),
)
async def readyz(model: ModelDep, service: PredictionServiceDep) -> dict[str, str]:
    if service.admission.draining:  # SIGTERM received: take this instance out of rotation
        raise service.admission.shutting_down()
    if not await model.is_ready():
        raise model.unavailable(f"model {model.model_name!r} is not ready on Triton")
    card = await model.card()
    return {"status": "ready", "model": card.name, "version": card.model_version}
