"""A model update under a running stack: the REAL Triton (polling a private copy of the demo repository)
loads a new version with its tasks reordered and other thresholds, and the REAL gateway answers with the
new order, thresholds and versions without a restart. A model exported for another preprocessing version
is refused: /readyz 503 ``model_contract_mismatch``."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import pytest
from google.protobuf import text_format
from onnx import helper
from tritonclient.grpc import model_config_pb2 as mc

from demo.synthetic_head import make_head, to_nifti
from headct import contract
from headct.files import atomic_write_text
from headct.local.triton import LocalTriton, TritonPorts, prepare_triton_home
from headct.model_card import MODEL_CARD_FILENAME, MODEL_CARD_PARAMETER, ModelCard
from tests.stack import MODEL_NAME, REPOSITORY, ROOT, LocalGateway, running_gateway

pytestmark = pytest.mark.integration

CONFIG = "config.pbtxt"
LABELS = "labels.txt"


class PollingTriton(LocalTriton):
    """The local Triton, polling its repository every second (the suites' default is no model control)."""

    def command(self) -> list[str]:
        return [*super().command(), "--model-control-mode=poll", "--repository-poll-secs=1"]


def _read_config(model_dir: Path) -> mc.ModelConfig:
    return text_format.Parse((model_dir / CONFIG).read_text(), mc.ModelConfig())


def _card_of(config: mc.ModelConfig) -> dict[str, Any]:
    return json.loads(config.parameters[MODEL_CARD_PARAMETER].string_value)


def _write_entry(model_dir: Path, config: mc.ModelConfig, card: dict[str, Any]) -> None:
    """config.pbtxt (with the card), labels.txt and model_card.json, each replaced atomically."""
    ModelCard.model_validate(card)  # what we write is a valid card of this release
    text = json.dumps(card, separators=(",", ":"))
    config.parameters[MODEL_CARD_PARAMETER].string_value = text
    atomic_write_text(model_dir / LABELS, "".join(f"{task['name']}\n" for task in card["tasks"]))
    atomic_write_text(model_dir / MODEL_CARD_FILENAME, json.dumps(card, indent=2))
    atomic_write_text(model_dir / CONFIG, text_format.MessageToString(config))


def _reorder_outputs(source: Path, target: Path, outputs: dict[str, list[int]]) -> None:
    """Copy the ONNX graph, permuting the columns of each named probabilities output (a Gather at the end):
    the served graph itself answers in the new task order."""
    model = onnx.load(str(source))
    graph = model.graph
    for name, order in outputs.items():
        inner = f"{name}__before_reorder"
        for node in graph.node:
            node.output[:] = [inner if out == name else out for out in node.output]
            node.input[:] = [inner if value == name else value for value in node.input]
        indices = f"{name}__order"
        graph.initializer.append(helper.make_tensor(indices, onnx.TensorProto.INT64, [len(order)], order))
        graph.node.append(helper.make_node("Gather", [inner, indices], [name], axis=1))
    onnx.checker.check_model(model)
    onnx.save(model, str(target))


def write_reordered_version(model_dir: Path, thresholds: dict[str, float]) -> dict[str, Any]:
    """A new version (max+1) of `model_dir` with every group's tasks in reverse order and `thresholds`;
    the version directory appears complete (rename), then config/labels/card are replaced."""
    config = _read_config(model_dir)
    card = _card_of(config)
    old = card["triton_version"]
    new = max(int(p.name) for p in model_dir.iterdir() if p.name.isdigit()) + 1
    permutations: dict[str, list[int]] = {}
    for group in card["groups"]:
        if group["probabilities_output"] is not None:
            permutations[group["probabilities_output"]] = list(reversed(range(len(group["tasks"]))))
            group["tasks"] = list(reversed(group["tasks"]))
    by_name = {task["name"]: task for task in card["tasks"]}
    card["tasks"] = [{**by_name[name], "threshold": thresholds[name]} for name in reversed(list(by_name))]
    staging = model_dir / f".staging-{new}"
    shutil.copytree(model_dir / str(old), staging, ignore=shutil.ignore_patterns("__pycache__", "model.onnx"))
    _reorder_outputs(model_dir / str(old) / "model.onnx", staging / "model.onnx", permutations)
    os.rename(staging, model_dir / str(new))
    card.update(triton_version=new, model_version=f"{card['model_version']}-reordered-{new}")
    _write_entry(model_dir, config, card)
    return card


def private_repository(tmp_path: Path, edit: Callable[[dict[str, Any]], None] | None = None) -> Path:
    """A copy of the demo entry (only the version its card describes); `edit` may change the card."""
    source = REPOSITORY / MODEL_NAME
    if not (source / CONFIG).is_file():
        pytest.fail(f"{source} is missing: run `make test`, which builds the demo model first")
    config = _read_config(source)
    card = _card_of(config)
    version = str(card["triton_version"])
    model_dir = tmp_path / "repository" / MODEL_NAME
    model_dir.mkdir(parents=True)
    shutil.copytree(source / version, model_dir / version, ignore=shutil.ignore_patterns("__pycache__"))
    for name in (LABELS, MODEL_CARD_FILENAME):
        shutil.copy2(source / name, model_dir / name)
    if edit is not None:
        edit(card)
    config.parameters[MODEL_CARD_PARAMETER].string_value = json.dumps(card, separators=(",", ":"))
    (model_dir / CONFIG).write_text(text_format.MessageToString(config))
    return model_dir.parent


@contextlib.contextmanager
def polling_triton(repository: Path, log_path: Path) -> Iterator[LocalTriton]:
    server = PollingTriton(
        home=prepare_triton_home(ROOT / "build" / "tritonserver"),
        repository=repository,
        ports=TritonPorts.free(),
        log_path=log_path,
    )
    server.start()
    try:
        server.wait_ready(MODEL_NAME)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def scan() -> bytes:
    return to_nifti(make_head(np.random.default_rng(777), hemorrhage=True, edema=False)).to_bytes()


def _until(check: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.5)
    raise AssertionError(f"{what} not seen within {timeout_s:.0f} s; last: {last!r}")


def test_a_new_version_with_reordered_tasks_is_served_without_a_gateway_restart(
    tmp_path: Path, scan: bytes
) -> None:
    repository = private_repository(tmp_path)
    model_dir = repository / MODEL_NAME
    before = _card_of(_read_config(model_dir))
    with (
        polling_triton(repository, tmp_path / "tritonserver.log") as triton,
        running_gateway(triton, tmp_path / "gateway.log") as gateway,
        httpx.Client(base_url=gateway.url, timeout=120) as client,
    ):
        first = client.post("/v1/predict", content=scan)
        assert first.status_code == 200, first.text
        old = first.json()
        assert old["model"]["version"] == before["model_version"]
        assert [f["name"] for f in old["findings"]] == [t["name"] for t in before["tasks"]]
        probability = {f["name"]: f["probability"] for f in old["findings"]}

        # Thresholds that flip each finding's decision, so a stale card could not pass unnoticed.
        thresholds = {
            f["name"]: (f["probability"] + 1.0) / 2 if f["positive"] else f["probability"] / 2
            for f in old["findings"]
        }
        after = write_reordered_version(model_dir, thresholds)

        def models_say_new() -> dict[str, Any] | None:
            response = client.get("/readyz")
            if response.status_code != 200:  # Triton between versions: 503, never the old card's answers
                assert response.json()["code"] in ("model_unavailable", "model_card_stale"), response.text
                return None
            return response.json() if response.json()["version"] == after["model_version"] else None

        _until(models_say_new, 90, "the new version on /readyz")
        (info,) = client.get("/v1/models").json()["models"]
        assert info["triton_version"] == after["triton_version"]
        assert [(t["name"], t["threshold"]) for t in info["tasks"]] == [
            (t["name"], t["threshold"]) for t in after["tasks"]
        ]

        response = client.post("/v1/predict", content=scan)
        assert response.status_code == 200, response.text
        new = response.json()
        assert new["model"]["version"] == after["model_version"]
        assert new["model"]["sha256"] == after["checkpoint_sha256"]
        assert [f["name"] for f in new["findings"]] == [t["name"] for t in after["tasks"]]
        for finding in new["findings"]:
            name = finding["name"]
            # Same weights: the same probability per finding, now from the reordered output ...
            assert finding["probability"] == pytest.approx(probability[name], abs=1e-4)
            # ... judged by the new threshold.
            assert finding["threshold"] == thresholds[name]
            assert finding["positive"] == (finding["probability"] >= thresholds[name])
        assert [f["positive"] for f in new["findings"]] != [
            next(o["positive"] for o in old["findings"] if o["name"] == f["name"]) for f in new["findings"]
        ]
        assert "invalidated" in gateway.log_text()


def test_a_model_for_another_preprocessing_version_is_refused(tmp_path: Path) -> None:
    def other_preprocessing(card: dict[str, Any]) -> None:
        card["preprocessing_version"] = "fmhct-train-v0"

    repository = private_repository(tmp_path, other_preprocessing)
    with polling_triton(repository, tmp_path / "tritonserver.log") as triton:
        gateway = LocalGateway(
            f"127.0.0.1:{triton.ports.grpc}",
            settings={"HEADCT_MAX_UPLOAD_BYTES": str(64 << 20)},
            model_name=MODEL_NAME,
            log_path=tmp_path / "gateway.log",
        )
        gateway.start()
        try:
            gateway.wait_ready(90, ready=False)  # alive (/livez), never ready
            with httpx.Client(base_url=gateway.url, timeout=60) as client:
                response = client.get("/readyz")
                assert response.status_code == 503, response.text
                assert response.headers["content-type"] == "application/problem+json"
                body = response.json()
                assert body["code"] == "model_contract_mismatch"
                assert "fmhct-train-v0" in body["detail"]
                assert contract.PREPROCESSING_VERSION in body["detail"]
                assert "Retry-After" in response.headers
                predict = client.post("/v1/predict", content=b"\0" * 1024)
                assert (predict.status_code, predict.json()["code"]) == (503, "model_contract_mismatch")
        finally:
            gateway.stop()
