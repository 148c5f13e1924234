"""The model card: what a served model is, written by the exporter next to the repository entry.

The exporter writes it as `model_card.json` beside `config.pbtxt` and also embeds the same JSON in the
config's `parameters` (key `model_card`), so the gateway learns it from Triton over gRPC and never needs
to share a filesystem with the model repository.
"""

from __future__ import annotations

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

    schema_version: int = 1
    name: str
    triton_version: int
    model_version: str
    synthetic_demo: bool
    notice: str
    checkpoint_sha256: str
    onnx_sha256: str
    preprocessing_version: str = contract.PREPROCESSING_VERSION
    input: InputContract = Field(default_factory=InputContract)
    embedding_dim: int
    architecture: dict[str, int | bool]
    tasks: list[TaskCard]
    max_batch_size: int
    exported_with: dict[str, str] = Field(default_factory=dict)

    @property
    def task_names(self) -> list[str]:
        return [task.name for task in self.tasks]
