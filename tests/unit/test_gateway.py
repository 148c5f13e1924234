"""Gateway behaviour that does not need Triton: problem details, request ids, upload limits, sniffing,
error mapping. A fake stands in for Triton here only; tests/integration uses the real server."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
from collections.abc import Iterator, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from fastapi.testclient import TestClient
from tritonclient.utils import InferenceServerException

from api.http.dependencies import get_model, get_prediction_service
from api.inference.lanes import DEFAULT_LANE, Lane
from api.inference.service import PredictionService
from api.inference.triton import TritonModel
from api.ingest import sniff_format
from api.main import create_app
from api.problems import ProblemCode, ProblemError
from api.settings import Settings
from headct.model_card import ModelCard
from tests.cards import make_card


def _card() -> ModelCard:
    return make_card([("hemorrhage", 0.5), ("edema", 0.3)])


class FakeModel:
    model_name = "fmhct"

    def __init__(self, ready: bool = True) -> None:
        self.ready = ready
        self.images: list[np.ndarray] = []
        self.lanes: list[Lane] = []

    async def is_ready(self) -> bool:
        return self.ready

    async def card(self) -> ModelCard:
        return _card()

    async def infer_batch(
        self, batch: np.ndarray, timeout_s: float, outputs: Sequence[str] = (), *, lane: Lane = DEFAULT_LANE
    ) -> dict[str, np.ndarray]:
        self.lanes.append(lane)
        self.images.extend(batch)
        rows = {
            "probabilities": np.tile(np.array([0.9, 0.1], np.float32), (len(batch), 1)),
            "embedding": np.tile(np.arange(4, dtype=np.float32), (len(batch), 1)),
        }
        return {name: rows[name] for name in outputs or rows}

    def unavailable(self, detail: str) -> ProblemError:
        return ProblemError(ProblemCode.MODEL_UNAVAILABLE, detail, headers={"Retry-After": "5"})


@pytest.fixture
def fake() -> FakeModel:
    return FakeModel()


@contextlib.contextmanager
def fake_client(fake: FakeModel, *, max_upload_bytes: int = 1 << 20) -> Iterator[TestClient]:
    """The real app (routes, middleware, problem handlers) in front of `fake` instead of Triton."""
    settings = Settings(max_upload_bytes=max_upload_bytes, grpc_enabled=False, preprocess_workers=0)
    app = create_app(settings)
    service = PredictionService(fake, settings)  # type: ignore[arg-type]
    app.dependency_overrides[get_model] = lambda: fake
    app.dependency_overrides[get_prediction_service] = lambda: service
    with TestClient(app) as test_client:
        yield test_client


@pytest.fixture
def client(fake: FakeModel) -> Iterator[TestClient]:
    with fake_client(fake) as test_client:
        yield test_client


def _head_nifti() -> bytes:
    data = np.full((40, 40, 30), -1000, np.int16)
    data[8:32, 8:32, 5:25] = 35
    return nib.Nifti1Image(data, np.diag([2.0, 2.0, 3.0, 1.0])).to_bytes()


def test_predict_builds_the_contract_response(client: TestClient, fake: FakeModel) -> None:
    response = client.post("/v1/predict", content=_head_nifti(), params={"include": "embedding"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert [(f["name"], f["positive"]) for f in body["findings"]] == [("hemorrhage", True), ("edema", False)]
    assert body["embedding"] == [0.0, 1.0, 2.0, 3.0]
    assert body["input"] == {"shape": [40, 40, 30], "spacing_mm": [2.0, 2.0, 3.0], "source_format": "nifti"}
    (image,) = fake.images
    assert image.shape == (3, 96, 96, 96) and image.dtype == np.float16


def test_request_id_is_generated_or_echoed(client: TestClient) -> None:
    generated = client.get("/livez").headers["X-Request-ID"]
    assert len(generated) == 32
    assert client.get("/livez", headers={"X-Request-ID": "abc-1"}).headers["X-Request-ID"] == "abc-1"
    # Not echoed: control characters or absurd length would end up in logs.
    assert client.get("/livez", headers={"X-Request-ID": "x" * 500}).headers["X-Request-ID"] != "x" * 500


def test_unknown_route_is_a_problem(client: TestClient) -> None:
    response = client.get("/v1/nothing-here")
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["code"] == "not_found"


def test_upload_limit_applies_to_declared_and_streamed_bodies(client: TestClient) -> None:
    too_big = b"\0" * ((1 << 20) + 1)
    assert client.post("/v1/predict", content=too_big).json()["code"] == "payload_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: the cap must hold while streaming
        for _ in range(20):
            yield b"\0" * (64 << 10)

    response = client.post("/v1/predict", content=chunks())
    assert response.status_code == 413
    assert response.json()["code"] == "payload_too_large"


def test_not_ready_is_503_with_retry_after(client: TestClient, fake: FakeModel) -> None:
    fake.ready = False
    response = client.post("/v1/predict", content=_head_nifti())
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "5"
    assert response.json()["code"] == "model_unavailable"
    assert client.get("/readyz").status_code == 503


def test_sniffing_by_magic_bytes(tmp_path: Path) -> None:
    nifti = _head_nifti()
    cases = {
        "nifti": nifti,
        "nifti-gz": gzip.compress(nifti),
        "dicom": b"\0" * 128 + b"DICM" + b"\0" * 600,
        "zip": b"PK\x03\x04" + b"\0" * 600,
        "nrrd": b"NRRD0004\n" + b"\0" * 600,
        None: b"definitely not medical" * 40,
    }
    for expected, content in cases.items():
        path = tmp_path / "upload"
        path.write_bytes(content)
        assert sniff_format(path) == expected
    path.write_bytes(gzip.compress(b"gzip but not nifti" * 40))
    assert sniff_format(path) is None


@pytest.mark.parametrize(
    ("grpc_status", "http_status", "code"),
    [
        ("StatusCode.DEADLINE_EXCEEDED", 504, "inference_timeout"),
        ("StatusCode.UNAVAILABLE", 503, "model_unavailable"),
        ("StatusCode.INTERNAL", 502, "inference_failed"),
    ],
)
def test_triton_errors_map_to_problems(grpc_status: str, http_status: int, code: str) -> None:
    async def call() -> None:
        model = TritonModel("127.0.0.1:1", "fmhct", "", timeout_s=1.0, retry_after_s=7)

        async def failing_infer(*args: object, **kwargs: object) -> None:
            raise InferenceServerException("boom", status=grpc_status)

        model._client.infer = failing_infer  # type: ignore[method-assign]
        try:
            await model.infer_batch(np.zeros((1, 3, 96, 96, 96), np.float16))
        finally:
            await model.close()

    with pytest.raises(ProblemError) as raised:
        asyncio.run(call())
    assert (raised.value.status, raised.value.code) == (http_status, code)
    if http_status == 503:
        assert raised.value.headers["Retry-After"] == "7"
