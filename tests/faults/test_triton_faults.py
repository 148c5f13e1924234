"""Triton failures seen through a running gateway (issue 5, item 3): a slow model gets 504 at the
deadline; Triton killed under load gets 503 quickly (never a hang) and /readyz false; Triton
restarted, the gateway recovers by itself. Recovery time is printed (pytest -s) for the closing note.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from tests.faults.conftest import SLOW_MODEL_SLEEP_S, TritonHandle, gateway_on
from tests.faults.slow_model import SLOW_MODEL_NAME
from tests.hostile.corpus import valid_nifti
from tests.stack import LocalGateway

pytestmark = pytest.mark.integration

OCTET = {"Content-Type": "application/octet-stream"}
#: The kill test's hang guard per request: the fault gateway's request deadline (30 s) plus margin.
HANG_GUARD_S = 45.0
#: Recovery must happen by itself well within this (gRPC reconnect back-off is capped far below).
RECOVERY_GUARD_S = 120.0
FIGURES: dict[str, float] = {}


@pytest.fixture(scope="module")
def scan() -> bytes:
    return valid_nifti()


@pytest.fixture(scope="module")
def inference_timeout_gateway(
    fault_triton: TritonHandle, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalGateway]:
    yield from gateway_on(
        fault_triton,
        tmp_path_factory,
        "slow-inference-gateway",
        HEADCT_MODEL_NAME=SLOW_MODEL_NAME,
        HEADCT_INFERENCE_TIMEOUT_S="2",
    )


@pytest.fixture(scope="module")
def request_deadline_gateway(
    fault_triton: TritonHandle, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalGateway]:
    yield from gateway_on(
        fault_triton,
        tmp_path_factory,
        "slow-deadline-gateway",
        HEADCT_MODEL_NAME=SLOW_MODEL_NAME,
        HEADCT_REQUEST_TIMEOUT_S="4",
    )


def _timed_post(url: str, scan: bytes) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = httpx.post(f"{url}/v1/predict", content=scan, headers=OCTET, timeout=HANG_GUARD_S)
    return response, time.monotonic() - started


def test_slow_model_gets_504_inference_timeout(inference_timeout_gateway: LocalGateway, scan: bytes) -> None:
    """HEADCT_INFERENCE_TIMEOUT_S=2 against a model that takes 20 s: 504 at the timeout, not after 20 s."""
    response, elapsed = _timed_post(inference_timeout_gateway.url, scan)
    assert response.status_code == 504, response.text
    assert response.json()["code"] == "inference_timeout"
    assert 2.0 * 0.9 <= elapsed < SLOW_MODEL_SLEEP_S, elapsed
    FIGURES["inference_timeout_504_after_s"] = round(elapsed, 2)


def test_slow_model_gets_504_deadline_exceeded(request_deadline_gateway: LocalGateway, scan: bytes) -> None:
    """HEADCT_REQUEST_TIMEOUT_S=4 (queue + preprocessing + inference) against the 20 s model."""
    response, elapsed = _timed_post(request_deadline_gateway.url, scan)
    assert response.status_code == 504, response.text
    assert response.json()["code"] == "deadline_exceeded"
    assert 4.0 * 0.9 <= elapsed < SLOW_MODEL_SLEEP_S, elapsed
    FIGURES["deadline_exceeded_504_after_s"] = round(elapsed, 2)


@dataclass
class Outcome:
    started: float
    finished: float
    status: int | str
    retry_after: str | None = None
    code: str | None = None


def _load(url: str, scan: bytes, stop: threading.Event, outcomes: list[Outcome]) -> None:
    with httpx.Client(base_url=url, timeout=HANG_GUARD_S) as client:
        while not stop.is_set():
            started = time.monotonic()
            try:
                response = client.post("/v1/predict", content=scan, headers=OCTET)
            except httpx.TimeoutException:
                outcomes.append(Outcome(started, time.monotonic(), "hang"))
                continue
            except httpx.TransportError as error:
                outcomes.append(Outcome(started, time.monotonic(), type(error).__name__))
                continue
            code = response.json().get("code") if response.status_code != 200 else None
            outcomes.append(
                Outcome(
                    started, time.monotonic(), response.status_code, response.headers.get("retry-after"), code
                )
            )
            if response.status_code != 200:
                time.sleep(0.2)  # a well-behaved client backs off a little


def _wait(condition: object, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.2)
    return False


def test_triton_killed_under_load_then_restarted(
    fault_triton: TritonHandle, fault_gateway: LocalGateway, fault_client: httpx.Client, scan: bytes
) -> None:
    assert fault_client.post("/v1/predict", content=scan, headers=OCTET).status_code == 200  # warm
    outcomes: list[Outcome] = []
    stop = threading.Event()
    workers = [
        threading.Thread(target=_load, args=(fault_gateway.url, scan, stop, outcomes), daemon=True)
        for _ in range(3)
    ]
    for worker in workers:
        worker.start()
    try:
        assert _wait(lambda: sum(o.status == 200 for o in outcomes) >= 2, HANG_GUARD_S), outcomes
        killed_at = time.monotonic()
        fault_triton.kill()
        # load keeps coming while Triton is gone
        assert _wait(lambda: sum(o.started > killed_at for o in outcomes) >= 6, HANG_GUARD_S), outcomes
    finally:
        stop.set()
        for worker in workers:
            worker.join(HANG_GUARD_S + 5)
    assert not any(worker.is_alive() for worker in workers), "a client is still waiting: a hang"
    statuses = {o.status for o in outcomes}
    assert statuses <= {200, 503}, [o for o in outcomes if o.status not in (200, 503)]
    after = [o for o in outcomes if o.started > killed_at]
    assert after and all(o.status == 503 for o in after), after
    assert all(o.retry_after and o.code == "model_unavailable" for o in outcomes if o.status == 503)
    in_flight = [o for o in outcomes if o.started <= killed_at < o.finished]
    FIGURES["requests_during_outage"] = len(after)
    FIGURES["in_flight_at_kill"] = len(in_flight)
    FIGURES["max_503_latency_s"] = round(max(o.finished - o.started for o in outcomes if o.status == 503), 2)
    readyz = httpx.get(f"{fault_gateway.url}/readyz", timeout=10)
    assert readyz.status_code == 503, readyz.text
    assert httpx.get(f"{fault_gateway.url}/livez", timeout=10).status_code == 200

    # Triton comes back (a rescheduled pod): the gateway must find it again without a restart.
    ready_at = fault_triton.start()
    recovered_at: float | None = None
    deadline = ready_at + RECOVERY_GUARD_S
    while time.monotonic() < deadline:
        response = fault_client.post("/v1/predict", content=scan, headers=OCTET)
        if response.status_code == 200:
            recovered_at = time.monotonic()
            break
        assert response.status_code == 503, response.text
        time.sleep(0.5)
    assert recovered_at is not None, f"no 200 within {RECOVERY_GUARD_S:.0f} s of Triton being ready again"
    FIGURES["recovery_after_triton_ready_s"] = round(recovered_at - ready_at, 2)
    assert httpx.get(f"{fault_gateway.url}/readyz", timeout=10).status_code == 200
    print(f"\nfault figures: {FIGURES}")
