"""Session fixtures shared by the suites that talk to a real server: one REAL tritonserver on the demo
model repository, started on first use (unit tests never start it)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from headct.local.triton import LocalTriton
from tests.stack import REPOSITORY, running_triton


@pytest.fixture(scope="session")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalTriton]:
    try:
        with running_triton(REPOSITORY, tmp_path_factory.mktemp("triton") / "tritonserver.log") as server:
            yield server
    except FileNotFoundError as missing:
        pytest.fail(str(missing))
