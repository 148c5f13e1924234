"""`include=attention` end to end: NIfTI head -> real gateway -> real Triton (Python backend, ONNX Runtime)
-> per-finding 8x8x8 explanation maps, checked against the PyTorch graph on the same preprocessed tensor."""

from __future__ import annotations

import httpx
import nibabel as nib
import numpy as np
import pytest
import torch

from demo.synthetic_head import make_head, to_nifti
from export.checkpoint import load_backbone, load_head
from export.serving_graph import ServingGraph
from headct import contract
from headct.model_card import MODEL_CARD_FILENAME, ModelCard
from headct.preprocess import preprocess
from headct.volume import Volume
from tests.stack import CHECKPOINTS, MODEL_NAME, REPOSITORY

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def card() -> ModelCard:
    return ModelCard.model_validate_json((REPOSITORY / MODEL_NAME / MODEL_CARD_FILENAME).read_text())


@pytest.fixture(scope="module")
def scan() -> bytes:
    return to_nifti(make_head(np.random.default_rng(4243), hemorrhage=True, edema=False)).to_bytes()


def _torch_maps(card: ModelCard, body: bytes, tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    backbone, config = load_backbone(CHECKPOINTS / "fmhct_demo.pt")
    heads = {
        task: load_head(CHECKPOINTS / f"fmhct_demo_{task}_classifier.pt", config.embed_dim)
        for task in card.task_names
    }
    graph = ServingGraph(backbone, heads).eval()
    path = tmp_path_factory.mktemp("attention") / "scan.nii"
    path.write_bytes(body)
    image = nib.load(path)
    volume = Volume(hu=np.asarray(image.dataobj, dtype=np.float32), affine=np.asarray(image.affine))
    with torch.no_grad():
        _, _, attention = graph(torch.from_numpy(preprocess(volume)[np.newaxis]))
    return attention[0].numpy()


def _post(client: httpx.Client, body: bytes, **params: str) -> dict:
    response = client.post(
        "/v1/predict", content=body, params=params, headers={"Content-Type": "application/octet-stream"}
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_include_attention_serves_the_pytorch_maps(
    client: httpx.Client, scan: bytes, card: ModelCard, tmp_path_factory: pytest.TempPathFactory
) -> None:
    body = _post(client, scan, include="attention")
    want = _torch_maps(card, scan, tmp_path_factory)
    methods = {task.name: task.attention_method for task in card.tasks}
    assert list(body["attention"]) == card.task_names
    for index, task in enumerate(card.task_names):
        served = body["attention"][task]
        assert served["grid"] == list(contract.ATTENTION_GRID)
        assert served["space"] == "model_input_ras" and served["method"] == methods[task]
        values = np.asarray(served["values"], dtype=np.float64).reshape(contract.ATTENTION_GRID)
        assert values.min() >= 0 and abs(values.sum() - 1.0) < 1e-4
        assert np.max(np.abs(values - want[index])) <= 1e-4, task
    plain = _post(client, scan)
    assert "attention" not in plain
    assert [f["probability"] for f in plain["findings"]] == [f["probability"] for f in body["findings"]]


def test_attention_for_a_task_subset(client: httpx.Client, scan: bytes) -> None:
    body = _post(client, scan, include="attention,embedding", tasks="edema")
    assert list(body["attention"]) == ["edema"] and body["embedding"] is not None
    bad = client.post("/v1/predict", content=scan, params={"include": "attention,saliency"})
    assert bad.status_code == 400 and bad.json()["code"] == "invalid_include"


def test_grpc_include_attention_matches_rest(
    gateway_grpc_port: int, client: httpx.Client, scan: bytes
) -> None:
    import grpc

    from api.grpc.proto.headct.v1 import headct_pb2, headct_pb2_grpc

    rest = _post(client, scan, include="attention")
    with grpc.insecure_channel(f"127.0.0.1:{gateway_grpc_port}") as channel:
        stub = headct_pb2_grpc.HeadCTStub(channel)
        options = headct_pb2.PredictOptions(content_type="application/octet-stream", include_attention=True)
        answer = stub.Predict(headct_pb2.PredictRequest(options=options, scan=scan))
        plain = stub.Predict(
            headct_pb2.PredictRequest(
                options=headct_pb2.PredictOptions(content_type="application/octet-stream"), scan=scan
            )
        )
    assert sorted(answer.attention) == sorted(rest["attention"]) and not plain.attention
    for task, served in rest["attention"].items():
        got = answer.attention[task]
        assert (
            list(got.grid) == served["grid"]
            and got.method == served["method"]
            and got.space == served["space"]
        )
        np.testing.assert_allclose(np.asarray(got.values), served["values"], atol=1e-6)
