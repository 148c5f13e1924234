"""The inference path and the process lifecycle against the real Triton, with extra gateway processes
started by `python -m api` with small limits: micro-batched answers equal unbatched ones, a full
gateway answers 429 with Retry-After, several uvicorn workers report merged metrics, and no
preprocessing worker outlives its gateway. SIGTERM draining: tests/faults/test_gateway_guards.py;
Triton down and back: tests/faults/test_triton_faults.py."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from benchmarks.memory import process_tree
from demo.synthetic_head import make_head, to_nifti
from headct.local.triton import LocalTriton
from tests.stack import LocalGateway, start_gateway

pytestmark = pytest.mark.integration

GRACE_S = 20.0
OCTET = {"Content-Type": "application/octet-stream"}


def start(triton: LocalTriton, log_path: Path, **settings: str) -> LocalGateway:
    """A ready gateway with `settings` given as lower-case field names (``max_inflight="2"``)."""
    gateway = start_gateway(triton, log_path, **{f"HEADCT_{k.upper()}": v for k, v in settings.items()})
    try:
        gateway.wait_ready()
    except (RuntimeError, TimeoutError) as failure:
        stop(gateway)
        pytest.fail(str(failure))
    return gateway


def stop(gateway: LocalGateway) -> None:
    if gateway.process.poll() is None:
        gateway.process.kill()
        gateway.process.wait(timeout=30)


@pytest.fixture(scope="module")
def small(triton: LocalTriton, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalGateway]:
    """Two in flight, one queued; batches of two; a scan waits up to 1.5 s for another being preprocessed."""
    gateway = start(
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
    small: LocalGateway, client: httpx.Client, heads: list[bytes]
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


def test_a_full_gateway_answers_429_with_retry_after(small: LocalGateway, heads: list[bytes]) -> None:
    # 2 in flight + 1 queued: of 8 sent at once, some are too many even when a scan finishes early.
    responses = post_all(small.url, (heads[:4] * 2)[:8])
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


def test_metrics_are_merged_across_uvicorn_workers(
    triton: LocalTriton, tmp_path_factory: pytest.TempPathFactory
) -> None:
    directory = tmp_path_factory.mktemp("prometheus-multiproc")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)  # inherited by the gateway only
    try:
        gateway = start(
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


def _alive(pid: int) -> bool:
    """`pid` exists and is not a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _gone_within(pids: list[int], seconds: float) -> list[int]:
    """The pids of `pids` still alive after waiting up to `seconds`."""
    deadline = time.monotonic() + seconds
    while (alive := [pid for pid in pids if _alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_no_preprocessing_worker_outlives_its_gateway(
    triton: LocalTriton, tmp_path: Path, how: signal.Signals
) -> None:
    """Stopped (SIGTERM) or killed outright (SIGKILL: the OOM killer), the gateway leaves no process
    behind: its preprocessing workers (and multiprocessing's helper) exit with it."""
    gateway = start(triton, tmp_path / "gateway.log", preprocess_workers="2", grpc_enabled="false")
    try:
        descendants = [pid for pid in process_tree(gateway.pid) if pid != gateway.pid]
        assert len(descendants) >= 2, descendants  # the two workers are up (started before ready)
        gateway.process.send_signal(how)
        gateway.process.wait(timeout=GRACE_S + 10)
        assert _gone_within(descendants, 10.0) == []
    finally:
        stop(gateway)
