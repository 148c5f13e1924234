"""Gateway guards configured by settings, against a running gateway + Triton: API keys (401), upload
limits (HEADCT_MAX_ARCHIVE_MEMBERS, HEADCT_MAX_UNCOMPRESSED_BYTES, HEADCT_MAX_MEMBER_BYTES,
HEADCT_MAX_COMPRESSION_RATIO, HEADCT_MAX_VOXELS -> 413 / 422), SIGTERM draining (503
``shutting_down``, in-flight requests complete, the process exits within the grace period) and a
preprocessing worker killed mid-scan (503 ``preprocessing_worker_lost``, then the pool recovers).

Kept apart from the hostile corpus because each guard needs a gateway started with its own settings.
Admission control (429 ``gateway_busy``) is proven by tests/integration/test_lifecycle.py and
tests/faults/test_overload.py.
"""

from __future__ import annotations

import gzip
import io
import os
import signal
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest

from api.grpc.proto.headct.v1 import headct_pb2, headct_pb2_grpc
from demo.dicom_writer import multipart_body, to_bytes
from demo.synthetic_head import make_head, to_nifti
from tests.faults.conftest import SLEEPY_MODEL_SLEEP_S, TritonHandle, gateway_on
from tests.faults.slow_model import SLEEPY_MODEL_NAME
from tests.hostile.corpus import series, valid_nifti, zip_of
from tests.stack import LocalGateway, children_by_parent

pytestmark = pytest.mark.integration

OCTET = {"Content-Type": "application/octet-stream"}
ZIP = {"Content-Type": "application/zip"}
API_KEY = "guard-test-key-6a1f0c"
HANG_GUARD_S = 60.0


def _problem(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["code"] == code, body
    return body


# ---- API keys -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed_gateway(
    fault_triton: TritonHandle, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalGateway]:
    yield from gateway_on(
        fault_triton, tmp_path_factory, "keyed-gateway", HEADCT_API_KEYS=f"other-key,{API_KEY}"
    )


def test_api_keys(keyed_gateway: LocalGateway) -> None:
    scan = valid_nifti()
    with httpx.Client(base_url=keyed_gateway.url, timeout=HANG_GUARD_S) as client:
        missing = client.post("/v1/predict", content=scan, headers=OCTET)
        _problem(missing, 401, "missing_api_key")
        assert missing.headers.get("www-authenticate", "").startswith("Bearer")
        _problem(
            client.post("/v1/predict", content=scan, headers={**OCTET, "X-API-Key": "nope"}),
            401,
            "invalid_api_key",
        )
        assert (
            client.post("/v1/predict", content=scan, headers={**OCTET, "X-API-Key": API_KEY}).status_code
            == 200
        )
        bearer = {**OCTET, "Authorization": f"Bearer {API_KEY}"}
        assert client.post("/v1/predict", content=scan, headers=bearer).status_code == 200
        assert client.get("/livez").status_code == 200  # probes stay open
        metrics = client.get("/metrics").text
    with grpc.insecure_channel(f"127.0.0.1:{keyed_gateway.grpc_port}") as channel:
        stub = headct_pb2_grpc.HeadCTStub(channel)
        request = headct_pb2.PredictRequest(scan=scan)
        with pytest.raises(grpc.RpcError) as raised:
            stub.Predict(request, timeout=HANG_GUARD_S)
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
        answer = stub.Predict(request, timeout=HANG_GUARD_S, metadata=(("x-api-key", API_KEY),))
        assert answer.findings
    # the key itself is never logged nor exported (a key id is)
    assert API_KEY not in keyed_gateway.log_text()
    assert API_KEY not in metrics


# ---- upload limits (helper-7) ------------------------------------------------------------------


@pytest.fixture(scope="module")
def limited_gateway(
    fault_triton: TritonHandle, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalGateway]:
    yield from gateway_on(
        fault_triton,
        tmp_path_factory,
        "limited-gateway",
        HEADCT_MAX_ARCHIVE_MEMBERS="20",
        HEADCT_MAX_UNCOMPRESSED_BYTES=str(1 << 20),
        HEADCT_MAX_MEMBER_BYTES=str(600 << 10),
        HEADCT_MAX_COMPRESSION_RATIO="20",
        HEADCT_MAX_VOXELS="10000",
    )


