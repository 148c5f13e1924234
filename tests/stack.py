"""Start the REAL Triton binary and REAL gateway processes for the integration, hostile-input, security
and fault suites: free ports on 127.0.0.1, the production entry point (`python -m api`), logs to files the
leak checks read, and the process tree for RSS checks. The one place the suites start processes."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from benchmarks.memory import children_by_parent, tree_memory_kib
from headct import contract
from headct.local.gateway import LocalGateway
from headct.local.triton import LocalTriton, TritonPorts, free_port, prepare_triton_home

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
    "LocalGateway",
    "children_by_parent",
    "free_port",
    "process_tree_rss_kib",
    "running_gateway",
    "running_triton",
    "start_gateway",
    "start_serve",
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


def start_gateway(triton: LocalTriton, log_path: Path, **settings: str) -> LocalGateway:
    """`python -m api` (the production entry point) talking to `triton`; `settings` are extra
    ``HEADCT_*`` variables. Returns at once: call `wait_ready`, or use `running_gateway`."""
    gateway = LocalGateway(
        f"127.0.0.1:{triton.ports.grpc}",
        settings={"HEADCT_MAX_UPLOAD_BYTES": str(64 << 20), **settings},
        model_name=MODEL_NAME,
        log_path=log_path,
    )
    gateway.start()
    return gateway


@contextlib.contextmanager
def running_gateway(
    triton: LocalTriton, log_path: Path, *, ready_timeout_s: float = 90.0, **settings: str
) -> Iterator[LocalGateway]:
    """A ready gateway for the `with` block; stopped (SIGTERM, then kill) after it."""
    gateway = start_gateway(triton, log_path, **settings)
    try:
        gateway.wait_ready(ready_timeout_s)
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


def start_serve(tmp_path: Path) -> tuple[subprocess.Popen[bytes], dict[str, int], Path]:
    """`make serve`'s launcher (`python -m headct.local.serve`) on free ports, output in `tmp_path`:
    (its process, its ports by option name, its log). Returns at once; the caller stops it."""
    names = ("port", "grpc-port", "triton-http", "triton-grpc", "triton-metrics")
    ports = {name: free_port() for name in names}
    log = tmp_path / "serve.log"
    command = [
        sys.executable, "-m", "headct.local.serve",
        "--repository", str(REPOSITORY), "--model-name", MODEL_NAME, "--host", "127.0.0.1",
        "--port", str(ports["port"]), "--grpc-port", str(ports["grpc-port"]),
        "--triton-http-port", str(ports["triton-http"]), "--triton-grpc-port", str(ports["triton-grpc"]),
        "--triton-metrics-port", str(ports["triton-metrics"]), "--triton-log", str(tmp_path / "triton.log"),
    ]  # fmt: skip
    with log.open("wb") as output:
        serve = subprocess.Popen(command, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT)
    return serve, ports, log
