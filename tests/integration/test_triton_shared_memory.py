"""The model input through Triton's system shared memory, against the real Triton and gateways: the
session gateway (default `auto`, Triton on this host) has Triton read a scan where its preprocessing
worker wrote it; a gateway with it `off` sends the message and answers the same findings bit for bit; a
stopped gateway leaves no region registered in Triton or behind in /dev/shm."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from demo.synthetic_head import make_head, to_nifti
from headct.local.triton import LocalTriton
from tests.stack import running_gateway

pytestmark = pytest.mark.integration

OCTET = {"Content-Type": "application/octet-stream"}


@pytest.fixture(scope="module")
def head() -> bytes:
    return to_nifti(make_head(np.random.default_rng(2718), hemorrhage=True, edema=False)).to_bytes()


def transported(url: str, transport: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    match = re.search(rf'^headct_triton_inputs_total{{transport="{transport}"}} ([0-9.e+]+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


def answer(url: str, body: bytes) -> dict:
    response = httpx.post(
        f"{url}/v1/predict", content=body, headers=OCTET, params={"include": "embedding"}, timeout=120
    )
    assert response.status_code == 200, response.text
    result = response.json()
    return {
        "findings": {finding["name"]: finding["probability"] for finding in result["findings"]},
        "embedding": result["embedding"],
    }


def registered_regions(triton: LocalTriton) -> set[str]:
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{triton.ports.grpc}")
    try:
        status = client.get_system_shared_memory_status(as_json=True)
    finally:
        client.close()
    return set(status.get("regions", {}))


def test_the_local_triton_reads_the_input_from_shared_memory_with_the_same_answer(
    gateway_url: str, triton: LocalTriton, head: bytes, tmp_path: Path
) -> None:
    before = transported(gateway_url, "in_place")
    through_memory = answer(gateway_url, head)
    assert transported(gateway_url, "in_place") == before + 1  # alone: read from the worker's slot
    # Gateways the suite killed earlier left registrations without segments: the next gateway to
    # register its own unregisters them (the second gateway below).
    registered = registered_regions(triton)

    with running_gateway(triton, tmp_path / "gateway.log", HEADCT_TRITON_SHARED_MEMORY="off") as plain:
        through_message = answer(plain.url, head)
        assert transported(plain.url, "message") == 1
        assert transported(plain.url, "in_place") == transported(plain.url, "shared_memory") == 0
    assert through_message == through_memory  # the same tensor reached the model, bit for bit

    with running_gateway(triton, tmp_path / "second.log") as second:
        answer(second.url, head)
        assert transported(second.url, "in_place") == 1
        alive = registered_regions(triton)
        theirs = alive - registered
        assert theirs and all(Path("/dev/shm", name).exists() for name in alive)  # no dead ones left
    # Stopped: its regions are unregistered from Triton and removed from /dev/shm; the session's remain.
    assert registered_regions(triton) == alive - theirs
    assert not any(Path("/dev/shm", name).exists() for name in theirs)