def _zip(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def test_upload_limit_settings(limited_gateway: LocalGateway) -> None:
    noise = np.random.default_rng(5).integers(0, 256, 2 << 20, dtype=np.uint8).tobytes()
    with httpx.Client(base_url=limited_gateway.url, timeout=HANG_GUARD_S) as client:

        def post(body: bytes, headers: dict[str, str]) -> httpx.Response:
            return client.post("/v1/predict", content=body, headers=headers)

        datasets = series()
        found = _problem(post(zip_of(datasets), ZIP), 413, "payload_too_large")
        assert found["field"] == "zip_entries" and found["observed"] == len(datasets)
        body, content_type = multipart_body([to_bytes(ds) for ds in datasets])
        found = _problem(post(body, {"Content-Type": content_type}), 413, "payload_too_large")
        assert found["field"] == "multipart_parts"
        found = _problem(
            post(_zip({"a": noise[: 900 << 10], "b": noise[900 << 10 : 1800 << 10]}), ZIP),
            413,
            "payload_too_large",
        )
        assert found["field"] == "uncompressed_bytes"
        found = _problem(post(_zip({"a": noise[: 700 << 10]}), ZIP), 413, "payload_too_large")
        assert found["field"] == "zip_entry_bytes"
        found = _problem(post(_zip({"a": bytes(500 << 10)}), ZIP), 413, "payload_too_large")
        assert found["field"] == "compression_ratio"
        _problem(post(valid_nifti(), OCTET), 422, "volume_too_large")


# ---- admission control (helper-6) --------------------------------------------------------------


# ---- SIGTERM draining ----------------------------------------------------------------


def test_sigterm_lets_in_flight_requests_finish_and_refuses_new_ones(
    fault_triton: TritonHandle, tmp_path_factory: pytest.TempPathFactory
) -> None:
    grace_s = 20.0
    gateways = gateway_on(
        fault_triton,
        tmp_path_factory,
        "draining-gateway",
        HEADCT_MODEL_NAME=SLEEPY_MODEL_NAME,
        HEADCT_SHUTDOWN_GRACE_S=str(grace_s),
        HEADCT_SHUTDOWN_DELAY_S="2",
    )
    gateway = next(gateways)
    try:
        scan = valid_nifti()
        in_flight: list[httpx.Response] = []
        thread = threading.Thread(
            target=lambda: in_flight.append(
                httpx.post(f"{gateway.url}/v1/predict", content=scan, headers=OCTET, timeout=HANG_GUARD_S)
            )
        )
        thread.start()
        deadline = time.monotonic() + HANG_GUARD_S
        # admitted and past preprocessing: the sleepy model holds it for SLEEPY_MODEL_SLEEP_S
        while "headct_inflight_requests 1.0" not in httpx.get(f"{gateway.url}/metrics", timeout=10).text:
            assert time.monotonic() < deadline, "the request never became in flight"
            time.sleep(0.1)
        signalled = time.monotonic()
        gateway.process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        refused = httpx.post(f"{gateway.url}/v1/predict", content=scan, headers=OCTET, timeout=HANG_GUARD_S)
        _problem(refused, 503, "shutting_down")
        assert int(refused.headers["retry-after"]) >= 1
        thread.join(HANG_GUARD_S)
        assert in_flight and in_flight[0].status_code == 200, in_flight and in_flight[0].text
        gateway.process.wait(timeout=grace_s + 15)
        assert time.monotonic() - signalled <= grace_s + 15
        assert grace_s > SLEEPY_MODEL_SLEEP_S
    finally:
        gateway.stop()
        next(gateways, None)


# ---- a preprocessing worker dies (api/inference/workers.py) -----------------------------------------


@pytest.fixture(scope="module")
def single_worker_gateway(
    fault_triton: TritonHandle, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalGateway]:
    yield from gateway_on(
        fault_triton, tmp_path_factory, "single-worker-gateway", HEADCT_PREPROCESS_WORKERS="1"
    )


def _pool_workers(gateway_pid: int) -> list[int]:
    """The gateway's spawned pool workers (not multiprocessing's resource tracker)."""
    workers = []
    for pid in children_by_parent().get(gateway_pid, []):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if b"multiprocessing" in cmdline and b"resource_tracker" not in cmdline:
            workers.append(pid)
    return workers


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def test_killed_preprocessing_worker_fails_its_request_cleanly_and_the_pool_recovers(
    single_worker_gateway: LocalGateway,
) -> None:
    # A full 1 mm head as NIfTI.gz (~0.1 s of worker CPU: inflating 43 MB, then preprocessing), killed
    # at the worker's first 10 ms of CPU on it, so the kill lands mid-scan. (Uncompressed, the scan
    # took ~55 ms here once decoding and validation got faster: a kill at 50 ms could land after it.)
    head = to_nifti(make_head(np.random.default_rng(5), hemorrhage=True, edema=False)).to_bytes()
    scan = gzip.compress(head, compresslevel=1)
    url = single_worker_gateway.url
    assert (
        httpx.post(f"{url}/v1/predict", content=scan, headers=OCTET, timeout=HANG_GUARD_S).status_code == 200
    )
    (worker,) = _pool_workers(single_worker_gateway.pid)
    idle = _cpu_ticks(worker)
    result: list[httpx.Response] = []
    thread = threading.Thread(
        target=lambda: result.append(
            httpx.post(f"{url}/v1/predict", content=scan, headers=OCTET, timeout=HANG_GUARD_S)
        )
    )
    thread.start()
    deadline = time.monotonic() + HANG_GUARD_S
    while _cpu_ticks(worker) < idle + 1:  # 10 ms of CPU: it is working on our scan
        assert time.monotonic() < deadline and thread.is_alive(), "the worker never started the scan"
        time.sleep(0.005)
    os.kill(worker, signal.SIGKILL)
    thread.join(HANG_GUARD_S)
    assert result, "the request hung after its worker died"
    _problem(result[0], 503, "preprocessing_worker_lost")
    assert int(result[0].headers["retry-after"]) >= 1
    again = httpx.post(f"{url}/v1/predict", content=scan, headers=OCTET, timeout=HANG_GUARD_S)
    assert again.status_code == 200, again.text
    assert worker not in _pool_workers(single_worker_gateway.pid)
