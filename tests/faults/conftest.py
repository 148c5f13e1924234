"""Fixtures of the fault suite: a Triton of its own (killed and restarted by the tests, on fixed ports
so the gateways find it again) serving the demo model and two slow test models, and gateways on it."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from benchmarks.memory import process_tree
from headct.local.triton import LocalTriton, TritonPorts
from tests.faults.slow_model import SLEEPY_MODEL_NAME, SLOW_MODEL_NAME, write_fault_repository
from tests.stack import (
    MODEL_NAME,
    REPOSITORY,
    LocalGateway,
    start_gateway,
    start_triton,
)

#: How long the slow model sleeps: far beyond every deadline the tests set.
SLOW_MODEL_SLEEP_S = 20.0
#: How long the sleepy model holds a request in flight.
SLEEPY_MODEL_SLEEP_S = 3.0
#: Name prefix of the Python backend's shared-memory regions (in /dev/shm).
SHM_REGION_PREFIX = "triton_python_backend_shm_region_"


def _shm_regions(pid: int) -> list[str]:
    """The Python-backend shared-memory regions a stub process was started with (its arguments)."""
    try:
        arguments = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []
    return [a.decode() for a in arguments if a.startswith(SHM_REGION_PREFIX.encode()) and b"/" not in a]


@dataclass
class TritonHandle:
    """The current Triton process of the suite; `kill` and `restart` swap it, fixtures stop it."""

    repository: Path
    ports: TritonPorts
    log_path: Path
    server: LocalTriton | None = None

    def start(self) -> float:
        """Start Triton and wait until both models are ready; returns the monotonic time it was."""
        self.server = start_triton(self.repository, self.log_path, self.ports)
        for model in (MODEL_NAME, SLOW_MODEL_NAME, SLEEPY_MODEL_NAME):
            self.server.wait_ready(model)
        return time.monotonic()

    def _descendants(self) -> list[int]:
        assert self.server is not None and self.server.process is not None
        return process_tree(self.server.process.pid)[1:]  # the root comes first

    def kill(self) -> None:
        """SIGKILL tritonserver (a crashed or evicted pod), then its Python-backend stubs."""
        assert self.server is not None and self.server.process is not None
        stubs = self._descendants()
        regions = [region for pid in stubs for region in _shm_regions(pid)]
        self.server.process.kill()
        self.server.process.wait()
        for pid in stubs:  # the stubs notice their parent is gone; make sure they do not linger
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        # A killed Triton cannot unlink its Python-backend shared memory; do it for it (ours only).
        for region in regions:
            (Path("/dev/shm") / region).unlink(missing_ok=True)

    def stop(self) -> None:
        if self.server is None or self.server.process is None:
            return
        regions = [region for pid in self._descendants() for region in _shm_regions(pid)]
        self.server.stop(timeout_s=5.0)  # the slow model may still sleep: do not wait for it
        for region in regions:  # left behind when the stop above had to SIGKILL
            (Path("/dev/shm") / region).unlink(missing_ok=True)


@pytest.fixture(scope="session")
def fault_triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonHandle]:
    if not (REPOSITORY / MODEL_NAME / "config.pbtxt").is_file():
        pytest.fail(f"{REPOSITORY / MODEL_NAME} is missing: run `make test`, which builds the demo model")
    root = tmp_path_factory.mktemp("fault-triton")
    repository = write_fault_repository(
        REPOSITORY / MODEL_NAME,
        root / "repository",
        {SLOW_MODEL_NAME: SLOW_MODEL_SLEEP_S, SLEEPY_MODEL_NAME: SLEEPY_MODEL_SLEEP_S},
    )
    handle = TritonHandle(repository, TritonPorts.free(), root / "tritonserver.log")
    try:
        handle.start()
        yield handle
    finally:
        handle.stop()


def gateway_on(
    handle: TritonHandle, tmp_path_factory: pytest.TempPathFactory, name: str, **settings: str
) -> Iterator[LocalGateway]:
    assert handle.server is not None
    # One preprocessing worker: spawning and warming up fewer processes starts the gateway faster on
    # a small CI machine; these tests are about Triton and the guards, not preprocessing throughput.
    settings.setdefault("HEADCT_PREPROCESS_WORKERS", "1")
    gateway = start_gateway(handle.server, tmp_path_factory.mktemp(name) / "gateway.log", **settings)
    try:
        gateway.wait_ready()
        yield gateway
    finally:
        gateway.stop()


@pytest.fixture(scope="module")
def fault_gateway(
    fault_triton: TritonHandle, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalGateway]:
    """A gateway on the demo model; its deadline is the hang guard of the kill test."""
    yield from gateway_on(fault_triton, tmp_path_factory, "fault-gateway", HEADCT_REQUEST_TIMEOUT_S="30")


@pytest.fixture(scope="module")
def fault_client(fault_gateway: LocalGateway) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fault_gateway.url, timeout=60.0) as session:
        yield session
