"""The exported serving graph: one shared backbone forward feeding N binary task heads.

Wire contract (``headct.contract``): input ``image`` FP16 (B, 3, 96, 96, 96); outputs ``probabilities``
FP32 (B, N) = softmax(logits)[:, 1] per task in ``task_names`` order, and ``embedding`` FP32 (B, D) = CLS
token of the final-normed tokens. Only the batch dimension is dynamic.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import Tensor, nn

from export.model import FMHCTViT
from headct.contract import (
    EMBEDDING_NAME,
    INPUT_CHANNELS,
    INPUT_NAME,
    INPUT_SPATIAL,
    PROBABILITIES_NAME,
)


class ServingGraph(nn.Module):
    """Backbone + heads in eval mode, returning (probabilities [B, N], embedding [B, D]) in float32."""

    input_names: ClassVar[tuple[str, ...]] = (INPUT_NAME,)
    output_names: ClassVar[tuple[str, ...]] = (PROBABILITIES_NAME, EMBEDDING_NAME)

    def __init__(self, backbone: FMHCTViT, heads: Mapping[str, nn.Module]) -> None:
        super().__init__()
        cfg = backbone.config
        if cfg.in_chans != INPUT_CHANNELS or (cfg.img_size,) * 3 != tuple(INPUT_SPATIAL):
            raise ValueError(
                f"backbone expects ({cfg.in_chans}, {cfg.img_size}^3) input; the serving contract is "
                f"({INPUT_CHANNELS}, {'x'.join(map(str, INPUT_SPATIAL))})"
            )
        if not heads:
            raise ValueError("ServingGraph needs at least one task head")
        for name, head in heads.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"task names must be non-empty strings, got {name!r}")
            if not isinstance(head, nn.Module):
                raise TypeError(f"head {name!r} is not an nn.Module")
            head_dim = getattr(head, "embed_dim", cfg.embed_dim)
            if head_dim != cfg.embed_dim:
                raise ValueError(f"head {name!r} has embed_dim {head_dim}, backbone has {cfg.embed_dim}")
        self.backbone = backbone
        # A ModuleList (not ModuleDict) keeps task order and accepts any task name, e.g. "keys" or "a.b".
        self.heads = nn.ModuleList(heads.values())
        self.task_names: list[str] = list(heads)
        self.eval()  # BatchNorm must use running statistics; the graph is never trained

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        tokens = self.backbone.forward_features(image.to(torch.float32))
        probabilities = torch.stack([torch.softmax(head(tokens), dim=-1)[:, 1] for head in self.heads], dim=1)
        return probabilities, tokens[:, 0, :]

    def example_input(self, batch_size: int = 1) -> Tensor:
        """A zero FP16 input of the wire shape, e.g. for tracing/export."""
        return torch.zeros(batch_size, INPUT_CHANNELS, *INPUT_SPATIAL, dtype=torch.float16)
