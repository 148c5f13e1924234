"""Gateway settings, read from the environment (prefix `HEADCT_`) or a `.env` file."""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from api.ingest.scan import IngestLimits
from headct import contract


def _default_preprocess_workers() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))  # the CPUs this process may use (cpusets), not the host's
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 8))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HEADCT_", env_file=".env", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8080
    grpc_enabled: bool = True
    grpc_port: int = 50051
    shutdown_grace_s: float = Field(
        default=20.0,
        ge=0,
        description="on SIGTERM: stop admitting, let in-flight REST and gRPC predictions finish, "
        "exit within this",
    )

    triton_grpc_url: str = "127.0.0.1:8001"
    model_name: str = contract.DEFAULT_MODEL_NAME
    model_version: str = Field(default="", description="Triton model version; empty = the latest")
    inference_timeout_s: float = Field(default=30.0, gt=0)
    triton_shared_memory: Literal["auto", "off"] = Field(
        default="auto",
        description="auto: when Triton runs on this host, hand it the model input through shared memory "
        "(falls back to the gRPC message when it cannot map it); off: always the message",
    )

    max_upload_bytes: int = Field(default=1 << 30, gt=0, description="larger bodies get 413")
    spool_dir: str | None = Field(default=None, description="where uploads are spooled; default: system temp")
    retry_after_s: int = Field(default=5, ge=1, description="Retry-After sent with 503 while not ready")

    # Inference path (api/inference/: service.py, workers.py, admission.py, batching.py).
    preprocess_workers: int = Field(
        default_factory=_default_preprocess_workers,
        # HEADCT_PREPROCESS_CONCURRENCY: the name before the process pool, still honoured.
        validation_alias=AliasChoices(
            "preprocess_workers", "HEADCT_PREPROCESS_WORKERS", "HEADCT_PREPROCESS_CONCURRENCY"
        ),
        ge=0,
        description="processes that decode/validate/preprocess scans (CPU-bound); default: CPU count, "
        "at most 8; 0 = a thread in the gateway process (tests, debugging)",
    )
    bulk_preprocess_workers: int | None = Field(
        default=None,
        ge=0,
        description="processes for bulk scans, apart from the others' and at a lower CPU priority "
        "(HEADCT_BULK_NICE), started with the first bulk scan; default: HEADCT_PREPROCESS_WORKERS; 0 = bulk "
        "shares the pool, on all workers but one",
    )
    bulk_nice: int = Field(
        default=10,
        ge=0,
        le=19,
        description="how much lower the bulk workers' CPU priority is (Unix nice increment): on a busy node "
        "STAT and routine preprocessing get the CPU first",
    )
    max_inflight: int = Field(
        default=16, ge=1, description="predictions being preprocessed or inferred at once per gateway process"
    )
    max_queue: int = Field(
        default=64, ge=0, description="predictions waiting for an in-flight slot; beyond it: 429 gateway_busy"
    )
    bulk_max_inflight: int | None = Field(
        default=None,
        ge=1,
        description="in-flight slots bulk predictions may hold at once; the rest stay free for STAT and "
        "routine; default: three quarters of HEADCT_MAX_INFLIGHT (at least 1)",
    )
    bulk_max_queue: int | None = Field(
        default=None,
        ge=0,
        description="bulk predictions waiting for a slot; beyond it bulk gets 429 (STAT and routine have "
        "their own HEADCT_MAX_QUEUE each); default: HEADCT_MAX_QUEUE",
    )
    busy_retry_after_s: int = Field(
        default=1, ge=1, description="Retry-After sent with 429 gateway_busy and key_concurrency_exceeded"
    )
    request_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description="deadline per prediction covering queue + preprocessing + inference (after the upload "
        "is received); 504 deadline_exceeded, and what is left of it is Triton's gRPC timeout",
    )
    batching_enabled: bool = Field(
        default=True, description="gateway micro-batching: one Triton call for scans ready at the same time"
    )
    batch_max_size: int = Field(
        default=8, ge=1, description="scans per Triton call (capped by the model's max_batch_size)"
    )
    batch_max_delay_ms: float = Field(
        default=5.0,
        ge=0,
        description="how long the first scan of a batch waits for others still being preprocessed "
        "(a scan with none on its way goes at once)",
    )

    # Lifecycle (api/lifecycle.py, api/__main__.py).
    shutdown_delay_s: float = Field(
        default=0.0,
        ge=0,
        description="after SIGTERM keep listening (readyz 503) at least this long, so load balancers "
        "stop routing here before the listener closes; counted within the grace period",
    )
    workers: int = Field(default=1, ge=1, description="uvicorn worker processes for `python -m api`")

    # API keys (api/auth.py). No key configured at all = the API is open.
    api_keys: str = Field(default="", repr=False, description="comma-separated API keys")
    api_keys_file: str | None = Field(default=None, description="file with one API key per line, # comments")
    per_key_concurrency: int = Field(default=0, ge=0, description="predictions at once per key; 0 = none")

    # Structured logs (api/logging_config.py).
    log_level: str = Field(default="INFO", description="root log level")
    log_format: Literal["json", "text"] = "json"

    # Upload limits (api/ingest/scan.py IngestLimits); see `ingest_limits`.
    max_archive_members: int = Field(default=5000, ge=1, description="zip entries / multipart parts")
    max_uncompressed_bytes: int = Field(default=4 << 30, ge=1, description="sum of zip entry sizes")
    max_member_bytes: int = Field(default=2 << 30, ge=1, description="one zip entry / multipart part")
    max_compression_ratio: float = Field(default=250.0, gt=1, description="zip inflation bound")
    max_voxels: int = Field(default=1 << 28, ge=1, description="voxels of the decoded volume")

    # PACS round trip (`POST /v1/studies/{study_uid}/predict`, api/dicomweb/). Unset URL = that route
    # answers 503 pacs_not_configured.
    dicomweb_url: str | None = Field(
        default=None,
        description="base URL of the DICOMweb server (QIDO-RS, WADO-RS, STOW-RS), e.g. "
        "http://orthanc:8042/dicom-web; unset: the studies route answers 503",
    )
    dicomweb_username: str | None = Field(default=None, description="HTTP basic auth user for the PACS")
    dicomweb_password: SecretStr | None = Field(default=None, description="HTTP basic auth password")
    dicomweb_token: SecretStr | None = Field(
        default=None, description="bearer token for the PACS (instead of username / password)"
    )
    dicomweb_credentials_dir: str | None = Field(
        default=None,
        description="a directory (a mounted Secret) with the PACS credentials as files: `username` + "
        "`password`, or `token`; read per request (a rotated Secret applies); the variables above win",
    )
    dicomweb_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description="deadline for each PACS step (search + retrieve of the study, store of the SR); "
        "beyond it: 504 pacs_timeout",
    )

    @property
    def bulk_inflight_limit(self) -> int:
        """`bulk_max_inflight`, or by default three quarters of the slots (never more than all)."""
        if self.bulk_max_inflight is not None:
            return min(self.bulk_max_inflight, self.max_inflight)
        return max(1, self.max_inflight * 3 // 4)


@lru_cache
def get_settings() -> Settings:
    return Settings()


def ingest_limits(settings: Settings) -> IngestLimits:
    """The decoders' bounds from the settings; pass the result as `decode_upload(..., limits=...)`."""
    return IngestLimits(
        max_members=settings.max_archive_members,
        max_uncompressed_bytes=settings.max_uncompressed_bytes,
        max_member_bytes=settings.max_member_bytes,
        max_compression_ratio=settings.max_compression_ratio,
        max_voxels=settings.max_voxels,
    )
