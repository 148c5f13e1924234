"""`include=attention` through the gateway (fake Triton): which outputs are asked for, and the JSON."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from api.inference.lanes import DEFAULT_LANE, Lane
from api.inference.service import outputs_for, result_from
from headct import contract
from headct.model_card import ModelCard
from tests.cards import make_card
from tests.unit.test_gateway import FakeModel, _head_nifti, fake_client

GRID = contract.ATTENTION_GRID
TASKS = ["hemorrhage", "edema"]


def _attention_card() -> ModelCard:
    card = make_card([("hemorrhage", 0.5), ("edema", 0.3)])
    tasks = [
        task.model_copy(update={"attention_method": contract.ATTENTION_CLS_LAST_BLOCK}) for task in card.tasks
    ]
    tasks[1] = tasks[1].model_copy(update={"attention_method": contract.ATTENTION_HEAD_QUERY})
    group = card.groups[0].model_copy(update={"attention_output": contract.ATTENTION_NAME})
    return card.model_copy(update={"tasks": tasks, "groups": [group]})


def _maps(batch: int) -> np.ndarray:
    """Task 0: all weight on cell (1, 2, 3); task 1: uniform."""
    maps = np.zeros((batch, len(TASKS), *GRID), np.float32)
    maps[:, 0, 1, 2, 3] = 1.0
    maps[:, 1] = 1.0 / np.prod(GRID)
    return maps


class AttentionModel(FakeModel):
    def __init__(self, card: ModelCard) -> None:
        super().__init__()
        self._card = card
        self.asked: list[list[str]] = []

    async def card(self) -> ModelCard:
        return self._card

    async def infer_batch(
        self, batch: np.ndarray, timeout_s: float, outputs: Sequence[str] = (), *, lane: Lane = DEFAULT_LANE
    ) -> dict[str, np.ndarray]:
        self.asked.append(list(outputs))
        rows = await super().infer_batch(
            batch, timeout_s, [o for o in outputs if o != "attention"], lane=lane
        )
        if "attention" in outputs:
            rows["attention"] = _maps(len(batch))
        return rows


def test_outputs_for_asks_for_the_attention_of_the_requested_groups_only_when_included() -> None:
    card = _attention_card()
    assert outputs_for(card, [], False) == ["probabilities"]
    assert outputs_for(card, ["edema"], False, True) == ["probabilities", "attention"]
    assert outputs_for(card, [], True, True) == ["probabilities", "embedding", "attention"]
    result = result_from(card, {"probabilities": np.array([0.9, 0.1]), "attention": _maps(1)[0]})
    assert sorted(result.attention) == sorted(TASKS) and result.attention["hemorrhage"][1, 2, 3] == 1.0


def test_include_attention_returns_each_findings_map() -> None:
    fake = AttentionModel(_attention_card())
    with fake_client(fake) as client:
        response = client.post("/v1/predict", content=_head_nifti(), params={"include": "attention"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert [sorted(asked) for asked in fake.asked] == [["attention", "probabilities"]]
    assert body["embedding"] is None
    assert sorted(body["attention"]) == sorted(TASKS)
    hemorrhage = body["attention"]["hemorrhage"]
    assert hemorrhage["grid"] == list(GRID) and hemorrhage["space"] == "model_input_ras"
    assert hemorrhage["method"] == contract.ATTENTION_CLS_LAST_BLOCK
    values = np.asarray(hemorrhage["values"]).reshape(GRID)  # C order
    assert values[1, 2, 3] == 1.0 and values.sum() == 1.0
    edema = body["attention"]["edema"]
    assert edema["method"] == contract.ATTENTION_HEAD_QUERY
    assert sum(edema["values"]) == pytest.approx(1.0, abs=1e-5)


def test_attention_follows_the_task_subset_and_is_absent_unless_asked() -> None:
    fake = AttentionModel(_attention_card())
    with fake_client(fake) as client:
        subset = client.post(
            "/v1/predict", content=_head_nifti(), params={"include": "attention,embedding", "tasks": "edema"}
        ).json()
        plain = client.post("/v1/predict", content=_head_nifti()).json()
        bad = client.post("/v1/predict", content=_head_nifti(), params={"include": "attention,heatmap"})
    assert list(subset["attention"]) == ["edema"] and len(subset["embedding"]) == 4
    assert "attention" not in plain  # unchanged answer: no new key at all
    assert fake.asked[-1] == ["probabilities"]
    assert bad.status_code == 400 and bad.json()["code"] == "invalid_include"


def test_a_model_without_attention_maps_refuses_include_attention() -> None:
    fake = AttentionModel(make_card([("hemorrhage", 0.5), ("edema", 0.3)]))
    with fake_client(fake) as client:
        response = client.post("/v1/predict", content=_head_nifti(), params={"include": "attention"})
    assert response.status_code == 400 and response.json()["code"] == "invalid_include"
    assert "no attention maps" in response.json()["detail"]
