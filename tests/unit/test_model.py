"""FM-HCT backbone, heads and serving graph vs the official architecture (tiny configs; full size on
meta only)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from export.heads import AttentiveHead, LinearHead, batch_norm_last_dim
from export.model import FMHCTViT, ViTConfig, sincos_position_embedding_3d
from export.serving_graph import ServingGraph

# Real input grid (96³, patch 12 -> 512 patches) with a tiny width/depth so forwards stay cheap.
TINY = ViTConfig(embed_dim=24, depth=2, num_heads=2, mlp_dim=48)
TINY_VARIANT = ViTConfig(embed_dim=24, depth=2, num_heads=2, mlp_dim=48, qkv_bias=True, num_register_tokens=4)


def _randomised(config: ViTConfig, seed: int = 0) -> FMHCTViT:
    """A model whose every parameter (norms, CLS, registers included) is random, so no term can hide."""
    torch.manual_seed(seed)
    model = FMHCTViT(config)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn_like(param) * 0.2)
    return model.eval()


def _volume(batch: int, seed: int = 1) -> Tensor:
    return torch.rand(batch, 3, 96, 96, 96, generator=torch.Generator().manual_seed(seed))


def _random_bn_stats(module: nn.Module, seed: int = 2) -> None:
    gen = torch.Generator().manual_seed(seed)
    for name, buffer in module.named_buffers():
        if name.endswith("running_mean"):
            buffer.copy_(torch.randn(buffer.shape, generator=gen))
        elif name.endswith("running_var"):
            buffer.copy_(torch.rand(buffer.shape, generator=gen) + 0.5)


def _expected_released_shapes() -> dict[str, tuple[int, ...]]:
    """The released backbone's state_dict layout, written out independently of the model code."""
    shapes: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, 768),
        "patch_embedding.position_embeddings": (1, 512, 768),
        "patch_embedding.patch_embeddings.weight": (768, 3, 12, 12, 12),
        "patch_embedding.patch_embeddings.bias": (768,),
        "norm.weight": (768,),
        "norm.bias": (768,),
    }
    for n in range(12):
        shapes |= {
            f"blocks.{n}.mlp.linear1.weight": (3072, 768),
            f"blocks.{n}.mlp.linear1.bias": (3072,),
            f"blocks.{n}.mlp.linear2.weight": (768, 3072),
            f"blocks.{n}.mlp.linear2.bias": (768,),
            f"blocks.{n}.att_norm.weight": (768,),
            f"blocks.{n}.att_norm.bias": (768,),
            f"blocks.{n}.ffn_norm.weight": (768,),
            f"blocks.{n}.ffn_norm.bias": (768,),
            f"blocks.{n}.attn.qkv.weight": (2304, 768),
            f"blocks.{n}.attn.proj.weight": (768, 768),
            f"blocks.{n}.attn.proj.bias": (768,),
        }
    return shapes


# ------------------------------------------------------------------------------------------ full size


def test_full_size_released_variant_keys_shapes_and_count() -> None:
    with torch.device("meta"):
        model = FMHCTViT(ViTConfig())
    state = model.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == _expected_released_shapes()
    assert len(state) == 138
    assert sum(p.numel() for p in model.parameters()) == 89_404_416
    assert model.patch_embedding.position_embeddings.requires_grad  # trainable and saved, as upstream


def test_full_size_training_variant_adds_qkv_bias_and_registers() -> None:
    with torch.device("meta"):
        model = FMHCTViT(ViTConfig(qkv_bias=True, num_register_tokens=4))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    extra = {f"blocks.{n}.attn.qkv.bias": (2304,) for n in range(12)} | {"register_tokens": (1, 4, 768)}
    assert shapes == _expected_released_shapes() | extra
    assert sum(p.numel() for p in model.parameters()) == 89_435_136


def test_config_defaults_round_trip_and_validation() -> None:
    config = ViTConfig()
    assert (config.num_tokens, config.head_dim, config.grid_size) == (513, 64, 8)
    assert ViTConfig(num_register_tokens=4).num_tokens == 517
    assert ViTConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown"):
        ViTConfig.from_dict({**config.to_dict(), "hidden_size": 768})
    with pytest.raises(ValueError, match="multiple of patch_size"):
        ViTConfig(img_size=100)
    with pytest.raises(ValueError, match="num_heads"):
        ViTConfig(num_heads=7)


