"""The gateway's model card against a fake Triton client: read again after Triton reports another version
in an inference response or after a readiness flap (one read at a time), and refused (503 with a specific
code) when it is invalid, was exported for another preprocessing/input contract, or describes another
version than Triton serves. tests/integration/test_model_update.py does the same against the real Triton."""

from __future__ import annotations

import asyncio
import json
import types
from collections.abc import Iterator
from typing import Any
from unittest import mock

import grpc
import numpy as np
import pytest
from fastapi.testclient import TestClient
from tritonclient.utils import InferenceServerException

from api.grpc.problems import grpc_status
from api.http.dependencies import get_model, get_prediction_service
from api.inference.service import PredictionService
from api.inference.triton import TritonModel
from api.main import create_app
from api.problems import ProblemCode, ProblemError
from api.settings import Settings
from headct import contract
from headct.model_card import MODEL_CARD_PARAMETER, BackboneGroup, InputContract, ModelCard, TaskCard


def card_json(
    version: int = 1,
    tasks: tuple[tuple[str, float], ...] = (("hemorrhage", 0.5), ("edema", 0.3)),
    **overrides: Any,
) -> str:
    names = [name for name, _ in tasks]
    card = ModelCard(
        name="fmhct",
        triton_version=version,
        model_version=f"test-{version}",
        synthetic_demo=True,
        notice="test",
        checkpoint_sha256="a" * 64,
        onnx_sha256="b" * 64,
        preprocessing_version=contract.PREPROCESSING_VERSION,
        input=InputContract(),
        embedding_dim=4,
        architecture={"embed_dim": 4},
        tasks=[
            TaskCard(
                name=name,
                threshold=threshold,
                head_type="linear",
                head_sha256="c" * 64,
                group="g0",
                pairing="verified",
            )
            for name, threshold in tasks
        ],
        groups=[
            BackboneGroup(
                name="g0",
                weights_sha256="d" * 64,
                checkpoints=["backbone.pt"],
                checkpoint_sha256s=["a" * 64],
                architecture={"embed_dim": 4},
                registers="none",
                tasks=names,
                probabilities_output=contract.PROBABILITIES_NAME,
                embedding_output=contract.EMBEDDING_NAME,
            )
        ],
        embedding_group="g0",
        max_batch_size=8,
    )
    raw = card.model_dump(mode="json")
    for key, value in overrides.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    return json.dumps(raw)


class FakeTritonClient:
    """What TritonModel asks tritonclient's aio client, served from `card` / `versions` / `ready`."""

    def __init__(self, card: str, versions: tuple[str, ...] = ("1",), ready: bool = True) -> None:
        self.card = card
        self.versions = versions
        self.ready = ready
        self.config_reads = 0
        self.ready_calls: list[str] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.read_delay_s = 0.0

    async def is_model_ready(self, name: str, version: str = "", **kwargs: Any) -> bool:
        self.ready_calls.append(version)
        return self.ready and (version == "" or version in self.versions)

    async def get_model_config(self, name: str, version: str = "", **kwargs: Any) -> dict[str, Any]:
        self.config_reads += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            card = self.card  # what the config holds when the read starts
            await asyncio.sleep(self.read_delay_s)
            if not self.ready:
                raise InferenceServerException("model not found", status="StatusCode.UNAVAILABLE")
            return {
                "config": {
                    "name": name,
                    "max_batch_size": 8,
                    "parameters": {MODEL_CARD_PARAMETER: {"string_value": card}},
                }
            }
        finally:
            self.in_flight -= 1

    async def get_model_metadata(self, name: str, version: str = "", **kwargs: Any) -> dict[str, Any]:
        return {"name": name, "versions": list(self.versions)}

    async def infer(self, name: str, inputs: list[Any], **kwargs: Any) -> Any:
        batch = inputs[0].shape()[0]
        served = self.versions[-1]
        arrays = {
            contract.PROBABILITIES_NAME: np.full((batch, 2), 0.5, np.float32),
            contract.EMBEDDING_NAME: np.zeros((batch, 4), np.float32),
        }
        return types.SimpleNamespace(
            get_response=lambda: types.SimpleNamespace(model_version=served),
            as_numpy=arrays.get,
        )

    async def close(self) -> None:
        pass


def model_with(client: FakeTritonClient, model_version: str = "") -> TritonModel:
    with mock.patch("api.inference.triton.grpcclient.InferenceServerClient", lambda **kwargs: client):
        # The input's transport is tests/unit/test_triton_shm.py's subject; this fake has no shared memory.
        return TritonModel(
            "127.0.0.1:1", "fmhct", model_version, timeout_s=1.0, retry_after_s=7, shared_memory="off"
        )


def refusal(model: TritonModel) -> ProblemError:
    with pytest.raises(ProblemError) as raised:
        asyncio.run(model.card())
    return raised.value


# --- freshness ----------------------------------------------------------------------------------------


