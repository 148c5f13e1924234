"""The walking skeleton end to end: NIfTI head → gateway → real Triton → findings, checked against the
PyTorch model on the same preprocessed tensor."""

from __future__ import annotations

import gzip
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest
import torch

from demo.synthetic_head import make_head, to_nifti
from export.checkpoint import load_backbone, load_head
from export.serving_graph import ServingGraph
from headct.model_card import MODEL_CARD_FILENAME, ModelCard
from headct.preprocess import preprocess
from headct.volume import Volume
from tests.stack import CHECKPOINTS, MODEL_NAME, REPOSITORY

pytestmark = pytest.mark.integration

PROBLEM = "application/problem+json"


@pytest.fixture(scope="module")
def card() -> ModelCard:
    return ModelCard.model_validate_json((REPOSITORY / MODEL_NAME / MODEL_CARD_FILENAME).read_text())


@pytest.fixture(scope="module")
def scans() -> dict[str, bytes]:
    """Synthetic heads written as NIfTI: one normal, one per finding (seeded)."""
    variants = {
        "normal": {"hemorrhage": False, "edema": False},
        "hemorrhage": {"hemorrhage": True, "edema": False},
        "edema": {"hemorrhage": False, "edema": True},
    }
    return {
        name: to_nifti(make_head(np.random.default_rng(4242), **flags)).to_bytes()
        for name, flags in variants.items()
    }


@pytest.fixture(scope="module")
def torch_graph(card: ModelCard) -> ServingGraph:
    backbone, config = load_backbone(CHECKPOINTS / "fmhct_demo.pt")
    heads = {
        task: load_head(CHECKPOINTS / f"fmhct_demo_{task}_classifier.pt", config.embed_dim)
        for task in card.task_names
    }
    return ServingGraph(backbone, heads).eval()


