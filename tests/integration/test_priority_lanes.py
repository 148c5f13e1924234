"""Priority lanes end to end under real load: a gateway (`python -m api`) with small limits in front of the
real Triton, saturated by bulk clients while STAT scans go through — over REST and gRPC, with per-key
lanes from a keys file, the lane in the answer, the metrics and the access log, and Triton's model
configured with the lanes' priority levels."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as tritongrpc

from api.grpc.proto.headct.v1 import headct_pb2, headct_pb2_grpc
from demo.synthetic_head import make_head, to_nifti
from headct import contract
from headct.local.triton import LocalTriton
from tests.integration.test_lifecycle import metric
from tests.stack import MODEL_NAME, LocalGateway, running_gateway

pytestmark = pytest.mark.integration

FULL_KEY = "k-lanes-full-0123456789"
BULK_KEY = "k-lanes-bulk-0123456789"
OCTET = {"Content-Type": "application/octet-stream"}
BULK_CLIENTS = 8  # 4x the gateway's two in-flight slots
STAT_SCANS = 4


@pytest.fixture(scope="module")
def lanes_gateway(triton: LocalTriton, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalGateway]:
    home = tmp_path_factory.mktemp("lanes-gateway")
    keys = home / "api-keys"
    keys.write_text(f"{FULL_KEY}\n{BULK_KEY} lanes=bulk  # the cohort team\n")
    with running_gateway(
        triton,
        home / "gateway.log",
        HEADCT_API_KEYS_FILE=str(keys),
        HEADCT_MAX_INFLIGHT="2",
        HEADCT_MAX_QUEUE="2",
        HEADCT_BULK_MAX_INFLIGHT="1",
        HEADCT_BULK_MAX_QUEUE="1",
        HEADCT_PREPROCESS_WORKERS="2",
        HEADCT_LOG_FORMAT="json",
    ) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def scan() -> bytes:
    return to_nifti(make_head(np.random.default_rng(11), hemorrhage=True, edema=False)).to_bytes()


def post(url: str, body: bytes, key: str, **params: str) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/predict", content=body, params=params, headers={**OCTET, "X-API-Key": key}, timeout=120
    )


def test_tritons_model_has_the_lanes_priority_levels(triton: LocalTriton) -> None:
    client = tritongrpc.InferenceServerClient(f"127.0.0.1:{triton.ports.grpc}")
    config = client.get_model_config(MODEL_NAME, as_json=True)["config"]["dynamic_batching"]
    assert int(config["priority_levels"]) == contract.PRIORITY_LEVELS
    assert int(config["default_priority_level"]) == contract.DEFAULT_PRIORITY_LEVEL


def test_stat_goes_through_while_bulk_saturates_the_gateway(lanes_gateway: LocalGateway, scan: bytes) -> None:
    url = lanes_gateway.url
    stop = threading.Event()
    bulk: list[httpx.Response] = []
    errors: list[BaseException] = []

    def bulk_client() -> None:
        try:
            while not stop.is_set():
                bulk.append(post(url, scan, BULK_KEY))  # no priority: a bulk-only key defaults to bulk
        except BaseException as error:  # surfaced below
            errors.append(error)

    threads = [threading.Thread(target=bulk_client) for _ in range(BULK_CLIENTS)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(2.0)  # bulk fills its slot and queue first
        stat = []
        for _ in range(STAT_SCANS):
            started = time.perf_counter()
            stat.append((post(url, scan, FULL_KEY, priority="stat"), time.perf_counter() - started))
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
    assert not errors, errors

    assert [response.status_code for response, _ in stat] == [200] * STAT_SCANS, [r.text for r, _ in stat]
    assert all(response.json()["priority"] == "stat" for response, _ in stat)
    statuses = [response.status_code for response in bulk]
    assert set(statuses) <= {200, 429} and 429 in statuses and 200 in statuses, statuses
    assert all(r.json()["priority"] == "bulk" for r in bulk if r.status_code == 200)
    refused = next(r for r in bulk if r.status_code == 429)
    assert refused.json()["code"] == "gateway_busy" and refused.headers["Retry-After"]

    text = httpx.get(f"{url}/metrics", timeout=10).text
    assert metric(text, "headct_predictions_total", lane="stat", outcome="ok") == STAT_SCANS
    assert metric(text, "headct_lane_busy_total", lane="stat") == 0
    assert metric(text, "headct_lane_busy_total", lane="bulk") > 0
    assert metric(text, "headct_prediction_duration_seconds_count", lane="stat") == STAT_SCANS
    print(
        f"\nSTAT under bulk saturation: {[round(seconds, 3) for _, seconds in stat]} s; "
        f"bulk answered {statuses.count(200)}, refused {statuses.count(429)}"
    )


def test_a_key_may_only_send_its_lanes(lanes_gateway: LocalGateway, scan: bytes) -> None:
    refused = post(lanes_gateway.url, scan, BULK_KEY, priority="stat")
    assert refused.status_code == 403 and refused.json()["code"] == "priority_not_allowed"
    bad = post(lanes_gateway.url, scan, FULL_KEY, priority="urgent")
    assert bad.status_code == 400 and bad.json()["code"] == "invalid_priority"
    by_header = httpx.post(
        f"{lanes_gateway.url}/v1/predict",
        content=scan,
        headers={**OCTET, "X-API-Key": FULL_KEY, "X-HeadCT-Priority": "bulk"},
        timeout=120,
    )
    assert by_header.status_code == 200 and by_header.json()["priority"] == "bulk"
    default = post(lanes_gateway.url, scan, FULL_KEY)
    assert default.status_code == 200 and default.json()["priority"] == "routine"


def test_grpc_carries_the_lane_and_the_access_log_names_it(lanes_gateway: LocalGateway, scan: bytes) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{lanes_gateway.grpc_port}") as channel:
        stub = headct_pb2_grpc.HeadCTStub(channel)
        request = headct_pb2.PredictRequest(
            options=headct_pb2.PredictOptions(content_type="application/octet-stream", priority="stat"),
            scan=scan,
        )
        response = stub.Predict(request, metadata=(("x-api-key", FULL_KEY),), timeout=120)
        assert response.priority == "stat"
        with pytest.raises(grpc.RpcError) as raised:
            stub.Predict(request, metadata=(("x-api-key", BULK_KEY),), timeout=120)
        assert raised.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert lanes_gateway.log_path is not None
    lines = _access_lines(lanes_gateway.log_path)
    grpc_ok = [line for line in lines if line.get("method") == "grpc" and line.get("status") == "OK"]
    assert grpc_ok and grpc_ok[-1]["lane"] == "stat"
    assert set(grpc_ok[-1]["timings_ms"]) >= {"decode", "preprocess", "queue", "infer"}
    assert any(line.get("lane") == "bulk" and line.get("method") == "POST" for line in lines)


def _access_lines(log_path: Path) -> list[dict[str, object]]:
    lines = []
    for raw in log_path.read_text().splitlines():
        try:
            record = json.loads(raw)
        except ValueError:
            continue
        if record.get("logger") == "headct.access":
            lines.append(record)
    return lines
