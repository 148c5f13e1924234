"""Start the REAL tritonserver binary on the generated model repository and the REAL gateway (uvicorn in
a subprocess), both on free ports on 127.0.0.1, once per test session."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from headct import contract
from headct.triton_local import LocalTriton, TritonPorts, prepare_triton_home

ROOT = Path(__file__).resolve().parents[2]
# Overridable so a developer can point the suite at another export; `make test` uses the defaults.
REPOSITORY = Path(os.environ.get("HEADCT_TEST_REPOSITORY", ROOT / "model_repository"))
CHECKPOINTS = Path(os.environ.get("HEADCT_TEST_CHECKPOINTS", ROOT / "build" / "demo" / "checkpoints"))
MODEL_NAME = contract.DEFAULT_MODEL_NAME


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="session")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalTriton]:
    if not (REPOSITORY / MODEL_NAME / "config.pbtxt").is_file():
        pytest.fail(
            f"{REPOSITORY / MODEL_NAME} is missing: run `make test`, which builds the demo model first"
        )
    server = LocalTriton(
        home=prepare_triton_home(ROOT / "build" / "tritonserver"),
        repository=REPOSITORY,
        ports=TritonPorts(free_port(), free_port(), free_port()),
        log_path=tmp_path_factory.mktemp("triton") / "tritonserver.log",
    )
    server.start()
    try:
        server.wait_ready(MODEL_NAME)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def gateway_grpc_port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def gateway_url(
    triton: LocalTriton, gateway_grpc_port: int, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    port = free_port()
    log_path = tmp_path_factory.mktemp("gateway") / "gateway.log"
    env = dict(os.environ)
    env.update(
        HEADCT_TRITON_GRPC_URL=f"127.0.0.1:{triton.ports.grpc}",
        HEADCT_MODEL_NAME=MODEL_NAME,
        HEADCT_MAX_UPLOAD_BYTES=str(64 << 20),
        HEADCT_GRPC_PORT=str(gateway_grpc_port),
    )
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                pytest.fail(f"gateway exited with {process.returncode}:\n{log_path.read_text()}")
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"gateway not ready after 60 s:\n{log_path.read_text()}")
            time.sleep(0.3)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="session")
def client(gateway_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway_url, timeout=120) as session:
        yield session
