"""export.reference: the ONNX Runtime reference file that gates TensorRT engines, on a tiny real ONNX."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from export import reference
from headct import contract

SHAPE = contract.INPUT_SHAPE


class Tiny(nn.Module):
    """Same I/O contract as the serving graph (image FP16 [B,3,96,96,96]), two backbone groups."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Linear(3, 2)
        self.embed = nn.Linear(3, 4)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        pooled = image.float().mean(dim=(2, 3, 4))
        probabilities = torch.softmax(self.head(pooled), dim=-1)
        embedding = self.embed(pooled)
        return probabilities, embedding, probabilities[:, :1], embedding * 2


OUTPUTS = ["probabilities__a", "embedding__a", "probabilities__b", "embedding__b"]


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter, as export uses
        _export(path)
    return path


def _export(path: Path) -> None:
    torch.onnx.export(
        Tiny().eval(),
        (torch.zeros(2, *SHAPE, dtype=torch.float16),),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=[contract.INPUT_NAME],
        output_names=OUTPUTS,
        dynamic_axes={name: {0: "batch"} for name in (contract.INPUT_NAME, *OUTPUTS)},
    )


def test_write_reference_stores_inputs_and_onnx_runtime_outputs(tiny_onnx: Path) -> None:
    rng = np.random.default_rng(1)
    image = rng.random((2, *SHAPE), dtype=np.float32).astype(np.float16)
    out = reference.write_reference(tiny_onnx, inputs=[image], samples=["a", "b"])
    assert out == tiny_onnx.with_name("model.reference.npz")
    with np.load(out, allow_pickle=False) as data:
        assert set(data.files) == {"image", *OUTPUTS, "__meta__"}
        np.testing.assert_array_equal(data["image"], image)
        assert data["image"].dtype == np.float16
    loaded = reference.load_reference(out)
    assert loaded.onnx_sha256 == reference.sha256_file(tiny_onnx)
    assert loaded.meta["samples"] == ["a", "b"] and loaded.meta["outputs"] == OUTPUTS
    assert loaded.batch_size == 2
    # The stored outputs are what ONNX Runtime computes (and what the tiny module computes).
    with torch.inference_mode():
        expected = [t.numpy() for t in Tiny().eval()(torch.from_numpy(image))]
    for name, want in zip(OUTPUTS, expected, strict=True):
        assert loaded.outputs[name].dtype == np.float32
        np.testing.assert_allclose(loaded.outputs[name], want, rtol=1e-4, atol=1e-5)
    # ... and compare equal to themselves, generically over the grouped output names.
    result = reference.compare_outputs(loaded.outputs, loaded.outputs)
    assert result.passed and result.max_abs_probability_diff == 0.0
    assert set(result.min_embedding_cosine) == {"embedding__a", "embedding__b"}


def test_default_inputs_are_two_random_volumes_and_one_synthetic_head(
    tiny_onnx: Path, tmp_path: Path
) -> None:
    out = reference.write_reference(tiny_onnx, tmp_path / "ref.npz")
    loaded = reference.load_reference(out)
    image = loaded.inputs["image"]
    assert image.shape == (3, *SHAPE) and image.dtype == np.float16
    assert loaded.meta["samples"] == ["random-0", "random-1", "synthetic-head"]
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    np.testing.assert_array_equal(image[2], reference.synthetic_head_input(0))
    # A head is mostly air (0) with tissue, unlike the uniform random volumes.
    assert float((image[2] == 0).mean()) > 0.3 > float((image[0] == 0).mean())
    again = reference.reference_inputs(0, synthetic_head=False)["image"]
    np.testing.assert_array_equal(again, image[:2])


def test_wrong_inputs_are_rejected(tiny_onnx: Path, tmp_path: Path) -> None:
    image = np.zeros((1, *SHAPE), np.float16)
    with pytest.raises(ValueError, match="do not match the graph's inputs"):
        reference.write_reference(tiny_onnx, tmp_path / "r.npz", inputs={"volume": image})
    with pytest.raises(ValueError, match="2 input arrays for 1 graph inputs"):
        reference.write_reference(tiny_onnx, tmp_path / "r.npz", inputs=[image, image])


def test_load_reference_refuses_foreign_files(tmp_path: Path) -> None:
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(reference.ReferenceError, match="cannot read"):
        reference.load_reference(junk)
    plain = tmp_path / "plain.npz"
    np.savez(plain, image=np.zeros(1))
    with pytest.raises(reference.ReferenceError, match="__meta__"):
        reference.load_reference(plain)
    other = tmp_path / "other.npz"
    np.savez(other, __meta__=np.array(json.dumps({"format": "v0"})))
    with pytest.raises(reference.ReferenceError, match="format"):
        reference.load_reference(other)


def test_compare_outputs_thresholds() -> None:
    want = {
        "probabilities": np.array([[0.2, 0.7], [0.5, 0.5]], np.float32),
        "embedding": np.array([[1.0, 0.0], [0.0, 2.0]], np.float32),
    }
    ok = reference.compare_outputs(want, {**want, "probabilities": want["probabilities"] + 0.009})
    assert ok.passed and ok.max_abs_probability_diff == pytest.approx(0.009, abs=1e-6)
    bad = reference.compare_outputs(want, {**want, "probabilities": want["probabilities"] + 0.011})
    assert not bad.passed and "max |Δp|" in bad.summary()
    rotated = np.array([[1.0, 0.2], [0.0, 2.0]], np.float32)  # cosine 0.981 for sample 0
    result = reference.compare_outputs(want, {**want, "embedding": rotated})
    assert not result.passed and result.min_embedding_cosine["embedding"] == pytest.approx(0.98058, abs=1e-4)
    nan = reference.compare_outputs(want, {**want, "embedding": want["embedding"] * np.nan})
    assert not nan.passed
    shape = reference.compare_outputs(want, {**want, "embedding": want["embedding"][:1]})
    assert not shape.passed and "shape" in shape.failures[0]
