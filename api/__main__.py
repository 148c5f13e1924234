"""`python -m api`: run the gateway with uvicorn on the configured host and port.

`HEADCT_WORKERS` > 1 starts that many gateway processes on one HTTP socket, each with its own Triton
connection, preprocessing pool, admission limits (`HEADCT_MAX_INFLIGHT` and `HEADCT_MAX_QUEUE` are per
process) and gRPC server (all bind `HEADCT_GRPC_PORT` with SO_REUSEPORT, gRPC's default on Linux, and
the kernel spreads connections). Metrics stay correct across them when `PROMETHEUS_MULTIPROC_DIR` is
set (see api/metrics.py); this command empties that directory before the workers start.

SIGTERM drains first (api/lifecycle.py): the process exits within `HEADCT_SHUTDOWN_GRACE_S`.
"""

from __future__ import annotations

import os
from pathlib import Path

import uvicorn

from api.settings import get_settings


def _wipe_multiprocess_dir() -> None:
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob("*.db"):
            stale.unlink(missing_ok=True)


def main() -> None:
    settings = get_settings()
    _wipe_multiprocess_dir()
    uvicorn.run(
        "api.main:app",
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        log_level="info",
        # The app's own SIGTERM drain (api/lifecycle.py) cuts this to what is left of the grace period.
        timeout_graceful_shutdown=max(1, int(settings.shutdown_grace_s)),
    )


if __name__ == "__main__":
    main()
