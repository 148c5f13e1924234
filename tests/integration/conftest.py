"""The session gateway of the integration suite: the REAL gateway (`python -m api`) on free ports of
127.0.0.1, in front of the session's REAL Triton (tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from headct.local.triton import LocalTriton
from tests.stack import CHECKPOINTS, MODEL_NAME, REPOSITORY, ROOT, LocalGateway, free_port, running_gateway

__all__ = ["CHECKPOINTS", "MODEL_NAME", "REPOSITORY", "ROOT", "free_port"]


@pytest.fixture(scope="session")
def gateway(triton: LocalTriton, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalGateway]:
    with running_gateway(triton, tmp_path_factory.mktemp("gateway") / "gateway.log") as running:
        yield running


@pytest.fixture(scope="session")
def gateway_grpc_port(gateway: LocalGateway) -> int:
    return gateway.grpc_port


@pytest.fixture(scope="session")
def gateway_url(gateway: LocalGateway) -> str:
    return gateway.url


@pytest.fixture(scope="session")
def client(gateway_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway_url, timeout=120) as session:
        yield session
