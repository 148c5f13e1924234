"""ONNX export of a tiny-config FM-HCT serving graph: graph contract, parity, and broken-parity detection."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from export.heads import AttentiveHead, LinearHead
from export.model import FMHCTViT, ViTConfig
from export.onnx_export import (
    BatchParity,
    OnnxExportError,
    OnnxExportInfo,
    ParityError,
    ParityReport,
    check_parity,
    export_onnx,
    verify_onnx_graph,
)
from export.serving_graph import GraphGroup, ServingGraph
from headct import contract

# 96^3 input in 32^3 patches -> 27 tokens + CLS; embed 24 = 6 x 4 (sin-cos table), 2 heads.
TINY = ViTConfig(patch_size=32, embed_dim=24, depth=2, num_heads=2, mlp_dim=48)
TASKS = ("hemorrhage", "edema")


def tiny_graph(seed: int = 0) -> ServingGraph:
    torch.manual_seed(seed)
    heads: dict[str, torch.nn.Module] = {
        "hemorrhage": LinearHead(TINY.embed_dim),
        "edema": AttentiveHead(TINY.embed_dim, TINY.num_heads),
    }
    for head in heads.values():  # non-trivial BatchNorm statistics, so the BN path is really exercised
        for name, buffer in head.named_buffers():
            if name.endswith("running_mean"):
                buffer.normal_()
            elif name.endswith("running_var"):
                buffer.uniform_(0.5, 2.0)
    return ServingGraph(FMHCTViT(TINY), heads)


@pytest.fixture(scope="module")
def graph() -> ServingGraph:
    return tiny_graph()


@pytest.fixture(scope="module")
def exported(graph: ServingGraph, tmp_path_factory: pytest.TempPathFactory) -> OnnxExportInfo:
    return export_onnx(graph, tmp_path_factory.mktemp("onnx") / "model.onnx", max_batch_size=8)


def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value.type.tensor_type.shape.dim]


def test_graph_has_the_serving_contract(exported: OnnxExportInfo) -> None:
    model = onnx.load(str(exported.path))
    assert {o.domain: o.version for o in model.opset_import}.get("", 17) == 17
    assert exported.opset == 17 and exported.export_batch_size == 2

    (image,) = model.graph.input
    assert image.name == contract.INPUT_NAME
    assert image.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    batch, *rest = _dims(image)
    assert isinstance(batch, str) and batch  # symbolic: only the batch axis is dynamic
    assert tuple(rest) == contract.INPUT_SHAPE

    outputs = {o.name: o for o in model.graph.output}
    assert list(outputs) == [contract.PROBABILITIES_NAME, contract.EMBEDDING_NAME, contract.ATTENTION_NAME]
    grid = TINY.grid_size
    for name, shape in (
        (contract.PROBABILITIES_NAME, [len(TASKS)]),
        (contract.EMBEDDING_NAME, [TINY.embed_dim]),
        (contract.ATTENTION_NAME, [len(TASKS), grid, grid, grid]),
    ):
        assert outputs[name].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        dims = _dims(outputs[name])
        assert isinstance(dims[0], str) and dims[1:] == shape
    assert exported.output_shapes[contract.ATTENTION_NAME] == (len(TASKS), grid, grid, grid)
    assert (exported.num_tasks, exported.embedding_dim) == (len(TASKS), TINY.embed_dim)
    onnx.checker.check_model(str(exported.path), full_check=True)


def test_one_layer_normalization_node_per_layernorm(exported: OnnxExportInfo) -> None:
    ops = [node.op_type for node in onnx.load(str(exported.path)).graph.node]
    expected = 2 * TINY.depth + 1  # att_norm + ffn_norm per block, final norm
    assert ops.count("LayerNormalization") == expected == exported.layer_norm_nodes
    assert "Pow" not in ops  # a decomposed LayerNorm squares (x - mean) with Pow


def test_parity_at_batch_sizes_the_trace_never_saw(graph: ServingGraph, exported: OnnxExportInfo) -> None:
    report = check_parity(graph, exported.path, batch_sizes=(1, 3), seed=7)
    assert [b.batch_size for b in report.batches] == [1, 3]
    assert report.passed, report.summary()
    assert report.max_abs_probability_diff <= 1e-4
    assert report.max_abs_embedding_diff <= 1e-3
    assert report.max_abs_attention_diff <= 1e-4
    report.raise_if_failed()


def test_attention_output_leaves_probabilities_and_embedding_bit_identical(graph: ServingGraph) -> None:
    image = torch.rand(2, *contract.INPUT_SHAPE, generator=torch.Generator().manual_seed(3)).half()
    plain = ServingGraph(
        groups=[GraphGroup(graph.backbone, dict(zip(TASKS, graph.heads, strict=True)), attention_output=None)]
    )
    assert plain.output_names == (contract.PROBABILITIES_NAME, contract.EMBEDDING_NAME)
    with torch.inference_mode():
        probabilities, embedding, attention = graph(image)
        want_probabilities, want_embedding = plain(image)
    assert torch.equal(probabilities, want_probabilities) and torch.equal(embedding, want_embedding)
    grid = TINY.grid_size
    assert attention.shape == (2, len(TASKS), grid, grid, grid) and attention.dtype == torch.float32
    assert torch.all(attention >= 0)
    torch.testing.assert_close(attention.sum(dim=(2, 3, 4)), torch.ones(2, len(TASKS)))
    assert graph.attention_methods == {
        "hemorrhage": contract.ATTENTION_CLS_LAST_BLOCK,
        "edema": contract.ATTENTION_HEAD_QUERY,
    }


def test_attention_maps_are_the_attention_the_model_computes(graph: ServingGraph) -> None:
    """cls_last_block = SDPA's own CLS row in the last block; head_query = the head's own SDPA weights."""
    image = torch.rand(1, *contract.INPUT_SHAPE, generator=torch.Generator().manual_seed(4)).half().float()
    backbone = graph.backbone
    cfg = backbone.config
    with torch.inference_mode():
        _, _, attention = graph(image)
        h = backbone.prepare_tokens(image)
        for block in backbone.blocks[:-1]:
            h = block(h)
        last = backbone.blocks[-1]
        qkv = last.attn.qkv(last.att_norm(h)).reshape(1, cfg.num_tokens, 3, cfg.num_heads, cfg.head_dim)
        q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
        full = torch.softmax(q @ k.transpose(-1, -2) / cfg.head_dim**0.5, dim=-1)  # (1, H, N, N)
        cls_row = full[0, :, 0, 1:].mean(dim=0)
        tokens = backbone.forward_features(image)
        head = graph.heads[1]
        x = (tokens - head.bn1.running_mean) * torch.rsqrt(head.bn1.running_var + head.bn1.eps)
        keys = head.wkv(x)[..., : cfg.embed_dim].reshape(1, -1, cfg.num_heads, cfg.head_dim).transpose(1, 2)
        query = head.cls_token.reshape(1, cfg.num_heads, 1, cfg.head_dim)
        head_row = torch.softmax(query @ keys.transpose(-1, -2) / cfg.head_dim, dim=-1)[0, :, 0, 1:].mean(0)
    grid = cfg.grid_size
    torch.testing.assert_close(attention[0, 0], (cls_row / cls_row.sum()).reshape(grid, grid, grid))
    torch.testing.assert_close(attention[0, 1], (head_row / head_row.sum()).reshape(grid, grid, grid))


def test_patch_tokens_follow_the_input_axis_order() -> None:
    """Patch token p = i*g*g + j*g + k covers input block (i, j, k): maps use the input's axis order."""
    torch.manual_seed(0)
    embedding = FMHCTViT(TINY).patch_embedding
    image = torch.zeros(1, *contract.INPUT_SHAPE)
    size, grid = TINY.patch_size, TINY.grid_size
    image[:, :, size * 2 : size * 3, 0:size, size * 1 : size * 2] = 1.0  # block (2, 0, 1)
    with torch.inference_mode():
        delta = (embedding(image) - embedding(torch.zeros_like(image))).abs().sum(dim=-1)[0]
    (changed,) = torch.nonzero(delta > 1e-6).flatten().tolist()
    assert changed == 2 * grid * grid + 0 * grid + 1


