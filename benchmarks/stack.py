"""The system under test: our own tritonserver and gateway processes on free ports of 127.0.0.1.

Free ports (never the defaults) so the benchmark can run beside `make serve`. Gateways are started with
explicit settings (batching on/off, preprocessing workers, admission limits large enough that the
benchmark's own concurrency is never rejected); unknown `HEADCT_*` variables are ignored by the settings.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from headct import contract
from headct.triton_local import LocalTriton, TritonPorts, free_port, prepare_triton_home

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


@dataclass
class Gateway:
    """One `uvicorn api.main:app` process (plus whatever workers it forks) bound to a free port."""

    options: GatewayOptions
    triton_grpc_url: str
    log_path: Path
    model_name: str = contract.DEFAULT_MODEL_NAME
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = dict(os.environ)
        env.update(
            HEADCT_TRITON_GRPC_URL=self.triton_grpc_url,
            HEADCT_MODEL_NAME=self.model_name,
            HEADCT_GRPC_PORT=str(free_port()),
            **self.options.environment(),
        )
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "uvicorn",
                    "api.main:app",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--log-level",
                    "warning",
                ],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def wait_ready(self, timeout_s: float = 90.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/readyz", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.3)
        raise TimeoutError(f"gateway not ready after {timeout_s:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path.is_file():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
