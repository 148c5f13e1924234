"""The model card: what a served model is, written by the exporter next to the repository entry.

The exporter writes it as `model_card.json` beside `config.pbtxt` and also embeds the same JSON in the
config's `parameters` (key `model_card`), so the gateway learns it from Triton over gRPC and never needs
to share a filesystem with the model repository.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from headct import contract

MODEL_CARD_FILENAME = "model_card.json"
MODEL_CARD_PARAMETER = "model_card"

SYNTHETIC_DEMO_NOTICE = (
    "SYNTHETIC DEMO MODEL - NOT FOR CLINICAL USE. Trained only on synthetic head CT generated from a brain "
    "CT template with artificial lesions; its outputs say nothing about real patients."
)


class TaskCard(BaseModel):
    """One binary finding: the positive-class probability is compared with `threshold`."""

    model_config = ConfigDict(extra="forbid")

    name: str
    threshold: float = Field(ge=0.0, le=1.0)
    head_type: str  # "linear" | "attentive"
    head_sha256: str
    heldout_auc: float | None = None
    # The backbone group (BackboneGroup.name) whose tokens feed this head.
    group: str
    # How the head was matched to its backbone: "verified" (same run: equal epoch/best_loss in both
    # files), "shared-frozen" (the backbone weights equal the pretrained ones), or "override" (the export
    # ran with --allow-unpaired; `pairing_detail` says what could not be verified).
    pairing: Literal["verified", "shared-frozen", "override"]
    pairing_detail: str = ""
    # How the task's explanation map (the group's attention output) is made: "head_query" (an attentive
    # head's learned query over the patch tokens) or "cls_last_block" (the backbone's last-block CLS->patch
    # attention, for a linear head). None: a model exported without attention maps.
    attention_method: contract.AttentionMethod | None = None


class BackboneGroup(BaseModel):
    """One backbone in the serving graph and the tasks whose heads it feeds.

    Tasks whose backbone files hold identical weights (same `weights_sha256`) share one group, so a
    frozen backbone with N linear-probe heads costs one backbone forward; a fine-tuned task run brings
    its own backbone and group.
    """

    model_config = ConfigDict(extra="forbid")

    name: str
    weights_sha256: str  # over tensor names, dtypes, shapes and bytes after prefix stripping
    checkpoints: list[str]  # file names holding these weights (sha256 of each in `checkpoint_sha256s`)
    checkpoint_sha256s: list[str]
    architecture: dict[str, int | bool]
    registers: Literal["none", "dropped", "kept"]
    tasks: list[str]
    probabilities_output: str | None  # None for an embedding-only (pretrained) group
    embedding_output: str
    # FP32 [n_tasks, 8, 8, 8] per scan (headct.contract.ATTENTION_GRID), one map per task in `tasks` order;
    # None for an embedding-only group or a model exported without attention maps.
    attention_output: str | None = None


class InputContract(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = contract.INPUT_NAME
    datatype: str = contract.INPUT_DATATYPE
    shape: list[int] = Field(default_factory=lambda: [-1, *contract.INPUT_SHAPE])
    axis_order: str = "RAS"  # array axes 1..3 run toward patient Right, Anterior, Superior
    channels: list[str] = Field(
        default_factory=lambda: ["brain L40/W80", "subdural L80/W200", "bone L600/W2800"]
    )
    value_range: list[float] = Field(default_factory=lambda: [0.0, 1.0])


class ModelCard(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: int = 2
    name: str
    triton_version: int
    model_version: str
    synthetic_demo: bool
    notice: str
    # sha256 of the one backbone file, or of the sorted, newline-joined file hashes of several.
    checkpoint_sha256: str
    onnx_sha256: str
    # Required, never defaulted: a card must state the preprocessing it was validated with, so that the
    # gateway can refuse a model exported for another one (see headct.contract).
    preprocessing_version: str
    input: InputContract
    embedding_dim: int
    # Architecture of the embedding group's backbone.
    architecture: dict[str, int | bool]
    tasks: list[TaskCard]
    groups: list[BackboneGroup]
    # The group whose CLS token is the response's `embedding`: the pretrained backbone when one was given.
    embedding_group: str
    unpaired_allowed: bool = False
    max_batch_size: int
    exported_with: dict[str, str] = Field(default_factory=dict)

    @property
    def task_names(self) -> list[str]:
        return [task.name for task in self.tasks]

    def group(self, name: str) -> BackboneGroup:
        return next(group for group in self.groups if group.name == name)

    def groups_for(self, task_names: list[str]) -> list[BackboneGroup]:
        """The groups that must run to answer `task_names` (in card order)."""
        wanted = set(task_names)
        return [group for group in self.groups if wanted.intersection(group.tasks)]