def test_export_leaves_affine_free_batchnorms_untouched(
    graph: ServingGraph, exported: OnnxExportInfo
) -> None:
    norms = [m for m in graph.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert norms and all(m.weight is None and m.bias is None and not m.affine for m in norms)


def test_tampered_initializer_fails_parity(
    graph: ServingGraph, exported: OnnxExportInfo, tmp_path: Path
) -> None:
    model = onnx.load(str(exported.path))
    # The hemorrhage head's final Linear bias (2 values) drives its logits directly.
    target = next(init for init in model.graph.initializer if init.name.endswith("heads.0.linear.bias"))
    tampered = numpy_helper.to_array(target) + np.array([-2.0, 2.0], dtype=np.float32)
    target.CopyFrom(numpy_helper.from_array(tampered, target.name))
    broken = tmp_path / "tampered.onnx"
    onnx.save(model, str(broken))

    report = check_parity(graph, broken, seed=7)
    assert not report.passed
    assert report.max_abs_probability_diff > 1e-4
    with pytest.raises(ParityError, match=r"FAIL: max \|dprobability\| [0-9.e+-]+ \(tol 1e-04\)"):
        report.raise_if_failed()


def test_opset_below_17_is_refused(graph: ServingGraph, tmp_path: Path) -> None:
    with pytest.raises(OnnxExportError, match="LayerNorm would not export as one node"):
        export_onnx(graph, tmp_path / "m.onnx", opset=16, max_batch_size=8)


def test_decomposed_layernorm_is_rejected(exported: OnnxExportInfo) -> None:
    model = onnx.load(str(exported.path))
    with pytest.raises(OnnxExportError, match="LayerNorm was decomposed"):
        verify_onnx_graph(
            model,
            opset=17,
            expected_layer_norms=exported.layer_norm_nodes + 1,
            num_tasks=exported.num_tasks,
            embedding_dim=exported.embedding_dim,
        )


def test_static_batch_is_rejected(exported: OnnxExportInfo) -> None:
    model = onnx.load(str(exported.path))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2  # as if exported without dynamic_axes
    with pytest.raises(OnnxExportError, match="image dims"):
        verify_onnx_graph(
            model, opset=17, expected_layer_norms=exported.layer_norm_nodes, num_tasks=2, embedding_dim=24
        )


def test_nan_difference_fails_parity() -> None:
    report = ParityReport(batches=(BatchParity(1, 0.0, 0.0), BatchParity(3, float("nan"), 0.0)), seed=0)
    assert not report.passed and "nan" in report.summary()
