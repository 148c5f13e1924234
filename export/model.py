"""The FM-HCT backbone: a MONAI-style 3D ViT-B re-implemented with the official module names.

Parameter names, shapes and numerics follow the official code (NYUMedML/headCT_foundation src/models/vit.py,
attentionblock.py, patch_embedding.py) so that the official checkpoints load
with ``strict=True`` (see ``export/checkpoint.py``). Only what serving needs is implemented: no dropout, no
LoRA, no built-in classification head, and no position-table interpolation (the input must be exactly
``img_size``³; anything else is rejected rather than silently resampled).
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Block norms use PyTorch's default eps; only the final norm was built with 1e-6 (official vit.py).
BLOCK_NORM_EPS = 1e-5
FINAL_NORM_EPS = 1e-6
SINCOS_TEMPERATURE = 10000.0


@dataclass(frozen=True)
class ViTConfig:
    """Architecture hyper-parameters; the defaults are the released FM-HCT ViT-B (89,404,416 parameters)."""

    img_size: int = 96
    patch_size: int = 12
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    qkv_bias: bool = False
    num_register_tokens: int = 0

    def __post_init__(self) -> None:
        for name in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ViTConfig.{name} must be a positive int, got {value!r}")
        if not isinstance(self.qkv_bias, bool):
            raise ValueError(f"ViTConfig.qkv_bias must be a bool, got {self.qkv_bias!r}")
        registers = self.num_register_tokens
        if isinstance(registers, bool) or not isinstance(registers, int) or registers < 0:
            raise ValueError(f"ViTConfig.num_register_tokens must be an int >= 0, got {registers!r}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.embed_dim % 6:
            # The 3D sin-cos table gives each of the 3 axes a sin and a cos block of embed_dim/6 channels.
            raise ValueError(f"embed_dim {self.embed_dim} must be divisible by 6 (3D sin-cos position table)")

    @property
    def grid_size(self) -> int:
        """Patches per axis (8 for 96/12)."""
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**3

    @property
    def num_tokens(self) -> int:
        """Sequence length seen by the blocks: CLS + registers + patches (513, or 517 with 4 registers)."""
        return 1 + self.num_register_tokens + self.num_patches

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ViTConfig:
        """Inverse of ``to_dict``; unknown keys are an error so a model card can't silently drift."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ViTConfig keys: {unknown}")
        return cls(**data)


def sincos_position_embedding_3d(
    grid_size: int, embed_dim: int, temperature: float = SINCOS_TEMPERATURE
) -> Tensor:
    """The fixed 3D sin-cos table the official code initialises the position embeddings with.

    Returns ``(1, grid_size**3, embed_dim)``. Patch order is the Conv3d flatten order (axis0 slowest,
    axis2 fastest). Channel layout, as in the official ``build_sincos_position_embedding``:
    [sin(a1), cos(a1), sin(a0), cos(a0), sin(a2), cos(a2)] with ``embed_dim/6`` frequencies
    ``temperature**(-i/(embed_dim/6))`` each, where a0/a1/a2 are the patch coordinates along axis 0/1/2.
    """
    if embed_dim % 6:
        raise ValueError(f"embed_dim {embed_dim} must be divisible by 6")
    pos_dim = embed_dim // 6
    coords = torch.arange(grid_size, dtype=torch.float32)
    a0, a1, a2 = (c.flatten() for c in torch.meshgrid(coords, coords, coords, indexing="ij"))
    omega = 1.0 / temperature ** (torch.arange(pos_dim, dtype=torch.float32) / pos_dim)
    parts = []
    for axis in (a1, a0, a2):
        angles = axis[:, None] * omega[None, :]
        parts += [torch.sin(angles), torch.cos(angles)]
    return torch.cat(parts, dim=1)[None]


class PatchEmbedding(nn.Module):
    """Conv3d patchifier + position table for the patch tokens only (the CLS token gets no position)."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.embed_dim = config.embed_dim
        self.num_patches = config.num_patches
        self.patch_embeddings = nn.Conv3d(
            config.in_chans, config.embed_dim, kernel_size=config.patch_size, stride=config.patch_size
        )
        # Initialised from the sin-cos table but trainable and saved, exactly like the official model.
        self.position_embeddings = nn.Parameter(
            sincos_position_embedding_3d(config.grid_size, config.embed_dim)
        )

    def forward(self, x: Tensor) -> Tensor:
        # Static reshape sizes (batch = -1) keep every non-batch dim known to ONNX shape inference.
        tokens = self.patch_embeddings(x).reshape(-1, self.embed_dim, self.num_patches).transpose(1, 2)
        return tokens + self.position_embeddings  # (B, P, D)


class SelfAttention(nn.Module):
    """Fused-qkv multi-head self-attention through SDPA (default 1/sqrt(head_dim) scale, no mask)."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.embed_dim = config.embed_dim
        # The sequence length is fixed by the config (input size is enforced), so reshapes can use constants:
        # with the batch as the only -1, the exported graph keeps static shapes for everything else.
        self.num_tokens = config.num_tokens
        self.qkv = nn.Linear(config.embed_dim, 3 * config.embed_dim, bias=config.qkv_bias)
        self.proj = nn.Linear(config.embed_dim, config.embed_dim)

    def cls_attention(self, x: Tensor) -> Tensor:
        """The CLS query's attention weights over all tokens, averaged over the heads: (B, num_tokens).

        ``x`` is this attention's (normed) input. softmax(q_cls . K^T / sqrt(head_dim)) per head, exactly the
        row SDPA uses for token 0 in ``forward``; only the q of token 0 and the keys are computed (from the
        q and k rows of the fused qkv weight), so it costs about a third of one qkv projection.
        """
        dim = self.embed_dim
        bias = self.qkv.bias
        q = F.linear(x[:, :1, :], self.qkv.weight[:dim], None if bias is None else bias[:dim])
        k = F.linear(x, self.qkv.weight[dim : 2 * dim], None if bias is None else bias[dim : 2 * dim])
        q = q.reshape(-1, 1, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, 1, hd)
        k = k.reshape(-1, self.num_tokens, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, N, hd)
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.head_dim**-0.5  # (B, H, 1, N)
        return torch.softmax(scores, dim=-1).mean(dim=1)[:, 0, :]

    def forward(self, x: Tensor) -> Tensor:
        # qkv rows are [q; k; v], each split into heads: (B, N, 3, H, hd) -> (3, B, H, N, hd).
        qkv = self.qkv(x).reshape(-1, self.num_tokens, 3, self.num_heads, self.head_dim)
        qkv = qkv.permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(-1, self.num_tokens, self.embed_dim))


