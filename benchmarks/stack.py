"""The system under test: our own tritonserver and gateway processes on free ports of 127.0.0.1.

Free ports (never the defaults) so the benchmark can run beside `make serve`. Gateways are started with
explicit settings (batching on/off, preprocessing workers, admission limits large enough that the
benchmark's own concurrency is never rejected); unknown `HEADCT_*` variables are ignored by the settings.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from headct import contract
from headct.local.gateway import LocalGateway
from headct.local.triton import LocalTriton, TritonPorts, prepare_triton_home

ROOT = Path(__file__).resolve().parent.parent


def start_triton(
    repository: Path, log_dir: Path, model_name: str = contract.DEFAULT_MODEL_NAME
) -> LocalTriton:
    """Start tritonserver on free ports and wait until `model_name` is ready."""
    if not (repository / model_name / "config.pbtxt").is_file():
        raise FileNotFoundError(f"no model {model_name!r} in {repository}: run `make demo` first")
    server = LocalTriton(
        home=prepare_triton_home(ROOT / "build" / "tritonserver"),
        repository=repository,
        ports=TritonPorts.free(),
        log_path=log_dir / "tritonserver.log",
    )
    server.start()
    try:
        server.wait_ready(model_name)
    except BaseException:
        server.stop()
        raise
    return server


@dataclass(frozen=True)
class GatewayOptions:
    """Gateway settings under test (env `HEADCT_*`); batching and the pool are helper-6's settings."""

    batching: bool
    batch_max_size: int = 8
    batch_max_delay_ms: float = 5.0
    preprocess_workers: int = max(1, os.cpu_count() or 1)
    # Admission limits well above the benchmark's concurrency: we measure throughput, not rejections.
    max_inflight: int = 64
    max_queue: int = 64

    @property
    def label(self) -> str:
        return "gateway-batching-on" if self.batching else "gateway-batching-off"

    def environment(self) -> dict[str, str]:
        return {
            "HEADCT_BATCHING_ENABLED": "true" if self.batching else "false",
            "HEADCT_BATCH_MAX_SIZE": str(self.batch_max_size),
            "HEADCT_BATCH_MAX_DELAY_MS": f"{self.batch_max_delay_ms:g}",
            "HEADCT_PREPROCESS_WORKERS": str(self.preprocess_workers),
            "HEADCT_MAX_INFLIGHT": str(self.max_inflight),
            "HEADCT_MAX_QUEUE": str(self.max_queue),
            # Deadlines far beyond any run here: a shared 2-core machine can take > 60 s for 8 thin-slice
            # series, and a 504 would drop the very scans whose memory and throughput we measure.
            "HEADCT_REQUEST_TIMEOUT_S": "900",
            "HEADCT_INFERENCE_TIMEOUT_S": "300",
        }


@dataclass(frozen=True)
class Gateway:
    """A gateway under test: the settings it runs with and its `python -m api` process."""

    options: GatewayOptions
    server: LocalGateway

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def pid(self) -> int:
        return self.server.pid


def start_gateway(
    options: GatewayOptions,
    triton_grpc_url: str,
    log_path: Path,
    model_name: str = contract.DEFAULT_MODEL_NAME,
) -> Gateway:
    """Start (not yet ready: call ``server.wait_ready()``) a production gateway with `options`."""
    log_path.unlink(missing_ok=True)  # this run's log only
    server = LocalGateway(
        triton_grpc_url, settings=options.environment(), model_name=model_name, log_path=log_path
    )
    server.start()
    return Gateway(options, server)