# ------------------------------------------------------------------------------------- tiny forwards


@pytest.mark.parametrize(("config", "tokens"), [(TINY, 513), (TINY_VARIANT, 517)])
def test_forward_token_count_and_hidden_states(config: ViTConfig, tokens: int) -> None:
    model = _randomised(config)
    with torch.no_grad():
        out, hidden = model(_volume(2))
        features = model.forward_features(_volume(2))
    assert out.shape == (2, tokens, config.embed_dim)
    assert len(hidden) == config.depth
    assert all(h.shape == out.shape for h in hidden)
    # The per-block list is taken before the final norm; forward_features is the same tokens, no list.
    torch.testing.assert_close(out, model.norm(hidden[-1]))
    torch.testing.assert_close(features, out)


def test_norm_eps_and_exact_gelu() -> None:
    model = FMHCTViT(TINY)
    for block in model.blocks:
        assert block.att_norm.eps == 1e-5 and block.ffn_norm.eps == 1e-5
        assert isinstance(block.mlp.act, nn.GELU) and block.mlp.act.approximate == "none"
    assert model.norm.eps == 1e-6
    x = torch.linspace(-4, 4, 101)
    erf_gelu = 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))
    tanh_gelu = F.gelu(x, approximate="tanh")
    torch.testing.assert_close(model.blocks[0].mlp.act(x), erf_gelu, rtol=0, atol=1e-6)
    assert (model.blocks[0].mlp.act(x) - tanh_gelu).abs().max() > 1e-4  # the check can tell them apart


def test_positions_are_added_to_patches_only() -> None:
    config = TINY_VARIANT
    model = _randomised(config)
    x = _volume(2)
    with torch.no_grad():
        tokens = model.prepare_tokens(x)
    # Hand patchify: (B, C, 8, 12, 8, 12, 8, 12) -> (B, 512, C*12^3), patch order axis0-major like Conv3d.
    g, p = config.grid_size, config.patch_size
    patches = x.reshape(2, 3, g, p, g, p, g, p).permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(2, g**3, -1)
    conv = model.patch_embedding.patch_embeddings
    expected = patches @ conv.weight.detach().reshape(config.embed_dim, -1).T + conv.bias.detach()
    expected = expected + model.patch_embedding.position_embeddings.detach()
    assert tokens.shape == (2, 517, config.embed_dim)
    assert torch.equal(tokens[:, 0], model.cls_token.detach()[0].expand(2, -1))  # CLS: no position
    assert torch.equal(tokens[:, 1:5], model.register_tokens.detach().expand(2, -1, -1))  # after CLS
    torch.testing.assert_close(tokens[:, 5:], expected, rtol=1e-4, atol=1e-4)


def _reference_forward(model: FMHCTViT, x: Tensor) -> tuple[Tensor, list[Tensor]]:
    """Independent re-derivation from the spec: explicit attention softmax, erf GELU, pre-norm blocks."""
    cfg = model.config
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    d, heads, hd = cfg.embed_dim, cfg.num_heads, cfg.head_dim
    h = F.conv3d(
        x, sd["patch_embedding.patch_embeddings.weight"], sd["patch_embedding.patch_embeddings.bias"], 12
    )
    h = h.flatten(2).transpose(1, 2) + sd["patch_embedding.position_embeddings"]
    prefix = [sd["cls_token"].expand(x.shape[0], -1, -1)]
    if "register_tokens" in sd:
        prefix.append(sd["register_tokens"].expand(x.shape[0], -1, -1))
    h = torch.cat([*prefix, h], dim=1)
    hidden = []
    for n in range(cfg.depth):
        w = {k.removeprefix(f"blocks.{n}."): v for k, v in sd.items() if k.startswith(f"blocks.{n}.")}
        a = F.layer_norm(h, (d,), w["att_norm.weight"], w["att_norm.bias"], eps=1e-5)
        qkv = a @ w["attn.qkv.weight"].T + w.get("attn.qkv.bias", 0)
        q, k, v = (qkv[..., i * d : (i + 1) * d].unflatten(-1, (heads, hd)).transpose(1, 2) for i in range(3))
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)
        h = h + (attn @ v).transpose(1, 2).flatten(2) @ w["attn.proj.weight"].T + w["attn.proj.bias"]
        m = F.layer_norm(h, (d,), w["ffn_norm.weight"], w["ffn_norm.bias"], eps=1e-5)
        m = m @ w["mlp.linear1.weight"].T + w["mlp.linear1.bias"]
        m = 0.5 * m * (1 + torch.erf(m / math.sqrt(2)))
        h = h + m @ w["mlp.linear2.weight"].T + w["mlp.linear2.bias"]
        hidden.append(h)
    return F.layer_norm(h, (d,), sd["norm.weight"], sd["norm.bias"], eps=1e-6), hidden