def test_the_card_is_read_once_while_triton_serves_its_version() -> None:
    client = FakeTritonClient(card_json(1))
    model = model_with(client)

    async def main() -> None:
        for _ in range(3):
            assert (await model.card()).triton_version == 1
        model.note_served_version("1")  # the version the card describes: nothing to do
        assert (await model.card()).triton_version == 1

    asyncio.run(main())
    assert client.config_reads == 1


def test_another_version_in_an_inference_response_makes_the_next_card_call_read_again() -> None:
    client = FakeTritonClient(card_json(1))
    model = model_with(client)
    first = asyncio.run(model.card())
    assert first.task_names == ["hemorrhage", "edema"]
    # Triton loaded version 2 (tasks reordered, other thresholds); the next response says so.
    client.card, client.versions = card_json(2, (("edema", 0.7), ("hemorrhage", 0.2))), ("2",)
    assert asyncio.run(model.card()) is first  # nothing told the gateway yet
    model.note_served_version("2")
    second = asyncio.run(model.card())
    assert client.config_reads == 2
    assert second.triton_version == 2 and second.model_version == "test-2"
    assert [(t.name, t.threshold) for t in second.tasks] == [("edema", 0.7), ("hemorrhage", 0.2)]
    assert model.max_batch_size == 8


def test_an_inference_answered_by_another_version_invalidates_the_card() -> None:
    client = FakeTritonClient(card_json(1))
    model = model_with(client)

    async def main() -> ModelCard:
        await model.card()
        client.card, client.versions = card_json(2), ("2",)
        await model.infer_batch(np.zeros((1, 3, 96, 96, 96), np.float16))  # Triton answers with version 2
        return await model.card()

    assert asyncio.run(main()).triton_version == 2
    assert client.config_reads == 2


def test_a_readiness_flap_makes_the_next_card_call_read_again() -> None:
    client = FakeTritonClient(card_json(1))
    model = model_with(client)

    async def main() -> ModelCard:
        assert await model.is_ready()
        assert (await model.card()).triton_version == 1
        client.ready = False  # Triton reloads the model...
        assert not await model.is_ready()
        client.card, client.versions, client.ready = card_json(2), ("2",), True  # ...with another version
        assert await model.is_ready()
        return await model.card()

    assert asyncio.run(main()).triton_version == 2
    assert client.config_reads == 2


def test_a_readiness_check_notices_that_triton_replaced_the_cards_version() -> None:
    client = FakeTritonClient(card_json(1))
    model = model_with(client)

    async def main() -> ModelCard:
        await model.card()
        assert await model.is_ready()
        assert client.ready_calls == ["1"]  # one call while the card's version is served
        client.card, client.versions = card_json(2), ("2",)  # Triton loaded 2 and unloaded 1
        assert await model.is_ready()  # still ready (version 2), no inference needed to notice
        return await model.card()

    assert asyncio.run(main()).triton_version == 2
    assert client.config_reads == 2


def test_concurrent_callers_share_one_read() -> None:
    client = FakeTritonClient(card_json(1))
    client.read_delay_s = 0.05
    model = model_with(client)

    async def main() -> list[ModelCard]:
        await model.card()
        client.card, client.versions = card_json(2), ("2",)
        model.note_served_version("2")
        return await asyncio.gather(*(model.card() for _ in range(20)))

    cards = asyncio.run(main())
    assert {card.triton_version for card in cards} == {2}
    assert client.config_reads == 2
    assert client.max_in_flight == 1


def test_a_read_overtaken_by_an_invalidation_is_returned_but_not_kept() -> None:
    client = FakeTritonClient(card_json(1))
    client.read_delay_s = 0.05
    model = model_with(client)

    async def main() -> tuple[ModelCard, ModelCard]:
        reading = asyncio.create_task(model.card())
        await asyncio.sleep(0.01)  # the read of version 1's config is in flight...
        model.invalidate_card("test: the model changed meanwhile")
        first = await reading
        client.card, client.versions = card_json(2), ("2",)
        return first, await model.card()

    first, second = asyncio.run(main())
    assert (first.triton_version, second.triton_version) == (1, 2)
    assert client.config_reads == 2


# --- refusals -----------------------------------------------------------------------------------------


def test_another_preprocessing_version_is_refused_naming_both_versions() -> None:
    model = model_with(FakeTritonClient(card_json(1, preprocessing_version="fmhct-train-v0")))
    error = refusal(model)
    assert (error.status, error.code) == (503, "model_contract_mismatch")
    assert "fmhct-train-v0" in error.detail and contract.PREPROCESSING_VERSION in error.detail
    assert (error.field, error.observed, error.expected) == (
        "preprocessing_version",
        "fmhct-train-v0",
        contract.PREPROCESSING_VERSION,
    )
    assert error.headers["Retry-After"] == "7"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("name", "input"),
        ("datatype", "FP32"),
        ("shape", [-1, 3, 128, 128, 128]),
        ("axis_order", "LPS"),
        ("channels", ["brain L40/W80"]),
        ("value_range", [-1.0, 1.0]),
    ],
)
def test_another_input_contract_is_refused(key: str, value: Any) -> None:
    model = model_with(FakeTritonClient(card_json(1, input={**InputContract().model_dump(), key: value})))
    error = refusal(model)
    assert (error.status, error.code, error.field) == (503, "model_contract_mismatch", f"input.{key}")
    assert error.observed == value
    assert contract.PREPROCESSING_VERSION in error.detail


