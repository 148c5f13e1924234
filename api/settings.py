"""Gateway settings, read from the environment (prefix `HEADCT_`) or a `.env` file."""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from headct import contract


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HEADCT_", env_file=".env", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8080
    grpc_enabled: bool = True
    grpc_port: int = 50051
    shutdown_grace_s: float = Field(default=20.0, ge=0, description="in-flight gRPC calls get this long")

    triton_grpc_url: str = "127.0.0.1:8001"
    model_name: str = contract.DEFAULT_MODEL_NAME
    model_version: str = Field(default="", description="Triton model version; empty = the latest")
    inference_timeout_s: float = Field(default=30.0, gt=0)

    max_upload_bytes: int = Field(default=1 << 30, gt=0, description="larger bodies get 413")
    spool_dir: str | None = Field(default=None, description="where uploads are spooled; default: system temp")
    preprocess_concurrency: int = Field(
        default=2, ge=1, description="scans decoded/preprocessed at once (CPU-bound; size to cores)"
    )
    retry_after_s: int = Field(default=5, ge=1, description="Retry-After sent with 503 while not ready")


@lru_cache
def get_settings() -> Settings:
    return Settings()
