"""The exported serving graph: one or more backbone groups, each feeding its binary task heads.

Wire contract (``headct.contract``): input ``image`` FP16 (B, 3, 96, 96, 96). Per backbone group, in
group order: FP32 (B, n) probabilities = softmax(logits)[:, 1] per task of the group (absent for an
embedding-only group), then FP32 (B, D) embedding = CLS token of that backbone's final-normed tokens,
then (groups with heads) FP32 (B, n, 8, 8, 8) attention = one explanation map per task over the 8x8x8
patch grid (model-input axis order, each map summing to 1): an ``AttentiveHead``'s own query attention
over the patch tokens ("head_query"), else the last block's CLS->patch attention ("cls_last_block"),
both averaged over the attention heads. A graph with one group names them ``probabilities``,
``embedding`` and ``attention``; with several, ``probabilities__<group>`` etc.
(``headct.contract.probabilities_output``). Only the batch dimension is dynamic.

The attention read-out adds no parameters and does not change the probabilities or the embedding (the
same operations on the same tensors); a runtime that does not fetch ``attention`` can drop its nodes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import cast

import torch
from torch import Tensor, nn

from export.heads import AttentiveHead
from export.model import FMHCTViT, patch_attention_grid
from headct import contract
from headct.contract import INPUT_CHANNELS, INPUT_NAME, INPUT_SPATIAL


class GraphGroup(nn.Module):
    """One backbone and the heads that read its tokens."""

    def __init__(
        self,
        backbone: FMHCTViT,
        heads: Mapping[str, nn.Module],
        *,
        probabilities_output: str | None = contract.PROBABILITIES_NAME,
        embedding_output: str = contract.EMBEDDING_NAME,
        attention_output: str | None = "",
    ) -> None:
        super().__init__()
        cfg = backbone.config
        if cfg.in_chans != INPUT_CHANNELS or (cfg.img_size,) * 3 != tuple(INPUT_SPATIAL):
            raise ValueError(
                f"backbone expects ({cfg.in_chans}, {cfg.img_size}^3) input; the serving contract is "
                f"({INPUT_CHANNELS}, {'x'.join(map(str, INPUT_SPATIAL))})"
            )
        if bool(heads) != (probabilities_output is not None):
            raise ValueError("a group has a probabilities output exactly when it has task heads")
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
        self.probabilities_output = probabilities_output
        self.embedding_output = embedding_output
        # No attention output without heads (an embedding-only group has nothing to explain). "" (the
        # default) names it after the probabilities output: `attention`, or `attention__<group>`.
        if attention_output == "" and probabilities_output is not None:
            _, separator, group = probabilities_output.partition(contract.GROUP_SEPARATOR)
            attention_output = contract.attention_output(group if separator else None)
        self.attention_output = attention_output if heads else None

    @property
    def attention_methods(self) -> dict[str, contract.AttentionMethod]:
        """Task -> how its map is made: "head_query" (AttentiveHead) or "cls_last_block" (any other head)."""
        return {
            task: contract.ATTENTION_HEAD_QUERY
            if isinstance(head, AttentiveHead)
            else contract.ATTENTION_CLS_LAST_BLOCK
            for task, head in zip(self.task_names, self.heads, strict=True)
        }

    @property
    def output_shapes(self) -> dict[str, tuple[int, ...]]:
        """Output name -> shape without the batch axis, in output order."""
        shapes: dict[str, tuple[int, ...]] = {}
        if self.probabilities_output:
            shapes[self.probabilities_output] = (len(self.heads),)
        shapes[self.embedding_output] = (self.backbone.config.embed_dim,)
        if self.attention_output:
            shapes[self.attention_output] = (len(self.heads), *(self.backbone.config.grid_size,) * 3)
        return shapes

    @property
    def output_widths(self) -> dict[str, int]:
        """Output name -> size of the first non-batch axis (the width of the 2-D outputs)."""
        return {name: shape[0] for name, shape in self.output_shapes.items()}

    def forward(self, image: Tensor) -> list[Tensor]:
        cfg = self.backbone.config
        needs_cls = self.attention_output is not None and any(
            method == contract.ATTENTION_CLS_LAST_BLOCK for method in self.attention_methods.values()
        )
        cls_weights: Tensor | None = None
        if needs_cls:
            tokens, cls_weights = self.backbone.forward_features_with_cls_attention(image)
        else:
            tokens = self.backbone.forward_features(image)
        outputs = []
        if self.heads:
            outputs.append(torch.stack([torch.softmax(h(tokens), dim=-1)[:, 1] for h in self.heads], dim=1))
        outputs.append(tokens[:, 0, :])
        if self.attention_output is not None:
            prefix = 1 + cfg.num_register_tokens
            maps = []
            for head in self.heads:
                if isinstance(head, AttentiveHead):
                    weights = head.attention_weights(tokens)
                else:
                    assert cls_weights is not None
                    weights = cls_weights
                maps.append(patch_attention_grid(weights, prefix, cfg.grid_size))
            outputs.append(torch.stack(maps, dim=1))
        return outputs


class ServingGraph(nn.Module):
    """Backbone groups + heads in eval mode; outputs in float32, named by `output_names`.

    ``ServingGraph(backbone, heads)`` is the one-group graph (plain output names);
    ``ServingGraph(groups=[...])`` the general one.
    """

    input_names: tuple[str, ...] = (INPUT_NAME,)

    def __init__(
        self,
        backbone: FMHCTViT | None = None,
        heads: Mapping[str, nn.Module] | None = None,
        *,
        groups: Sequence[GraphGroup] | None = None,
    ) -> None:
        super().__init__()
        if groups is None:
            if backbone is None or heads is None:
                raise ValueError("give a backbone and its heads, or groups")
            if not heads:
                raise ValueError("ServingGraph needs at least one task head")
            groups = [GraphGroup(backbone, heads)]
        elif backbone is not None or heads is not None:
            raise ValueError("give a backbone and its heads, or groups, not both")
        if not any(group.heads for group in groups):
            raise ValueError("ServingGraph needs at least one task head")
        names = [name for group in groups for name in group.output_widths]
        if len(set(names)) != len(names):
            raise ValueError(f"output names repeat: {names}")
        tasks = [task for group in groups for task in group.task_names]
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"task names repeat: {tasks}")
        self.groups = nn.ModuleList(groups)
        self.eval()  # BatchNorm must use running statistics; the graph is never trained

    @property
    def _group_list(self) -> list[GraphGroup]:
        """`groups` as a typed list (a ModuleList's items type as plain `nn.Module`)."""
        return [cast(GraphGroup, group) for group in self.groups]

    @property
    def backbone(self) -> FMHCTViT:
        """The first group's backbone (the only one of a one-group graph)."""
        return self._group_list[0].backbone

    @property
    def heads(self) -> nn.ModuleList:
        """The first group's heads (all heads of a one-group graph)."""
        return self._group_list[0].heads

    @property
    def task_names(self) -> list[str]:
        return [task for group in self._group_list for task in group.task_names]

    @property
    def output_shapes(self) -> dict[str, tuple[int, ...]]:
        """Output name -> shape without the batch axis, in output order."""
        return {name: shape for group in self._group_list for name, shape in group.output_shapes.items()}

    @property
    def output_widths(self) -> dict[str, int]:
        """Output name -> size of the first non-batch axis (feature width of the 2-D outputs), in order."""
        return {name: width for group in self._group_list for name, width in group.output_widths.items()}

    @property
    def attention_methods(self) -> dict[str, contract.AttentionMethod]:
        """Task -> attention method ("head_query" | "cls_last_block"), for the model card."""
        return {task: m for group in self._group_list for task, m in group.attention_methods.items()}

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(self.output_widths)

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        image = image.to(torch.float32)
        return tuple(output for group in self.groups for output in group(image))

    def example_input(self, batch_size: int = 1) -> Tensor:
        """A zero FP16 input of the wire shape, e.g. for tracing/export."""
        return torch.zeros(batch_size, INPUT_CHANNELS, *INPUT_SPATIAL, dtype=torch.float16)
