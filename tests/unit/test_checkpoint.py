"""Strict loading of every official checkpoint layout (official save_checkpoint/load_model), with
random full-size weights."""

from __future__ import annotations

import argparse
import hashlib
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from export.checkpoint import CheckpointError, load_backbone, load_head, save_finetuned, sha256_file
from export.heads import AttentiveHead, LinearHead
from export.model import FMHCTViT, ViTConfig

RELEASED = ViTConfig()
TRAINING_VARIANT = ViTConfig(qkv_bias=True, num_register_tokens=4)  # the DINO yaml: USE_BIAS, 4 registers
# Small but with embed_dim // 64 heads (3), so the default head-count rule applies to it too.
SMALL = ViTConfig(embed_dim=192, depth=2, num_heads=3, mlp_dim=384)


def _random_state(config: ViTConfig, seed: int) -> dict[str, Tensor]:
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in FMHCTViT(config).state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=generator) for k, shape in shapes.items()}


def _random_head(head: nn.Module, seed: int) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in head.state_dict().items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(123)
        elif key.endswith("running_var"):
            state[key] = torch.rand(value.shape, generator=generator) + 0.5
        else:
            state[key] = torch.randn(value.shape, generator=generator)
    return state


def _assert_same_tensors(module: nn.Module, expected: Mapping[str, Tensor]) -> None:
    actual = module.state_dict()
    assert set(actual) == set(expected)
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key


def _optimizer_and_scheduler_state() -> tuple[dict, dict]:
    """Real AdamW + LambdaLR state dicts, as the official save_checkpoint stores them."""
    param = nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([param], lr=1e-4)
    param.sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    return optimizer.state_dict(), scheduler.state_dict()


def _write_bare(path: Path, state: Mapping[str, Tensor], prefix: str = "") -> Path:
    torch.save({prefix + k: v for k, v in state.items()}, path)
    return path


# ------------------------------------------------------------------------- full-size official layouts


@pytest.fixture(scope="module")
def student() -> Iterator[dict[str, Tensor]]:
    yield _random_state(TRAINING_VARIANT, seed=0)


@pytest.fixture(scope="module")
def released(student: dict[str, Tensor]) -> dict[str, Tensor]:
    """The 138-tensor released layout (shares storage with the student: no extra 357 MB)."""
    return {k: v for k, v in student.items() if not k.endswith("qkv.bias") and k != "register_tokens"}


@pytest.mark.slow
@pytest.mark.parametrize("prefix", ["", "module.backbone."])
def test_bare_backbone_loads_strictly(tmp_path: Path, released: dict[str, Tensor], prefix: str) -> None:
    path = _write_bare(tmp_path / "model_weights.pth", released, prefix)
    model, config = load_backbone(path)
    assert config == RELEASED and model.config == RELEASED
    assert not model.training
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())
    _assert_same_tensors(model, released)


@pytest.mark.slow
def test_dino_training_dict_selects_student_or_teacher(tmp_path: Path, student: dict[str, Tensor]) -> None:
    optimizer, scheduler = _optimizer_and_scheduler_state()
    # DINO-head keys with their official names; shapes shrunk (they are ignored, only their presence matters).
    dino_head = {
        "module.head.mlp.0.weight": torch.randn(16, 768),
        "module.head.mlp.0.bias": torch.randn(16),
        "module.head.last_layer.weight_g": torch.randn(32, 1),
        "module.head.last_layer.weight_v": torch.randn(32, 16),
    }
    teacher = {k: -v for k, v in student.items()}
    path = tmp_path / "best_dino.pt"
    torch.save(
        {
            "epoch": 199,
            "best_loss": np.float32(3.21),  # numpy scalars are what the training code stores
            "state_dict": {"module.backbone." + k: v for k, v in student.items()} | dino_head,
            "momentum_model_state_dict": {"module.backbone." + k: v for k, v in teacher.items()} | dino_head,
            "optimizer": optimizer,
            "scheduler": scheduler,
        },
        path,
    )
    del teacher
    model, config = load_backbone(path)  # student by default
    assert config == TRAINING_VARIANT  # qkv bias and 4 registers detected from the keys
    assert sum(p.numel() for p in model.parameters()) == 89_435_136
    _assert_same_tensors(model, student)
    del model
    model, config = load_backbone(path, weights="teacher")
    assert config == TRAINING_VARIANT
    _assert_same_tensors(model, {k: -v for k, v in student.items()})


