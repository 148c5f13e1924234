"""Model cards for unit tests: one backbone group (plain output names) unless told otherwise."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from headct import contract
from headct.model_card import SYNTHETIC_DEMO_NOTICE, BackboneGroup, InputContract, ModelCard, TaskCard


def make_card(
    tasks: Sequence[tuple[str, float]] = (("hemorrhage", 0.5), ("edema", 0.3)),
    *,
    embed_dim: int = 4,
    **overrides: Any,
) -> ModelCard:
    """A demo-like card whose tasks all share one backbone group named `backbone`."""
    names = [name for name, _ in tasks]
    architecture = {"embed_dim": embed_dim, "qkv_bias": False}
    fields: dict[str, Any] = {
        "name": "fmhct",
        "triton_version": 1,
        "model_version": "test-0",
        "synthetic_demo": True,
        "notice": SYNTHETIC_DEMO_NOTICE,
        "checkpoint_sha256": "a" * 64,
        "onnx_sha256": "b" * 64,
        "preprocessing_version": contract.PREPROCESSING_VERSION,
        "input": InputContract(),
        "embedding_dim": embed_dim,
        "architecture": architecture,
        "tasks": [
            TaskCard(
                name=name,
                threshold=threshold,
                head_type="linear",
                head_sha256=f"{i:x}" * 64,
                group="backbone",
                pairing="verified",
            )
            for i, (name, threshold) in enumerate(tasks)
        ],
        "groups": [
            BackboneGroup(
                name="backbone",
                weights_sha256="e" * 64,
                checkpoints=["backbone.pt"],
                checkpoint_sha256s=["a" * 64],
                architecture=architecture,
                registers="none",
                tasks=names,
                probabilities_output=contract.PROBABILITIES_NAME,
                embedding_output=contract.EMBEDDING_NAME,
            )
        ],
        "embedding_group": "backbone",
        "max_batch_size": 8,
    }
    return ModelCard(**{**fields, **overrides})
