"""The tensor contract between preprocessing, the exported graph and Triton.

One place for the names, shapes and dtypes that the exporter writes into ONNX / config.pbtxt and that
the gateway sends over gRPC; both sides import them from here so they cannot drift apart.
"""

from __future__ import annotations

from typing import Final, Literal

# FM-HCT was trained on 3 CT windows x 96^3 voxels in RAS array order (axial slice axis last).
INPUT_CHANNELS: Final = 3
INPUT_SPATIAL: Final = (96, 96, 96)
INPUT_SHAPE: Final = (INPUT_CHANNELS, *INPUT_SPATIAL)

# Triton tensor names and wire dtypes (Triton datatype strings).
INPUT_NAME: Final = "image"
INPUT_DATATYPE: Final = "FP16"
PROBABILITIES_NAME: Final = "probabilities"
EMBEDDING_NAME: Final = "embedding"
# Explanation maps: per task of a group, FP32 (B, n_tasks, *ATTENTION_GRID) attention over the patch grid
# (patch cell (i, j, k) covers model-input voxels [12i, 12i+12) x [12j, ...) x [12k, ...), RAS axis order),
# each map non-negative and summing to 1 over the grid.
ATTENTION_NAME: Final = "attention"
ATTENTION_GRID: Final = (8, 8, 8)
# How a task's map was made (model card `TaskCard.attention_method`): an attentive head's own learned
# query over the patch tokens, or, for a linear (CLS) head, the backbone's last-block CLS->patch attention.
ATTENTION_HEAD_QUERY: Final = "head_query"
ATTENTION_CLS_LAST_BLOCK: Final = "cls_last_block"
AttentionMethod = Literal["head_query", "cls_last_block"]
OUTPUT_DATATYPE: Final = "FP32"

# Bump whenever preprocessing output changes for the same input; recorded in every model card so a
# model is never served behind a preprocessing it was not validated with.
PREPROCESSING_VERSION: Final = "fmhct-train-v1"

DEFAULT_MODEL_NAME: Final = "fmhct"

# A model with several backbone groups (one per fine-tuned task run) names each group's outputs
# `probabilities__<group>` / `embedding__<group>`; a model with one group keeps the plain names above.
GROUP_SEPARATOR: Final = "__"


def probabilities_output(group: str | None) -> str:
    return PROBABILITIES_NAME if group is None else f"{PROBABILITIES_NAME}{GROUP_SEPARATOR}{group}"


def embedding_output(group: str | None) -> str:
    return EMBEDDING_NAME if group is None else f"{EMBEDDING_NAME}{GROUP_SEPARATOR}{group}"


def attention_output(group: str | None) -> str:
    return ATTENTION_NAME if group is None else f"{ATTENTION_NAME}{GROUP_SEPARATOR}{group}"


# Priority lanes (api/inference/lanes.py) reach Triton as request priorities 1 (STAT) .. 3 (bulk): the
# repository writer gives the dynamic batcher this many levels, and a request without a priority
# (perf_analyzer, an old gateway) queues as routine.
PRIORITY_LEVELS: Final = 3
DEFAULT_PRIORITY_LEVEL: Final = 2