def reference_outputs(graph: ServingGraph, nifti: bytes, tmp_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """What the PyTorch model says about the same scan, preprocessed by the production preprocessing."""
    path = tmp_path / "scan.nii"
    path.write_bytes(nifti)
    image = nib.load(path)
    volume = Volume(hu=np.asarray(image.dataobj, dtype=np.float32), affine=np.asarray(image.affine))
    tensor = torch.from_numpy(preprocess(volume)[np.newaxis])
    with torch.no_grad():
        probabilities, embedding, *_ = graph(tensor)  # (+ the attention maps)
    return probabilities[0].numpy(), embedding[0].numpy()


def predict(client: httpx.Client, body: bytes, **params: str) -> dict:
    response = client.post(
        "/v1/predict", content=body, params=params, headers={"Content-Type": "application/octet-stream"}
    )
    assert response.status_code == 200, response.text
    return response.json()


def probabilities(result: dict) -> dict[str, float]:
    return {finding["name"]: finding["probability"] for finding in result["findings"]}


def test_served_probabilities_equal_pytorch(
    client: httpx.Client, scans: dict[str, bytes], torch_graph: ServingGraph, card: ModelCard, tmp_path: Path
) -> None:
    for name, body in scans.items():
        served = predict(client, body, include="embedding")
        expected_probabilities, expected_embedding = reference_outputs(torch_graph, body, tmp_path)
        got = probabilities(served)
        for index, task in enumerate(card.task_names):
            assert abs(got[task] - float(expected_probabilities[index])) <= 1e-3, (name, task)
        embedding = np.asarray(served["embedding"], dtype=np.float32)
        assert embedding.shape == expected_embedding.shape
        assert np.max(np.abs(embedding - expected_embedding)) <= 1e-3 * max(
            1.0, np.abs(expected_embedding).max()
        )


def test_lesion_scans_score_higher(client: httpx.Client, scans: dict[str, bytes]) -> None:
    normal = probabilities(predict(client, scans["normal"]))
    for finding in ("hemorrhage", "edema"):
        lesion = probabilities(predict(client, scans[finding]))
        assert lesion[finding] > normal[finding], (finding, lesion, normal)


def test_response_follows_the_contract(
    client: httpx.Client, scans: dict[str, bytes], card: ModelCard
) -> None:
    response = client.post(
        "/v1/predict",
        content=gzip.compress(scans["hemorrhage"]),
        headers={"Content-Type": "application/gzip", "X-Request-ID": "trace-123"},
    )
    assert response.status_code == 200, response.text
    assert response.headers["X-Request-ID"] == "trace-123"
    body = response.json()
    assert body["request_id"] == "trace-123"
    assert body["model"] == {
        "name": card.name,
        "version": card.model_version,
        "sha256": card.checkpoint_sha256,
    }
    assert [f["name"] for f in body["findings"]] == card.task_names
    thresholds = {t.name: t.threshold for t in card.tasks}
    for finding in body["findings"]:
        assert 0.0 <= finding["probability"] <= 1.0
        assert finding["threshold"] == thresholds[finding["name"]]
        assert finding["positive"] == (finding["probability"] >= finding["threshold"])
    assert "embedding" not in body or body["embedding"] is None
    assert body["input"]["source_format"] == "nifti"
    assert len(body["input"]["shape"]) == 3 and len(body["input"]["spacing_mm"]) == 3
    timings = body["timings_ms"]
    assert set(timings) == {"decode", "validate", "preprocess", "queue", "infer", "total"}
    assert timings["total"] >= timings["preprocess"] + timings["infer"]
    assert "NOT FOR CLINICAL USE" in body["notice"]


def test_task_subset_and_unknown_task(client: httpx.Client, scans: dict[str, bytes]) -> None:
    subset = predict(client, scans["normal"], tasks="edema")
    assert [f["name"] for f in subset["findings"]] == ["edema"]
    response = client.post("/v1/predict", content=scans["normal"], params={"tasks": "edema,fracture"})
    assert response.status_code == 400
    assert response.headers["content-type"] == PROBLEM
    assert response.json()["code"] == "unknown_task"
    assert response.json()["observed"] == ["fracture"]


def test_models_endpoint_describes_the_served_model(client: httpx.Client, card: ModelCard) -> None:
    response = client.get("/v1/models")
    assert response.status_code == 200
    (model,) = response.json()["models"]
    assert model["name"] == MODEL_NAME
    assert [t["name"] for t in model["tasks"]] == card.task_names
    assert all(t["heldout_auc"] >= 0.95 for t in model["tasks"])
    assert model["synthetic_demo"] is True
    assert model["input"]["shape"] == [-1, 3, 96, 96, 96]
    assert model["preprocessing_version"] == card.preprocessing_version


def _problem(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    assert response.headers.get("X-Request-ID")
    problem = response.json()
    assert problem["code"] == code and problem["status"] == status
    assert problem["type"].endswith(code) and problem["title"] and problem["detail"]
    return problem


def _nifti(data: np.ndarray, spacing: float = 1.0) -> bytes:
    return nib.Nifti1Image(data, np.diag([spacing, spacing, spacing, 1.0])).to_bytes()


def test_bad_inputs_get_specific_problems(client: httpx.Client) -> None:
    octet = {"Content-Type": "application/octet-stream"}
    _problem(
        client.post("/v1/predict", content=b"certainly not a scan" * 40, headers=octet),
        400,
        "unreadable_file",
    )
    _problem(client.post("/v1/predict", content=b"", headers=octet), 400, "empty_body")
    _problem(
        client.post("/v1/predict", content=b"hello", headers={"Content-Type": "text/plain"}),
        415,
        "unsupported_media_type",
    )
    truncated = _nifti(np.zeros((64, 64, 32), np.int16))[:5000]
    _problem(client.post("/v1/predict", content=truncated, headers=octet), 400, "unreadable_file")
    air = np.full((96, 96, 64), -1000, np.int16)
    _problem(client.post("/v1/predict", content=_nifti(air), headers=octet), 422, "no_foreground")
    nan = np.zeros((64, 64, 32), np.float32)
    nan[10, 10, 10] = np.nan
    problem = _problem(
        client.post("/v1/predict", content=_nifti(nan), headers=octet), 422, "non_finite_values"
    )
    assert problem["observed"] == "1 non-finite voxels"
    four_d = np.zeros((32, 32, 16, 3), np.int16)
    problem = _problem(client.post("/v1/predict", content=_nifti(four_d), headers=octet), 422, "not_3d")
    assert problem["observed"] == [32, 32, 16, 3]
    _problem(client.post("/v1/predict", params={"include": "heatmap"}, content=b"x"), 400, "invalid_include")
    # The limit is 64 MiB in these tests (HEADCT_MAX_UPLOAD_BYTES); Content-Length alone triggers it.
    _problem(
        client.post("/v1/predict", content=b"\0" * ((64 << 20) + 1), headers=octet), 413, "payload_too_large"
    )
    assert client.get("/livez").status_code == 200


def test_health_and_metrics(client: httpx.Client, scans: dict[str, bytes]) -> None:
    assert client.get("/livez").json() == {"status": "alive"}
    assert client.get("/readyz").json()["status"] == "ready"
    predict(client, scans["normal"])
    client.post(
        "/v1/predict", content=b"not a scan" * 100, headers={"Content-Type": "application/octet-stream"}
    )
    text = client.get("/metrics").text
    assert 'headct_requests_total{route="/v1/predict",status="200"}' in text
    assert 'headct_stage_duration_seconds_bucket{le="+Inf",stage="preprocess"}' in text
    assert "headct_model_ready 1.0" in text
    assert 'headct_finding_probability_count{finding="hemorrhage"}' in text
    assert 'headct_rejections_total{code="unreadable_file"}' in text
    openapi = client.get("/openapi.json").json()
    documented = set(openapi["paths"]["/v1/predict"]["post"]["responses"])
    assert {"200", "400", "413", "415", "422", "503", "504"} <= documented