def test_forward_matches_hand_written_reference() -> None:
    model = _randomised(TINY_VARIANT)
    x = _volume(2)
    with torch.no_grad():
        out, hidden = model(x)
    ref_out, ref_hidden = _reference_forward(model, x)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-4)
    for got, want in zip(hidden, ref_hidden, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_sincos_table_layout() -> None:
    grid, dim = 8, 48
    table = sincos_position_embedding_3d(grid, dim)
    assert table.shape == (1, grid**3, dim)
    omega = 1.0 / 10000.0 ** (torch.arange(dim // 6) / (dim // 6))
    i0, i1, i2 = 3, 5, 6  # patch at axis0=3, axis1=5, axis2=6
    row = table[0, i0 * grid * grid + i1 * grid + i2]
    expected = torch.cat([f(i * omega) for i in (i1, i0, i2) for f in (torch.sin, torch.cos)])
    torch.testing.assert_close(row, expected)
    model = FMHCTViT(TINY)
    assert torch.equal(
        model.patch_embedding.position_embeddings.detach(), sincos_position_embedding_3d(8, 24)
    )


@pytest.mark.parametrize(
    "shape", [(1, 3, 64, 64, 64), (3, 96, 96, 96), (1, 1, 96, 96, 96), (1, 3, 96, 96, 95)]
)
def test_rejects_inputs_other_than_the_model_grid(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="expects input of shape"):
        FMHCTViT(TINY)(torch.zeros(shape))


# ---------------------------------------------------------------------------------------------- heads


def test_linear_head_batch_one_in_eval() -> None:
    head = LinearHead(24).eval()
    _random_bn_stats(head)
    tokens = torch.randn(1, 513, 24)
    logits = head(tokens)
    assert logits.shape == (1, 2)
    bn = head.bn
    assert not bn.affine and bn.eps == 1e-6
    normed = (tokens[:, 0] - bn.running_mean) / torch.sqrt(bn.running_var + 1e-6)
    torch.testing.assert_close(logits, normed @ head.linear.weight.T + head.linear.bias)
    # Same numbers as torch's own BatchNorm1d in eval mode.
    torch.testing.assert_close(logits, head.linear(bn(tokens[:, 0])))


def _attentive_reference(head: AttentiveHead, tokens: Tensor, double_scale: bool = True) -> Tensor:
    """The official computation written out: bn1 over (B, D, T), explicit softmax, bn2, mean, linear."""
    b, t, d = tokens.shape
    h, hd = head.num_heads, d // head.num_heads
    bn1, bn2 = head.bn1, head.bn2
    x = F.batch_norm(tokens.transpose(1, 2), bn1.running_mean, bn1.running_var, eps=1e-6).transpose(1, 2)
    kv = x @ head.wkv.weight.T
    k = kv[..., :d].reshape(b, t, h, hd).transpose(1, 2)
    v = kv[..., d:].reshape(b, t, h, hd).transpose(1, 2)
    q = head.cls_token.expand(b, 1, d).reshape(b, 1, h, hd).transpose(1, 2) * hd**-0.5
    scores = q @ k.transpose(-1, -2)
    if double_scale:
        scores = scores * hd**-0.5  # SDPA's own default scale, applied on top of the pre-scaled query
    out = (torch.softmax(scores, dim=-1) @ v).reshape(b, 1, d)
    out = F.batch_norm(out.transpose(1, 2), bn2.running_mean, bn2.running_var, eps=1e-6).transpose(1, 2)
    return out.mean(dim=1) @ head.linear.weight.T + head.linear.bias


def test_attentive_head_double_scaling_matches_hand_computation() -> None:
    torch.manual_seed(3)
    head = AttentiveHead(24, num_heads=2).eval()
    with torch.no_grad():
        head.cls_token.normal_(0, 3.0)  # large enough that the score scale visibly matters
        head.wkv.weight.normal_(0, 1.0)
    _random_bn_stats(head)
    tokens = torch.randn(3, 517, 24)
    with torch.no_grad():
        logits = head(tokens)
        torch.testing.assert_close(logits, _attentive_reference(head, tokens), rtol=1e-4, atol=1e-5)
        single = _attentive_reference(head, tokens, double_scale=False)
    assert (logits - single).abs().max() > 1e-3  # a single-scaled implementation would fail this test
    assert head(tokens[:1]).shape == (1, 2)  # batch 1 works in eval
    assert sum(p.numel() for p in AttentiveHead(768, 12).parameters()) == 1_181_954
    keys = set(AttentiveHead(768, 12).state_dict())
    assert {"cls_token", "wkv.weight", "linear.weight", "linear.bias", "bn1.running_var"} <= keys
    assert "wkv.bias" not in keys and "bn1.weight" not in keys


def test_last_dim_batch_norm_equals_batchnorm1d_in_training() -> None:
    ours = nn.BatchNorm1d(8, affine=False, eps=1e-6)
    theirs = nn.BatchNorm1d(8, affine=False, eps=1e-6)
    x = torch.randn(4, 10, 8)
    got = batch_norm_last_dim(ours, x)
    want = theirs(x.transpose(1, 2)).transpose(1, 2)  # the official (B, D, T) layout
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    ours.eval()
    theirs.eval()
    torch.testing.assert_close(batch_norm_last_dim(ours, x), theirs(x.transpose(1, 2)).transpose(1, 2))


# -------------------------------------------------------------------------------------- serving graph


def _serving_graph() -> ServingGraph:
    torch.manual_seed(4)
    heads: dict[str, nn.Module] = {"ICH": LinearHead(24), "keys": AttentiveHead(24, 2), "SDH": LinearHead(24)}
    for head in heads.values():
        _random_bn_stats(head)
    return ServingGraph(_randomised(TINY_VARIANT), heads)


def test_serving_graph_probabilities_embedding_and_fp16() -> None:
    graph = _serving_graph()
    assert graph.task_names == ["ICH", "keys", "SDH"]
    assert not graph.training and not any(m.training for m in graph.modules())
    x = _volume(2).half()
    with torch.no_grad():
        probabilities, embedding, attention = graph(x)
        tokens, _ = graph.backbone(x.float())
        expected = [torch.softmax(head(tokens), dim=-1)[:, 1] for head in graph.heads]
    assert probabilities.dtype == embedding.dtype == torch.float32
    assert probabilities.shape == (2, 3) and embedding.shape == (2, 24)
    torch.testing.assert_close(probabilities, torch.stack(expected, dim=1))
    torch.testing.assert_close(embedding, tokens[:, 0])
    grid = graph.backbone.config.grid_size
    assert attention.dtype == torch.float32 and attention.shape == (2, 3, grid, grid, grid)
    torch.testing.assert_close(attention.sum(dim=(2, 3, 4)), torch.ones(2, 3))


def test_serving_graph_rejects_a_backbone_off_the_contract() -> None:
    with pytest.raises(ValueError, match="serving contract"):
        ServingGraph(
            FMHCTViT(ViTConfig(img_size=48, embed_dim=24, depth=1, num_heads=2)), {"a": LinearHead(24)}
        )
    with pytest.raises(ValueError, match="embed_dim"):
        ServingGraph(FMHCTViT(TINY), {"a": LinearHead(48)})
    with pytest.raises(ValueError, match="at least one"):
        ServingGraph(FMHCTViT(TINY), {})


def test_serving_graph_exports_to_onnx_with_dynamic_batch(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    graph = _serving_graph()
    path = tmp_path / "graph.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy-exporter deprecation notice
        torch.onnx.export(
            graph,
            (graph.example_input(2),),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=list(graph.input_names),
            output_names=list(graph.output_names),
            dynamic_axes={name: {0: "batch"} for name in (*graph.input_names, *graph.output_names)},
        )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 3):  # sizes the trace never saw
        x = _volume(batch, seed=batch).half()
        probabilities, embedding, attention = session.run(None, {graph.input_names[0]: x.numpy()})
        with torch.no_grad():
            want_p, want_e, want_a = graph(x)
        np.testing.assert_allclose(attention, want_a.numpy(), atol=1e-5)
        np.testing.assert_allclose(probabilities, want_p.numpy(), atol=1e-5)
        np.testing.assert_allclose(embedding, want_e.numpy(), atol=1e-4)
