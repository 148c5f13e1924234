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


class AttentionMap(BaseModel):
    """One finding's explanation map on the model's patch grid (`include=attention`)."""

    grid: list[int] = Field(description="cells per axis of the model input, [8, 8, 8]")
    method: str = Field(
        description="`head_query`: the attentive head's learned query over the patch tokens; "
        "`cls_last_block`: the backbone's last-block CLS->patch attention (linear heads); both averaged "
        "over the attention heads"
    )
    values: list[float] = Field(
        description="grid[0]*grid[1]*grid[2] non-negative weights summing to 1, in C order (last axis "
        "fastest): values[(i*grid[1] + j)*grid[2] + k] covers model-input voxels "
        "[12i, 12i+12) x [12j, 12j+12) x [12k, 12k+12)"
    )
    space: str = Field(
        description="`model_input_ras`: the preprocessed 96^3 model input, array axes toward patient "
        "Right, Anterior, Superior (not the uploaded file's voxel grid)"
    )


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


class Preview(BaseModel):
    """The maps for a human eye (`include=preview`): per finding, three orthogonal slices through the
    map's hottest point, CT brain window with the map as a colour overlay."""

    media_type: str = Field(description="`image/png`")
    data_base64: str = Field(description="the PNG, base64-encoded")


class PredictResponse(BaseModel):
    request_id: str
    model: ModelRef
    findings: list[Finding]
    embedding: list[float] | None = None
    # Only present when asked for (`include=attention`): absent, not null, otherwise.
    attention: dict[str, AttentionMap] | None = Field(
        default=None,
        exclude_if=lambda value: value is None,
        description="per requested finding, its explanation map (`include=attention`)",
    )
    preview: Preview | None = Field(
        default=None,
        exclude_if=lambda value: value is None,
        description="the maps as a PNG montage (`include=preview`)",
    )
    input: InputSummary
    warnings: list[Warning] = Field(default_factory=list)
    timings_ms: Timings
    priority: str = Field(default="routine", description="the priority lane it ran in: stat, routine or bulk")
    notice: str | None = Field(default=None, description="set for the synthetic demo model")


class StoredInstance(BaseModel):
    """One object the gateway stored in the PACS (STOW-RS)."""

    sop_class_uid: str = Field(
        description="SOPClassUID, e.g. 1.2.840.10008.5.1.4.1.1.88.34 (Comprehensive 3D SR)"
    )
    sop_instance_uid: str
    series_instance_uid: str


class StudyPredictResponse(PredictResponse):
    """`POST /v1/studies/{study_uid}/predict`: the `PredictResponse` of the study's series, plus what was
    stored back into the study (empty unless `store=true`)."""

    stored: list[StoredInstance] = Field(
        default_factory=list, description="objects stored into the study in the PACS (the DICOM SR)"
    )


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
