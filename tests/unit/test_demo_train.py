"""demo.train: metrics helpers, case planning, and a seconds-long training smoke run whose files
load with the strict official-layout loaders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from demo import train as T
from headct.model_card import SYNTHETIC_DEMO_NOTICE

# ---- AUC ----------------------------------------------------------------------------------------


def test_roc_auc_by_hand() -> None:
    assert T.roc_auc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1])) == 1.0
    assert T.roc_auc(np.array([0.9, 0.8, 0.2, 0.1]), np.array([0, 0, 1, 1])) == 0.0
    assert T.roc_auc(np.array([0.5, 0.5, 0.5, 0.5]), np.array([0, 1, 0, 1])) == 0.5
    # pairs (pos, neg): (0.4 vs 0.1, 0.4 vs 0.4, 0.35 vs ...): 3 pos x 2 neg, hand count = 4.5 / 6
    scores = np.array([0.1, 0.4, 0.35, 0.4, 0.8])
    labels = np.array([0, 0, 1, 1, 1])
    # pos 0.35: beats 0.1 (1), loses to 0.4 (0) -> 1 ; pos 0.4: beats 0.1, ties 0.4 -> 1.5 ; pos 0.8: 2
    assert T.roc_auc(scores, labels) == pytest.approx(4.5 / 6)
    assert np.isnan(T.roc_auc(np.array([0.1, 0.2]), np.array([1, 1])))


def test_roc_auc_matches_pairwise_definition() -> None:
    rng = np.random.default_rng(0)
    scores = np.round(rng.random(60), 1)  # many ties
    labels = rng.random(60) < 0.4
    pos, neg = scores[labels], scores[~labels]
    pairwise = ((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean()
    assert T.roc_auc(scores, labels) == pytest.approx(pairwise)


def test_binary_metrics() -> None:
    m = T.binary_metrics(np.array([0.2, 0.6, 0.7, 0.4]), np.array([0, 0, 1, 1]), 0.5)
    assert m["sensitivity"] == 0.5 and m["specificity"] == 0.5 and m["n"] == 4 and m["n_positive"] == 2


# ---- case planning -----------------------------------------------------------------------------


def test_plan_is_balanced_deterministic_and_disjoint() -> None:
    cfg = T.DataConfig(seed=7, n_train=30, n_test=10)
    train = T.plan_cases(cfg, "train", cfg.n_train)
    test = T.plan_cases(cfg, "test", cfg.n_test)
    assert len(train) == 32 and len(test) == 12  # rounded up to the 4 finding combinations
    combos = [(c.hemorrhage, c.edema) for c in train]
    assert all(combos.count(k) == 8 for k in {(False, False), (False, True), (True, False), (True, True)})
    assert train == T.plan_cases(cfg, "train", cfg.n_train)
    assert not {c.spawn_key for c in train} & {c.spawn_key for c in test}
    a = train[0].rng().random(4)
    b = test[0].rng().random(4)
    assert not np.allclose(a, b)
    assert any(c.spacing_mm != (1.0, 1.0, 1.0) for c in train)  # some cases exercise the resample


# ---- smoke run ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    from demo import atlas as A

    try:
        A.ensure_atlas()
    except A.AtlasError as exc:
        pytest.fail(
            f"brain CT atlas unavailable ({exc}): `python -m demo.atlas` (run by `make test`) gets it"
        )
    out = tmp_path_factory.mktemp("demo")
    cfg = T.DemoConfig(
        data=T.DataConfig(seed=3, n_train=4, n_test=4, anisotropic_fraction=0.0, lps_fraction=0.5),
        model=T.ModelConfig(embed_dim=192, depth=2, num_heads=3, mlp_dim=192),
        optim=T.OptimConfig(epochs=1, batch_size=4, torch_threads=1),
    )
    lines: list[str] = []
    metrics = T.run(out, cfg, force=True, workers=0, cache_dir=None, log=lines.append)
    assert any(SYNTHETIC_DEMO_NOTICE in line for line in lines)
    return out, metrics


def test_smoke_training_writes_official_layout(smoke_run: tuple[Path, dict]) -> None:
    import torch

    from export.checkpoint import load_backbone, load_head, sha256_file
    from export.heads import LinearHead
    from export.serving_graph import ServingGraph

    out, metrics = smoke_run
    for p in T.output_paths(out):
        assert p.is_file(), p
    raw = torch.load(T.backbone_path(out), map_location="cpu", weights_only=True)
    assert set(raw) >= {"epoch", "best_loss", "state_dict", "momentum_model_state_dict"}
    assert all(k.startswith("_orig_mod.") for k in raw["state_dict"])

    backbone, config = load_backbone(T.backbone_path(out))
    assert (config.embed_dim, config.depth, config.num_heads, config.mlp_dim) == (192, 2, 3, 192)
    heads = {t: load_head(T.head_path(out, t), config.embed_dim) for t in T.TASKS}
    assert all(isinstance(h, LinearHead) for h in heads.values())
    graph = ServingGraph(backbone, heads)
    probs, emb, attention = graph(graph.example_input(2))
    assert probs.shape == (2, 2) and emb.shape == (2, 192) and attention.shape == (2, 2, 8, 8, 8)
    assert torch.isfinite(probs).all()

    saved = json.loads((out / T.METRICS_FILENAME).read_text())
    assert saved["notice"] == SYNTHETIC_DEMO_NOTICE and saved["synthetic_demo"] is True
    assert set(saved["tasks"]) == set(T.TASKS)
    for task in T.TASKS:
        assert saved["tasks"][task]["n"] == 4 and saved["tasks"][task]["threshold"] == 0.5
    assert saved["files"][T.backbone_path(out).name] == sha256_file(T.backbone_path(out))
    plan = T.plan_cases(T.DataConfig(**saved["config"]["data"]), "train", 4)
    assert saved["data"]["train"]["lps"] == sum(c.lps for c in plan)
    assert saved["data"]["train"]["n"] == 4 and saved["training"]["steps"] == 1
    assert metrics["wall_time_s"]["total"] > 0


def test_smoke_training_skips_existing_outputs(smoke_run: tuple[Path, dict]) -> None:
    out, _ = smoke_run
    before = T.backbone_path(out).stat().st_mtime_ns
    lines: list[str] = []
    T.run(out, force=False, log=lines.append)
    assert T.backbone_path(out).stat().st_mtime_ns == before
    assert any("skipping" in line for line in lines)


def test_loaded_model_reproduces_heldout_predictions(smoke_run: tuple[Path, dict]) -> None:
    """The saved files are the trained weights: reloaded, they give the recorded held-out probabilities."""
    from export.checkpoint import load_backbone, load_head

    out, metrics = smoke_run
    backbone, config = load_backbone(T.backbone_path(out))
    heads = {t: load_head(T.head_path(out, t), config.embed_dim) for t in T.TASKS}
    cfg = T.DataConfig(**metrics["config"]["data"])
    specs = T.plan_cases(cfg, "test", cfg.n_test)
    x = np.stack([T.generate_case(spec)[0] for spec in specs])
    probs = T.predict(backbone, heads, x)
    recorded = metrics["heldout_predictions"]
    assert [r["index"] for r in recorded] == [s.index for s in specs]
    for k, task in enumerate(T.TASKS):
        np.testing.assert_allclose(probs[:, k], [r[f"p_{task}"] for r in recorded], rtol=0, atol=1e-6)


def test_training_is_deterministic() -> None:
    """Same seed, data and thread count -> bit-identical weights (random inputs; no generation)."""
    import torch

    rng = np.random.default_rng(0)
    x = rng.random((8, 3, 96, 96, 96), dtype=np.float32).astype(np.float16)
    y = np.array([[0, 0], [0, 1], [1, 0], [1, 1]] * 2)
    patch = rng.random((8, 2, *T.PATCH_GRID), dtype=np.float32).astype(np.float16) * 0.3
    cfg = T.DemoConfig(
        model=T.ModelConfig(embed_dim=192, depth=2, num_heads=3, mlp_dim=192),
        optim=T.OptimConfig(epochs=1, batch_size=4, torch_threads=1),
    )
    runs = [T.train_model(cfg, x, y, patch, log=lambda _: None) for _ in range(2)]
    (b1, h1, s1), (b2, h2, s2) = runs
    assert s1["steps"] == s2["steps"] == 2
    for k, v in b1.state_dict().items():
        assert torch.equal(v, b2.state_dict()[k]), k
    for task in T.TASKS:
        for k, v in h1[task].state_dict().items():
            assert torch.equal(v, h2[task].state_dict()[k]), (task, k)


def test_attention_guidance_reads_the_models_own_cls_attention() -> None:
    """The guidance loss uses exactly the attention the model computes (same q/k split as SDPA)."""
    import torch

    backbone, _ = T.build_model(T.ModelConfig(embed_dim=192, depth=2, num_heads=3, mlp_dim=192))
    torch.manual_seed(0)
    tokens = torch.randn(2, backbone.config.num_tokens, 192)
    block = backbone.blocks[-1]
    attn = block.attn
    x = block.att_norm(tokens)
    qkv = attn.qkv(x).reshape(2, -1, 3, attn.num_heads, attn.head_dim)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    p = torch.softmax(q[:, :, :1] @ k.transpose(-1, -2) / attn.head_dim**0.5, dim=-1)  # (B, H, 1, T)
    cls_out = attn.proj((p @ v).transpose(1, 2).reshape(2, 1, 192))
    torch.testing.assert_close(cls_out[:, 0], attn(x)[:, 0], rtol=1e-5, atol=1e-5)
    # all lesion mass on patch 7 for task 0 (head 0), none for task 1 (head 1 unconstrained)
    targets = torch.zeros(2, backbone.config.num_patches, len(T.TASKS))
    targets[:, 7, 0] = 1.0
    loss = T._cls_attention_guidance(backbone, tokens, targets)
    expected = -torch.log(p[:, 0, 0, 1 + 7]).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
