"""FM-HCT downstream heads (NYUMedML/headCT_foundation src/models/classifier.py), each mapping
backbone tokens (B, T, D) to 2 logits.

Every task is a binary model: the positive-class probability is ``softmax(logits)[:, 1]``. Module and
buffer names match the official ``*_classifier.pt`` files so they load with ``strict=True``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NUM_CLASSES = 2
# Both heads' BatchNorms are affine-free with eps 1e-6. The spec states it for the linear head; the official
# attentive classifier builds bn1/bn2 the same way, so we use it there too.
HEAD_BN_EPS = 1e-6


def batch_norm_last_dim(bn: nn.BatchNorm1d, x: Tensor) -> Tensor:
    """Apply an affine-free ``BatchNorm1d`` over the last (channel) dim of ``x`` (..., C).

    In training mode this is the module itself on (N, C) rows, i.e. statistics over every leading dim,
    which equals BatchNorm1d on (B, C, T). In eval mode the frozen normalisation is written out: the
    TorchScript ONNX exporter refuses ``batch_norm`` whose channel size it cannot infer, and it loses static
    shapes after opset-17 LayerNormalization, so the module call would not export.
    """
    if bn.affine or not bn.track_running_stats:
        raise ValueError("batch_norm_last_dim expects BatchNorm1d(affine=False, track_running_stats=True)")
    if bn.training:
        return bn(x.reshape(-1, bn.num_features)).reshape(x.shape)
    assert bn.running_mean is not None and bn.running_var is not None
    return (x - bn.running_mean) * torch.rsqrt(bn.running_var + bn.eps)


class LinearHead(nn.Module):
    """BatchNorm1d (affine=False) + Linear on the CLS token of the final-normed tokens."""

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.bn = nn.BatchNorm1d(embed_dim, affine=False, eps=HEAD_BN_EPS)
        self.linear = nn.Linear(embed_dim, NUM_CLASSES)

    def forward(self, tokens: Tensor) -> Tensor:
        # Index rather than the training code's slice+squeeze, which yields a 1-D tensor at batch size 1.
        return self.linear(batch_norm_last_dim(self.bn, tokens[:, 0, :]))


class AttentiveHead(nn.Module):
    """One learned query cross-attending over all tokens (CLS, registers, patches).

    Reproduces the official quirk: the query is multiplied by head_dim**-0.5 *and* SDPA applies its own
    default 1/sqrt(head_dim), so the effective logit scale is 1/head_dim.
    """

    def __init__(self, embed_dim: int, num_heads: int = 12) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.scale = self.head_dim**-0.5
        # A single query, as in every official config (num_queries=1); the official code's reshape of the
        # attention output is only a head-concatenation in that case.
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        # bn1 normalises each channel over batch and tokens, bn2 the attended query; affine-free, eps 1e-6.
        self.bn1 = nn.BatchNorm1d(embed_dim, affine=False, eps=HEAD_BN_EPS)
        self.bn2 = nn.BatchNorm1d(embed_dim, affine=False, eps=HEAD_BN_EPS)
        self.wkv = nn.Linear(embed_dim, 2 * embed_dim, bias=False)
        self.linear = nn.Linear(embed_dim, NUM_CLASSES)

    def attention_weights(self, tokens: Tensor) -> Tensor:
        """The learned query's attention weights over all tokens, averaged over the heads: (B, T).

        The same softmax as in ``forward`` (including the double 1/sqrt(head_dim) scaling); only the keys
        are computed (the k rows of ``wkv``), never the values.
        """
        batch = tokens.shape[0]
        q = self.cls_token.expand(batch, -1, -1).unflatten(-1, (self.num_heads, self.head_dim))
        q = q.transpose(1, 2) * self.scale  # (B, H, 1, hd)
        x = batch_norm_last_dim(self.bn1, tokens)
        k = F.linear(x, self.wkv.weight[: self.embed_dim]).unflatten(-1, (self.num_heads, self.head_dim))
        scores = torch.matmul(q, k.transpose(1, 2).transpose(-1, -2)) * self.scale  # (B, H, 1, T)
        return torch.softmax(scores, dim=-1).mean(dim=1)[:, 0, :]

    def forward(self, tokens: Tensor) -> Tensor:
        batch = tokens.shape[0]
        q = self.cls_token.expand(batch, -1, -1).unflatten(-1, (self.num_heads, self.head_dim))
        q = q.transpose(1, 2) * self.scale  # (B, H, 1, hd): the first of the two scalings
        x = batch_norm_last_dim(self.bn1, tokens)
        # wkv rows are [k; v], each split into heads: (B, T, 2, H, hd) -> (2, B, H, T, hd).
        kv = self.wkv(x).unflatten(-1, (2, self.num_heads, self.head_dim)).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, kv[0], kv[1])  # the second scaling, inside SDPA
        query = batch_norm_last_dim(self.bn2, attended.transpose(1, 2).reshape(-1, 1, self.embed_dim))
        return self.linear(query.mean(dim=1))  # mean over the (single) query, as the official head