@pytest.mark.parametrize(
    ("text", "why"),
    [
        (card_json(1, preprocessing_version=None), "preprocessing_version"),  # a schema-1 card
        (card_json(1, schema_version=3), "schema_version 3"),
        (card_json(1, input=None), "input"),
        ("{not json", "card"),
        ("[1, 2]", "JSON object"),
    ],
)
def test_an_invalid_card_is_refused(text: str, why: str) -> None:
    error = refusal(model_with(FakeTritonClient(text)))
    assert (error.status, error.code) == (503, "model_card_invalid")
    assert why in error.detail
    assert error.headers["Retry-After"] == "7"


def test_a_card_for_another_version_than_triton_serves_is_refused() -> None:
    # A version directory was added but config.pbtxt (and its card) not rewritten yet.
    error = refusal(model_with(FakeTritonClient(card_json(1), versions=("1", "2"))))
    assert (error.status, error.code) == (503, "model_card_stale")
    assert "version 2" in error.detail and "version 1" in error.detail
    # A gateway pinned to version 1 is served by version 1: fine.
    assert asyncio.run(model_with(FakeTritonClient(card_json(1), ("1", "2")), "1").card()).triton_version == 1


def test_a_refusal_is_read_again_once_the_repository_is_fixed() -> None:
    client = FakeTritonClient(card_json(1, preprocessing_version="fmhct-train-v0"))
    model = model_with(client)
    assert refusal(model).code == "model_contract_mismatch"
    assert refusal(model).code == "model_contract_mismatch"
    assert client.config_reads == 1  # refusals are re-checked at most once a second
    client.card = card_json(1)
    model._refused_at -= 2.0  # a second later
    assert asyncio.run(model.card()).preprocessing_version == contract.PREPROCESSING_VERSION


def test_contract_codes_are_unavailable_over_grpc() -> None:
    for problem in (
        ProblemCode.MODEL_CONTRACT_MISMATCH,
        ProblemCode.MODEL_CARD_INVALID,
        ProblemCode.MODEL_CARD_STALE,
    ):
        assert grpc_status(problem) == grpc.StatusCode.UNAVAILABLE


# --- over HTTP ----------------------------------------------------------------------------------------


@pytest.fixture
def fake_triton() -> FakeTritonClient:
    return FakeTritonClient(card_json(1))


@pytest.fixture
def client(fake_triton: FakeTritonClient) -> Iterator[TestClient]:
    settings = Settings(max_upload_bytes=1 << 20, grpc_enabled=False, preprocess_workers=0)
    app = create_app(settings)
    model = model_with(fake_triton)
    service = PredictionService(model, settings)
    app.dependency_overrides[get_model] = lambda: model
    app.dependency_overrides[get_prediction_service] = lambda: service
    with TestClient(app) as test_client:
        yield test_client


def test_readyz_and_predict_answer_503_contract_mismatch(
    client: TestClient, fake_triton: FakeTritonClient
) -> None:
    fake_triton.card = card_json(1, preprocessing_version="fmhct-train-v0")
    for response in (client.get("/readyz"), client.post("/v1/predict", content=b"x" * 400)):
        assert response.status_code == 503, response.text
        assert response.headers["content-type"] == "application/problem+json"
        body = response.json()
        assert body["code"] == "model_contract_mismatch"
        assert "fmhct-train-v0" in body["detail"] and contract.PREPROCESSING_VERSION in body["detail"]
        assert response.headers["Retry-After"] == "7"
    assert client.get("/v1/models").json()["code"] == "model_contract_mismatch"


def test_readyz_answers_503_card_invalid(client: TestClient, fake_triton: FakeTritonClient) -> None:
    fake_triton.card = card_json(1, preprocessing_version=None)
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["code"] == "model_card_invalid"
    assert client.post("/v1/predict", content=b"x" * 400).json()["code"] == "model_card_invalid"


def test_readyz_follows_the_served_version(client: TestClient, fake_triton: FakeTritonClient) -> None:
    assert client.get("/readyz").json() == {"status": "ready", "model": "fmhct", "version": "test-1"}
    fake_triton.card, fake_triton.versions = card_json(2), ("2",)
    model: TritonModel = client.app.dependency_overrides[get_model]()  # type: ignore[attr-defined]
    model.note_served_version("2")
    assert client.get("/readyz").json()["version"] == "test-2"
    assert client.get("/v1/models").json()["models"][0]["triton_version"] == 2
