"""The inference path and the process lifecycle against the real Triton, with extra gateway processes
started by `python -m api` with small limits: micro-batched answers equal unbatched ones, a full
gateway answers 429 with Retry-After, SIGTERM lets in-flight predictions finish and the process exit
within the grace period, and several uvicorn workers report merged metrics."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from export.demo.synthetic_head import make_head, to_nifti
from headct.triton_local import LocalTriton, TritonPorts, prepare_triton_home
from tests.integration.conftest import MODEL_NAME, REPOSITORY, ROOT, free_port

pytestmark = pytest.mark.integration

GRACE_S = 20.0
OCTET = {"Content-Type": "application/octet-stream"}


@dataclass
class Gateway:
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_gateway(triton: LocalTriton, log_path: Path, **settings: str) -> Gateway:
    """`python -m api` (the production entry point) on a free port, with HEADCT_* overrides."""
    port = free_port()
    env = dict(os.environ)
    env.update(
        HEADCT_TRITON_GRPC_URL=f"127.0.0.1:{triton.ports.grpc}",
        HEADCT_MODEL_NAME=MODEL_NAME,
        HEADCT_HOST="127.0.0.1",
        HEADCT_PORT=str(port),
        HEADCT_GRPC_PORT=str(free_port()),
        HEADCT_MAX_UPLOAD_BYTES=str(64 << 20),
        **{f"HEADCT_{key.upper()}": value for key, value in settings.items()},
    )
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "api"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    gateway = Gateway(process, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + 60
    while True:
        if process.poll() is not None:
            pytest.fail(f"gateway exited with {process.returncode}:\n{gateway.log()}")
        try:
            if httpx.get(f"{gateway.url}/readyz", timeout=2).status_code == 200:
                return gateway
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"gateway not ready after 60 s:\n{gateway.log()}")
        time.sleep(0.2)


def stop(gateway: Gateway) -> None:
    if gateway.process.poll() is None:
        gateway.process.kill()
        gateway.process.wait(timeout=30)


@pytest.fixture(scope="module")
def small(triton: LocalTriton, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """Two in flight, one queued; batches of two go at once, a lone scan waits up to 1.5 s."""
    gateway = start_gateway(
        triton,
        tmp_path_factory.mktemp("small-gateway") / "gateway.log",
        max_inflight="2",
        max_queue="1",
        busy_retry_after_s="3",
        preprocess_workers="2",
        batch_max_size="2",
        batch_max_delay_ms="1500",
        shutdown_grace_s=str(GRACE_S),
    )
    try:
        yield gateway
    finally:
        stop(gateway)


@pytest.fixture(scope="module")
def heads() -> list[bytes]:
    rng = np.random.default_rng(7)
    return [
        to_nifti(make_head(rng, hemorrhage=flag, edema=not flag)).to_bytes()
        for flag in (True, False, True, False)
    ]


def post_all(url: str, bodies: list[bytes]) -> list[httpx.Response]:
    """POST the bodies at the same time (one thread and connection each), in order."""
    responses: list[httpx.Response | None] = [None] * len(bodies)
    errors: list[BaseException] = []

    def send(index: int) -> None:
        try:
            responses[index] = httpx.post(
                f"{url}/v1/predict", content=bodies[index], headers=OCTET, timeout=120
            )
        except BaseException as error:  # surfaced below
            errors.append(error)

    threads = [threading.Thread(target=send, args=(index,)) for index in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    return [response for response in responses if response is not None]


def metric(text: str, name: str, **labels: str) -> float:
    selector = ",".join(f'{key}="{value}"' for key, value in labels.items())
    pattern = re.escape(name + (f"{{{selector}}}" if labels else "")) + r" ([0-9.e+-]+)$"
    values = [float(match.group(1)) for match in re.finditer(pattern, text, re.MULTILINE)]
    return sum(values)


def probabilities(response: httpx.Response) -> list[float]:
    assert response.status_code == 200, response.text
    return [finding["probability"] for finding in response.json()["findings"]]


def test_concurrent_batched_predictions_equal_sequential_ones(
    small: Gateway, client: httpx.Client, heads: list[bytes]
) -> None:
    sequential = [
        probabilities(client.post("/v1/predict", content=body, headers=OCTET)) for body in heads[:2]
    ]
    before = httpx.get(f"{small.url}/metrics").text
    batched = [probabilities(response) for response in post_all(small.url, heads[:2])]
    after = httpx.get(f"{small.url}/metrics").text
    np.testing.assert_allclose(batched, sequential, rtol=0, atol=1e-5)
    assert sequential[0] != sequential[1]  # distinct scans: the split back to the callers is checked
    # One Triton call carried both scans.
    assert metric(after, "headct_batch_size_count") - metric(before, "headct_batch_size_count") == 1
    assert metric(after, "headct_batch_size_sum") - metric(before, "headct_batch_size_sum") == 2


def test_a_full_gateway_answers_429_with_retry_after(small: Gateway, heads: list[bytes]) -> None:
    responses = post_all(small.url, heads[:4])  # 2 in flight + 1 queued + at least 1 too many
    statuses = sorted(response.status_code for response in responses)
    assert 429 in statuses and set(statuses) <= {200, 429}, statuses
    assert statuses.count(200) >= 3, statuses
    refused = next(response for response in responses if response.status_code == 429)
    assert refused.headers["Retry-After"] == "3"
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.json()["code"] == "gateway_busy"
    text = httpx.get(f"{small.url}/metrics").text
    assert metric(text, "headct_rejections_total", code="gateway_busy") >= 1
    assert metric(text, "headct_inflight_requests") == 0 and metric(text, "headct_queue_depth") == 0


def test_sigterm_lets_in_flight_predictions_finish_then_exits(small: Gateway, heads: list[bytes]) -> None:
    results: list[httpx.Response] = []
    sender = threading.Thread(target=lambda: results.extend(post_all(small.url, heads[:2])))
    sender.start()
    deadline = time.monotonic() + 10
    while metric(httpx.get(f"{small.url}/metrics").text, "headct_inflight_requests") < 2:
        assert time.monotonic() < deadline, "the two predictions never got in flight"
        time.sleep(0.02)
    signalled = time.monotonic()
    small.process.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    # Draining (the pair needs the better part of a second more): still listening, so load balancers
    # see readiness fail, but refusing new work.
    ready = httpx.get(f"{small.url}/readyz", timeout=5)
    assert ready.status_code == 503 and ready.json()["code"] == "shutting_down"
    refused = httpx.post(f"{small.url}/v1/predict", content=heads[2], headers=OCTET, timeout=30)
    assert refused.status_code == 503, refused.text
    assert refused.json()["code"] == "shutting_down" and refused.headers["Retry-After"] == "5"
    assert sender.is_alive(), "the in-flight pair finished before the checks; make the scans bigger"
    sender.join(timeout=60)
    assert [response.status_code for response in results] == [200, 200], [r.text for r in results]
    small.process.wait(timeout=GRACE_S + 5)
    assert time.monotonic() - signalled < GRACE_S
    assert small.process.returncode in (0, -signal.SIGTERM), small.log()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{small.url}/livez", timeout=2)


def test_metrics_are_merged_across_uvicorn_workers(
    triton: LocalTriton, tmp_path_factory: pytest.TempPathFactory
) -> None:
    directory = tmp_path_factory.mktemp("prometheus-multiproc")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)  # inherited by the gateway only
    try:
        gateway = start_gateway(
            triton,
            tmp_path_factory.mktemp("multi-gateway") / "gateway.log",
            workers="2",
            preprocess_workers="1",
            grpc_enabled="false",
        )
    finally:
        del os.environ["PROMETHEUS_MULTIPROC_DIR"]
    try:
        for _ in range(30):  # a new connection each: both workers answer some
            assert httpx.get(f"{gateway.url}/livez", headers={"Connection": "close"}).status_code == 200
        texts = [httpx.get(f"{gateway.url}/metrics", headers={"Connection": "close"}).text for _ in range(4)]
        for text in texts:  # whichever worker answers, it reports all of them
            assert metric(text, "headct_requests_total", route="/livez", status="200") == 30
            assert metric(text, "headct_model_ready") == 1
        assert len(list(directory.glob("*.db"))) >= 2
    finally:
        gateway.process.send_signal(signal.SIGTERM)
        try:
            gateway.process.wait(timeout=GRACE_S)
        finally:
            stop(gateway)


def test_readiness_follows_triton_down_and_back_without_a_restart(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """No cached dead channel: when Triton returns, the same gateway process is ready again by itself."""
    directory = tmp_path_factory.mktemp("own-triton")
    own = LocalTriton(
        home=prepare_triton_home(ROOT / "build" / "tritonserver"),
        repository=REPOSITORY,
        ports=TritonPorts(free_port(), free_port(), free_port()),
        log_path=directory / "tritonserver.log",
    )
    own.start()
    try:
        own.wait_ready(MODEL_NAME)
        gateway = start_gateway(own, directory / "gateway.log", preprocess_workers="1", grpc_enabled="false")
        try:
            own.stop()
            down = httpx.get(f"{gateway.url}/readyz", timeout=5)
            assert down.status_code == 503 and down.json()["code"] == "model_unavailable"
            assert down.headers["Retry-After"]
            refused = httpx.post(f"{gateway.url}/v1/predict", content=b"\0" * 64, headers=OCTET, timeout=10)
            assert refused.status_code == 503 and refused.json()["code"] == "model_unavailable"
            time.sleep(3)  # a few failed reconnects: the channel backs off
            own.start()
            own.wait_ready(MODEL_NAME)
            deadline = time.monotonic() + 10
            while httpx.get(f"{gateway.url}/readyz", timeout=5).status_code != 200:
                assert time.monotonic() < deadline, "the gateway did not see Triton come back"
                time.sleep(0.2)
        finally:
            stop(gateway)
    finally:
        own.stop()
