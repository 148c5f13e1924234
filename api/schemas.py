"""Response bodies of the REST API (the contract in ../README.md#api)."""

from __future__ import annotations

from pydantic import BaseModel, Field

from headct.model_card import InputContract


class ModelRef(BaseModel):
    name: str
    version: str = Field(description="the model's release label, e.g. fmhct-demo-0.1.0")
    sha256: str = Field(description="sha256 of the backbone checkpoint the served graph was exported from")


class Finding(BaseModel):
    name: str
    probability: float = Field(ge=0.0, le=1.0, description="positive-class probability")
    threshold: float = Field(ge=0.0, le=1.0)
    positive: bool = Field(description="probability >= threshold")


class InputSummary(BaseModel):
    shape: list[int] = Field(description="voxels of the decoded volume, in file array order")
    spacing_mm: list[float]
    source_format: str


class Warning(BaseModel):
    code: str
    detail: str


class Timings(BaseModel):
    decode: float
    validate_: float = Field(alias="validate")
    preprocess: float
    queue: float
    infer: float
    total: float

    model_config = {"populate_by_name": True}


class PredictResponse(BaseModel):
    request_id: str
    model: ModelRef
    findings: list[Finding]
    embedding: list[float] | None = None
    input: InputSummary
    warnings: list[Warning] = Field(default_factory=list)
    timings_ms: Timings
    priority: str = Field(default="routine", description="the priority lane it ran in: stat, routine or bulk")
    notice: str | None = Field(default=None, description="set for the synthetic demo model")


class TaskInfo(BaseModel):
    name: str
    threshold: float
    heldout_auc: float | None = None
    # The backbone group (one per fine-tuned run) that computes it, and how its head was paired with
    # that backbone: "verified" (same training run) or "override" (exported with --allow-unpaired).
    backbone_group: str | None = None
    pairing: str | None = None


class ModelInfo(BaseModel):
    name: str
    version: str
    triton_version: int
    sha256: str
    synthetic_demo: bool
    notice: str
    tasks: list[TaskInfo]
    input: InputContract
    preprocessing_version: str
    embedding_dim: int
    max_batch_size: int


class ModelsResponse(BaseModel):
    models: list[ModelInfo]