@pytest.mark.slow
def test_save_finetuned_round_trip(tmp_path: Path, released: dict[str, Tensor]) -> None:
    with torch.device("meta"):
        backbone = FMHCTViT(RELEASED)
    backbone.load_state_dict(released, assign=True)
    head = LinearHead(768)
    head_state = _random_head(head, seed=5)
    head.load_state_dict(head_state)
    backbone_path, head_path = tmp_path / "vit_cq500.pt", tmp_path / "vit_cq500_classifier.pt"
    save_finetuned(backbone, head, backbone_path, head_path, epoch=9, best_metric=0.91)

    raw = torch.load(head_path, weights_only=True)
    assert raw.keys() == {
        "epoch",
        "best_loss",
        "state_dict",
        "momentum_model_state_dict",
        "optimizer",
        "scheduler",
    }
    assert (raw["epoch"], raw["momentum_model_state_dict"], raw["optimizer"], raw["scheduler"]) == (
        9,
        None,
        {},
        {},
    )
    assert all(k.startswith("_orig_mod.") for k in raw["state_dict"])
    del backbone, raw

    loaded, config = load_backbone(backbone_path)
    assert config == RELEASED
    _assert_same_tensors(loaded, released)
    loaded_head = load_head(head_path, embed_dim=768)
    assert isinstance(loaded_head, LinearHead) and not loaded_head.training
    _assert_same_tensors(loaded_head, head_state)
    with pytest.raises(CheckpointError, match="momentum_model_state_dict"):
        load_backbone(backbone_path, weights="teacher")


# ---------------------------------------------------------------------------------------------- heads


def test_official_attentive_head_file_loads(tmp_path: Path) -> None:
    """A head file as the official trainer writes it: compiled keys, numpy best_loss, optimizer state."""
    head_state = _random_head(AttentiveHead(768, 12), seed=6)
    optimizer, scheduler = _optimizer_and_scheduler_state()
    path = tmp_path / "vit_rsna_classifier.pt"
    torch.save(
        {
            "epoch": 4,
            "best_loss": np.float32(0.83),
            "state_dict": {"_orig_mod." + k: v for k, v in head_state.items()},
            "momentum_model_state_dict": None,
            "optimizer": optimizer,
            "scheduler": scheduler,
        },
        path,
    )
    head = load_head(path, embed_dim=768)
    assert isinstance(head, AttentiveHead) and head.num_heads == 12 and not head.training
    _assert_same_tensors(head, head_state)
    assert load_head(path, embed_dim=768, num_heads=8).num_heads == 8


def test_bare_linear_head_file_loads(tmp_path: Path) -> None:
    head_state = _random_head(LinearHead(192), seed=7)
    head = load_head(_write_bare(tmp_path / "h.pt", head_state), embed_dim=192)
    assert isinstance(head, LinearHead) and not head.training
    _assert_same_tensors(head, head_state)


def test_head_errors_name_keys_and_shapes(tmp_path: Path) -> None:
    head_state = _random_head(LinearHead(192), seed=8)
    with pytest.raises(CheckpointError, match=r"bn\.running_mean: expected \(768,\), found \(192,\)"):
        load_head(_write_bare(tmp_path / "a.pt", head_state), embed_dim=768)
    without_bias = {k: v for k, v in head_state.items() if k != "linear.bias"}
    with pytest.raises(CheckpointError, match=r"missing keys \(1\) linear\.bias"):
        load_head(_write_bare(tmp_path / "b.pt", without_bias), embed_dim=192)
    attentive = _random_head(AttentiveHead(192, 3), seed=9) | {"wkv.bias": torch.zeros(384)}
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\) wkv\.bias"):
        load_head(_write_bare(tmp_path / "c.pt", attentive), embed_dim=192)


# ------------------------------------------------------------------------------ backbone error paths


@pytest.fixture(scope="module")
def small() -> dict[str, Tensor]:
    return _random_state(SMALL, seed=10)


def _load_small(tmp_path: Path, state: Mapping[str, Tensor], **kwargs: object) -> tuple[FMHCTViT, ViTConfig]:
    return load_backbone(_write_bare(tmp_path / "small.pt", state), **kwargs)  # type: ignore[arg-type]


def test_missing_key_is_named(tmp_path: Path, small: dict[str, Tensor]) -> None:
    state = {k: v for k, v in small.items() if k != "norm.bias"}
    with pytest.raises(CheckpointError, match=r"missing keys \(1\) norm\.bias"):
        _load_small(tmp_path, state)


