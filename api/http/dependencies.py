"""FastAPI dependencies: the objects created once at startup, handed to routes per request."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from api.inference.backend import InferenceBackend
from api.inference.service import PredictionService
from api.settings import Settings


def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_model(request: Request) -> InferenceBackend:
    return request.app.state.model


def get_prediction_service(request: Request) -> PredictionService:
    return request.app.state.prediction_service


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
ModelDep = Annotated[InferenceBackend, Depends(get_model)]
PredictionServiceDep = Annotated[PredictionService, Depends(get_prediction_service)]
