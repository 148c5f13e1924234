"""Start the REAL Triton binary and REAL gateway processes for the integration, hostile-input, security
and fault suites: free ports on 127.0.0.1, the production entry point (`python -m api`), logs to files the
leak checks read, and the process tree for RSS checks. The one place the suites start processes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from benchmarks.memory import children_by_parent, tree_memory_kib
from headct import contract
from headct.triton_local import LocalTriton, TritonPorts, free_port, prepare_triton_home

ROOT = Path(__file__).resolve().parents[1]
# Overridable so a developer can point the suites at another export; `make test` uses the defaults.
REPOSITORY = Path(os.environ.get("HEADCT_TEST_REPOSITORY", ROOT / "model_repository"))
CHECKPOINTS = Path(os.environ.get("HEADCT_TEST_CHECKPOINTS", ROOT / "build" / "demo" / "checkpoints"))
MODEL_NAME = contract.DEFAULT_MODEL_NAME

__all__ = [
    "CHECKPOINTS",
    "MODEL_NAME",
    "REPOSITORY",
    "ROOT",
    "Gateway",
    "children_by_parent",
    "free_port",
    "process_tree_rss_kib",
    "running_gateway",
    "running_triton",
    "start_gateway",
    "start_triton",
]


def start_triton(repository: Path, log_path: Path, ports: TritonPorts | None = None) -> LocalTriton:
    """A started (not yet ready) tritonserver on `repository`; the caller waits and stops it."""
    server = LocalTriton(
        home=prepare_triton_home(ROOT / "build" / "tritonserver"),
        repository=repository,
        ports=ports or TritonPorts.free(),
        log_path=log_path,
    )
    server.start()
    return server


@dataclass
class Gateway:
    """One uvicorn gateway subprocess, its ports and the file its stdout+stderr go to."""

    process: subprocess.Popen[bytes]
    url: str
    grpc_port: int
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.is_file() else ""

    def wait_live(self, timeout_s: float = 60.0, *, ready: bool = True) -> None:
        """Until /readyz (or /livez when `ready` is False) answers 200; fail with the log otherwise."""
        path = "/readyz" if ready else "/livez"
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.process.returncode}:\n{self.log_text()}")
            try:
                if httpx.get(f"{self.url}{path}", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"gateway {path} not 200 after {timeout_s:.0f} s:\n{self.log_text()}")
            time.sleep(0.3)

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_gateway(triton: LocalTriton, log_path: Path, **settings: str) -> Gateway:
    """`python -m api` (the production entry point) talking to `triton`; `settings` are extra
    ``HEADCT_*`` variables. Returns at once: call `wait_live`, or use `running_gateway`."""
    port, grpc_port = free_port(), free_port()
    env = dict(os.environ)
    env.update(
        HEADCT_TRITON_GRPC_URL=f"127.0.0.1:{triton.ports.grpc}",
        HEADCT_MODEL_NAME=MODEL_NAME,
        HEADCT_HOST="127.0.0.1",
        HEADCT_PORT=str(port),
        HEADCT_GRPC_PORT=str(grpc_port),
        HEADCT_MAX_UPLOAD_BYTES=str(64 << 20),
    )
    env.update(settings)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "api"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    return Gateway(process, f"http://127.0.0.1:{port}", grpc_port, log_path, env)


@contextlib.contextmanager
def running_gateway(
    triton: LocalTriton, log_path: Path, *, ready_timeout_s: float = 90.0, **settings: str
) -> Iterator[Gateway]:
    """A ready gateway for the `with` block; stopped (SIGTERM, then kill) after it."""
    gateway = start_gateway(triton, log_path, **settings)
    try:
        gateway.wait_live(ready_timeout_s)
        yield gateway
    finally:
        gateway.stop()


@contextlib.contextmanager
def running_triton(repository: Path, log_path: Path, *models: str) -> Iterator[LocalTriton]:
    """A tritonserver with `models` (default: the demo model) ready, for the `with` block."""
    if not (repository / MODEL_NAME / "config.pbtxt").is_file():
        raise FileNotFoundError(
            f"{repository / MODEL_NAME} is missing: run `make test`, which builds the demo model first"
        )
    server = start_triton(repository, log_path)
    try:
        for model in models or (MODEL_NAME,):
            server.wait_ready(model)
        yield server
    finally:
        server.stop()


def process_tree_rss_kib(pid: int) -> int:
    """VmRSS (KiB) of `pid` plus all its descendants (a preprocessing process pool included)."""
    rss_kib, _, _ = tree_memory_kib(pid, pss=False)
    return rss_kib
