"""Session fixtures of the hostile-input and security suites: a dedicated gateway on the session Triton.

The gateway spools into a private directory (``HEADCT_SPOOL_DIR``) whose parent the security suite
watches, and writes stdout+stderr to a log file the leak checks read; both are exposed here.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from headct.local.triton import LocalTriton
from tests.stack import LocalGateway, running_gateway

#: Hang guard for one request: generous (a slow shared CI machine), but a hang fails the test.
REQUEST_TIMEOUT_S = 60.0


@pytest.fixture(scope="session")
def spool_parent(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The directory that holds the gateway's spool directory (and nothing the gateway may touch)."""
    return tmp_path_factory.mktemp("hostile-spool-parent")


@pytest.fixture(scope="session")
def spool_dir(spool_parent: Path) -> Path:
    spool = spool_parent / "spool"
    spool.mkdir()
    return spool


@pytest.fixture(scope="session")
def hostile_gateway(
    triton: LocalTriton, spool_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalGateway]:
    log_path = tmp_path_factory.mktemp("hostile-gateway") / "gateway.log"
    with running_gateway(triton, log_path, HEADCT_SPOOL_DIR=str(spool_dir)) as gateway:
        yield gateway


@pytest.fixture(scope="session")
def hostile_client(hostile_gateway: LocalGateway) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=hostile_gateway.url, timeout=REQUEST_TIMEOUT_S) as session:
        yield session


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the corpus bodies are generated (once per session, lazily)."""
    return tmp_path_factory.mktemp("hostile-corpus")
