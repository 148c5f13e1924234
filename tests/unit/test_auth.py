"""API keys (api/auth.py): parsing, loading, constant-time comparison, the 401 problems, the OpenAPI
declaration and the per-key concurrency limit. No Triton: a fake model stands in."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import httpx
import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient

from api import auth
from api.auth import ANONYMOUS, Keyring, KeySlots, bearer_token, key_id, parse_keys, predict_slot
from api.http.dependencies import get_model
from api.main import create_app
from api.problems import ProblemError, install_problem_handlers
from api.settings import Settings
from headct.model_card import ModelCard
from tests.cards import make_card

KEY = "k-" + "a1b2c3d4" * 5
OTHER = "k-" + "ffeeddcc" * 5


def test_parse_keys_from_env_and_file_text() -> None:
    assert parse_keys(f" {KEY} ,{OTHER},, ", separator=",") == [KEY, OTHER]
    assert parse_keys("k#1,k2", separator=",") == ["k#1", "k2"]  # no comments in the env list
    text = f"# rotated 2026-11\n{KEY}\n\n  {OTHER}  # ops team\n#old-key\n"
    assert parse_keys(text) == [KEY, OTHER]


def test_bearer_token() -> None:
    assert bearer_token(f"Bearer {KEY}") == KEY
    assert bearer_token(f"bearer   {KEY} ") == KEY
    assert bearer_token(f"Basic {KEY}") is None
    assert bearer_token("Bearer ") is None


def test_keyring_from_env_and_file_and_reload(tmp_path: Path) -> None:
    keys_file = tmp_path / "api-keys"
    keys_file.write_text(f"{KEY}\n")
    ring = Keyring.from_settings(Settings(api_keys=OTHER, api_keys_file=str(keys_file)))
    assert ring.enabled and ring.matches(KEY) and ring.matches(OTHER)
    assert not ring.matches(KEY[:-1]) and not ring.matches("")
    # Secret rotation: the new file content is used without a restart.
    keys_file.write_text("# rotated\nk-new-key-0123456789\n")
    assert ring.matches("k-new-key-0123456789") and not ring.matches(KEY)
    # A configured file that disappears refuses everyone but the env keys (fails closed, not open).
    keys_file.unlink()
    assert ring.enabled and not ring.matches("k-new-key-0123456789") and ring.matches(OTHER)


def test_no_keys_configured_means_open() -> None:
    ring = Keyring.from_settings(Settings())
    assert not ring.enabled
    assert ring.authenticate(None, None) == ANONYMOUS


def test_every_key_is_compared_without_early_exit(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bytes] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(b)
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    ring = Keyring([KEY, OTHER, "k-third-key"])
    assert ring.matches(KEY)  # the first key matches, the other two are still compared
    assert calls == [KEY.encode(), OTHER.encode(), b"k-third-key"]


def test_key_id_is_a_short_hash_not_the_key() -> None:
    assert key_id(KEY) == key_id(KEY) != key_id(OTHER)
    assert KEY not in key_id(KEY) and len(key_id(KEY)) == len("key-") + 12


def _card() -> ModelCard:
    return make_card([("hemorrhage", 0.5)])


class FakeModel:
    model_name = "fmhct"

    async def is_ready(self) -> bool:
        return True

    async def card(self) -> ModelCard:
        return _card()


def keyed_client(settings: Settings) -> TestClient:
    """The real app without its lifespan (no Triton, no worker processes)."""
    app = create_app(settings)
    app.state.settings = settings
    app.dependency_overrides[get_model] = FakeModel
    return TestClient(app)


@pytest.fixture
def client() -> Iterator[TestClient]:
    with keyed_client(Settings(api_keys=f"{KEY},{OTHER}", grpc_enabled=False)) as test_client:
        yield test_client


def test_models_needs_a_key(client: TestClient) -> None:
    response = client.get("/v1/models")
    assert response.status_code == 401
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["www-authenticate"].startswith("Bearer")
    body = response.json()
    assert body["code"] == "missing_api_key" and body["status"] == 401
    assert body["request_id"] == response.headers["x-request-id"]


def test_wrong_key_is_invalid_and_never_echoed(client: TestClient) -> None:
    response = client.get("/v1/models", headers={"X-API-Key": "k-wrong-" + KEY})
    assert response.status_code == 401
    assert response.json()["code"] == "invalid_api_key"
    assert 'error="invalid_token"' in response.headers["www-authenticate"]
    assert "k-wrong-" not in response.text
    response = client.get("/v1/models", headers={"Authorization": "Bearer nope"})
    assert response.json()["code"] == "invalid_api_key"


def test_right_key_in_either_header(client: TestClient) -> None:
    assert client.get("/v1/models", headers={"X-API-Key": KEY}).status_code == 200
    assert client.get("/v1/models", headers={"Authorization": f"Bearer {OTHER}"}).status_code == 200


def test_predict_is_protected_before_the_body_is_read(client: TestClient) -> None:
    response = client.post("/v1/predict", content=b"\0" * 1000)
    assert response.status_code == 401 and response.json()["code"] == "missing_api_key"


def test_probes_and_metrics_stay_open(client: TestClient) -> None:
    assert client.get("/livez").status_code == 200
    assert client.get("/metrics").status_code == 200


def test_without_keys_the_api_is_open() -> None:
    with keyed_client(Settings(grpc_enabled=False)) as open_client:
        assert open_client.get("/v1/models").status_code == 200


def test_openapi_declares_the_schemes_and_the_401(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    schemes = schema["components"]["securitySchemes"]
    assert schemes["ApiKey"] == {"type": "apiKey", "in": "header", "name": "X-API-Key"}
    assert schemes["Bearer"]["scheme"] == "bearer"
    for path, method in (("/v1/predict", "post"), ("/v1/models", "get")):
        operation = schema["paths"][path][method]
        assert {"ApiKey": []} in operation["security"] and {"Bearer": []} in operation["security"]
        assert "401" in operation["responses"]
    assert "429" in schema["paths"]["/v1/predict"]["post"]["responses"]
    assert "security" not in schema["paths"]["/livez"]["get"]


def test_key_slots_limit_each_key_separately() -> None:
    slots = KeySlots(limit=1, retry_after_s=7)
    slots.acquire("key-a")
    with pytest.raises(ProblemError) as refused:
        slots.acquire("key-a")
    assert refused.value.status == 429 and refused.value.code == "key_concurrency_exceeded"
    assert refused.value.headers["Retry-After"] == "7"
    slots.acquire("key-b")  # another key is not affected
    slots.release("key-a")
    slots.acquire("key-a")
    unlimited = KeySlots(limit=0, retry_after_s=1)
    for _ in range(100):
        unlimited.acquire("key-a")


def test_per_key_concurrency_over_http() -> None:
    """Two requests with the same key, the first held open: the second gets the 429 problem with the
    busy Retry-After (`busy_retry_after_s`, like 429 gateway_busy; not the 503 `retry_after_s`); the
    slot is free again once the first has finished."""
    settings = Settings(
        api_keys=f"{KEY},{OTHER}", per_key_concurrency=1, retry_after_s=9, busy_retry_after_s=2
    )
    app = FastAPI()
    app.state.settings = settings
    install_problem_handlers(app)
    entered, release = asyncio.Event(), asyncio.Event()

    @app.post("/slow")
    async def slow(identity: Annotated[str, Depends(predict_slot)]) -> dict[str, str]:
        entered.set()
        await release.wait()
        return {"key": identity}

    async def scenario() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            first = asyncio.create_task(http.post("/slow", headers={"X-API-Key": KEY}))
            await entered.wait()
            second = await http.post("/slow", headers={"X-API-Key": KEY})
            assert second.status_code == 429, second.text
            assert second.json()["code"] == "key_concurrency_exceeded"
            assert second.headers["retry-after"] == "2"
            release.set()
            assert (await first).json() == {"key": key_id(KEY)}
            again = await http.post("/slow", headers={"X-API-Key": KEY})
            assert again.status_code == 200

    asyncio.run(scenario())