def test_unexpected_key_is_named_and_prefixes_are_not_substrings(
    tmp_path: Path, small: dict[str, Tensor]
) -> None:
    # The official loader's str.replace would turn this into blocks.0.attn.qkv.bias; we only strip leading
    # components, so it stays a stray key.
    state = small | {"blocks.0.attn.module.qkv.bias": torch.zeros(576)}
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\) blocks\.0\.attn\.module\.qkv\.bias"):
        _load_small(tmp_path, state)


def test_wrong_shape_is_named_with_expected_and_found(tmp_path: Path, small: dict[str, Tensor]) -> None:
    state = small | {"blocks.1.mlp.linear2.weight": torch.zeros(192, 383)}
    with pytest.raises(
        CheckpointError, match=r"blocks\.1\.mlp\.linear2\.weight: expected \(192, 384\), found"
    ):
        _load_small(tmp_path, state)


def test_dino_head_keys_only_ignored_inside_a_multicrop_wrapper(
    tmp_path: Path, small: dict[str, Tensor]
) -> None:
    state = small | {"head.mlp.0.weight": torch.zeros(4, 192)}
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\) head\.mlp\.0\.weight"):
        _load_small(tmp_path, state)
    wrapped = {"module._orig_mod.backbone." + k: v for k, v in small.items()}
    _, config = _load_small(tmp_path, wrapped | {"module.head.mlp.0.weight": torch.zeros(4, 192)})
    assert config == SMALL


def test_partial_qkv_bias_is_reported_not_dropped(tmp_path: Path, small: dict[str, Tensor]) -> None:
    state = small | {"blocks.0.attn.qkv.bias": torch.zeros(576)}
    with pytest.raises(CheckpointError, match=r"missing keys \(1\) blocks\.1\.attn\.qkv\.bias"):
        _load_small(tmp_path, state)


def test_duplicate_keys_after_stripping(tmp_path: Path, small: dict[str, Tensor]) -> None:
    with pytest.raises(CheckpointError, match="cls_token"):
        _load_small(tmp_path, small | {"module.cls_token": small["cls_token"]})


def test_head_count_rule_override_and_fp16_upcast(tmp_path: Path, small: dict[str, Tensor]) -> None:
    model, config = _load_small(tmp_path, {k: v.half() for k, v in small.items()})
    assert config.num_heads == 3  # embed_dim // 64
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert _load_small(tmp_path, small, num_heads=6)[1].num_heads == 6
    with pytest.raises(CheckpointError, match="num_heads"):
        _load_small(tmp_path, small, num_heads=5)


def test_teacher_of_a_bare_file_is_an_error(tmp_path: Path, small: dict[str, Tensor]) -> None:
    with pytest.raises(CheckpointError, match="no teacher"):
        _load_small(tmp_path, small, weights="teacher")
    with pytest.raises(ValueError, match="student"):
        _load_small(tmp_path, small, weights="ema")


def test_not_a_checkpoint(tmp_path: Path, small: dict[str, Tensor]) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    truncated = _write_bare(tmp_path / "full.pt", small)
    (tmp_path / "cut.pt").write_bytes(truncated.read_bytes()[:1000])
    pickled_object = tmp_path / "args.pt"
    torch.save({"state_dict": small, "args": argparse.Namespace(lr=1e-4)}, pickled_object)
    cases = {
        text: "not a PyTorch checkpoint",
        tmp_path / "cut.pt": "not a PyTorch checkpoint",
        tmp_path / "missing.pt": "not found",
        pickled_object: r"weights_only=True.*argparse\.Namespace",
        _write_bare(tmp_path / "numbers.pt", {"a": 1}): "non-tensor entries",  # type: ignore[dict-item]
        _write_bare(tmp_path / "empty.pt", {}): "not a non-empty state_dict",
        _write_bare(tmp_path / "other.pt", {"fc.weight": torch.zeros(2, 2)}): "patch_embedding",
    }
    for path, message in cases.items():
        with pytest.raises(CheckpointError, match=message):
            load_backbone(path)
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_head(text, embed_dim=192)


def test_sha256_file(tmp_path: Path) -> None:
    path = tmp_path / "blob.bin"
    data = bytes(range(256)) * 9000  # > 1 MiB chunk
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