class MLP(nn.Module):
    """MONAI ``MLPBlock`` without dropout: linear1 -> exact (erf) GELU -> linear2."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.linear1 = nn.Linear(config.embed_dim, config.mlp_dim)
        self.act = nn.GELU(approximate="none")
        self.linear2 = nn.Linear(config.mlp_dim, config.embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear2(self.act(self.linear1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x)); no layer-scale or drop-path."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.att_norm = nn.LayerNorm(config.embed_dim, eps=BLOCK_NORM_EPS)
        self.attn = SelfAttention(config)
        self.ffn_norm = nn.LayerNorm(config.embed_dim, eps=BLOCK_NORM_EPS)
        self.mlp = MLP(config)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.att_norm(x))
        return x + self.mlp(self.ffn_norm(x))


def patch_attention_grid(weights: Tensor, num_prefix_tokens: int, grid_size: int) -> Tensor:
    """Attention over all tokens (B, T) -> over the patch grid (B, g, g, g), renormalised to sum 1.

    Drops the CLS/register tokens (the first ``num_prefix_tokens``); the patch tokens are in PatchEmbedding's
    order (the Conv3d output flattened in C order: axis 0 slowest), so a C-order reshape puts patch
    (i, j, k) at grid index [i, j, k] in the model input's axis order.
    """
    patches = weights[:, num_prefix_tokens:]
    patches = patches / patches.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(patches.dtype).tiny)
    return patches.reshape(-1, grid_size, grid_size, grid_size)


class FMHCTViT(nn.Module):
    """FM-HCT backbone. ``forward`` mirrors the official return value; serving uses ``forward_features``."""

    register_tokens: nn.Parameter | None

    def __init__(self, config: ViTConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else ViTConfig()
        cfg = self.config
        self.patch_embedding = PatchEmbedding(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        # Zero-initialised like the official model; real values always come from a checkpoint.
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=FINAL_NORM_EPS)
        if cfg.num_register_tokens:
            self.register_tokens = nn.Parameter(torch.zeros(1, cfg.num_register_tokens, cfg.embed_dim))
        else:
            # Absent from the state_dict, as in the released weights.
            self.register_parameter("register_tokens", None)

    def _check_input(self, x: Tensor) -> None:
        cfg = self.config
        expected = (cfg.in_chans, cfg.img_size, cfg.img_size, cfg.img_size)
        # Only the static dims are inspected, never the batch, so a traced graph loses nothing by not
        # recording this check; the tracer's "tensor to Python boolean" warning is therefore silenced.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            ok = x.dim() == 5 and tuple(x.shape[1:]) == expected
        if not ok:
            raise ValueError(
                f"FM-HCT expects input of shape (B, {', '.join(map(str, expected))}); got {tuple(x.shape)}. "
                "Resample to the model grid in preprocessing: the position table is not interpolated."
            )

    def prepare_tokens(self, x: Tensor) -> Tensor:
        """Tokens entering block 0: [CLS, registers..., patches + positions], shape (B, num_tokens, D)."""
        self._check_input(x)
        patches = self.patch_embedding(x)  # positions are added here, before CLS/registers exist
        batch, dim = patches.shape[0], self.config.embed_dim
        parts = [self.cls_token.expand(batch, 1, dim)]
        if self.register_tokens is not None:
            parts.append(self.register_tokens.expand(batch, self.config.num_register_tokens, dim))
        parts.append(patches)
        return torch.cat(parts, dim=1)

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Official output: (final-normed tokens, per-block outputs taken before the final norm)."""
        h = self.prepare_tokens(x)
        hidden_states: list[Tensor] = []
        for block in self.blocks:
            h = block(h)
            hidden_states.append(h)
        return self.norm(h), hidden_states

    def forward_features(self, x: Tensor) -> Tensor:
        """Final-normed tokens only; the serving path, which must not build the per-block list."""
        h = self.prepare_tokens(x)
        for block in self.blocks:
            h = block(h)
        return self.norm(h)

    def forward_features_with_cls_attention(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``forward_features`` plus the last block's CLS attention over all tokens (B, num_tokens),
        averaged over the heads (``SelfAttention.cls_attention``).

        The last block runs the same operations as ``Block.forward`` on the same tensors (its normed input
        is shared with the attention read-out, so an export keeps one LayerNorm node per module), hence the
        tokens are bit-identical to ``forward_features``.
        """
        h = self.prepare_tokens(x)
        *body, last = list(self.blocks)
        for block in body:
            h = block(h)
        assert isinstance(last, Block)
        normed = last.att_norm(h)
        weights = last.attn.cls_attention(normed)
        h = h + last.attn(normed)
        h = h + last.mlp(last.ffn_norm(h))
        return self.norm(h), weights
