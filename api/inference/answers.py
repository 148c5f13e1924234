"""Assembling a prediction answer — shared by the REST and gRPC front ends so both say the same thing."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from api import metrics
from api.inference.lanes import DEFAULT_LANE, Lane
from api.problems import ProblemCode, ProblemError
from api.schemas import AttentionMap, Finding, InputSummary, ModelRef, PredictResponse, Timings, Warning
from headct.model_card import ModelCard

if TYPE_CHECKING:
    from api.inference.service import Prediction

INCLUDABLE = frozenset({"embedding", "attention", "preview"})
#: The extras made from the attention maps.
MAP_INCLUDES = frozenset({"attention", "preview"})
# Explanation maps live on the preprocessed model input's grid (RAS array order), not the file's.
ATTENTION_SPACE = "model_input_ras"


def check_includes(extras: list[str]) -> None:
    if bad := [extra for extra in extras if extra not in INCLUDABLE]:
        raise ProblemError(
            ProblemCode.INVALID_INCLUDE,
            f"cannot include {', '.join(bad)}",
            field="include",
            observed=bad,
            expected=sorted(INCLUDABLE),
        )


def select_tasks(card: ModelCard, requested: list[str]) -> list[str]:
    """The requested findings (checked against the card); all of them, in card order, when none are named."""
    names = card.task_names
    unknown = [name for name in requested if name not in names]
    if unknown:
        raise ProblemError(
            ProblemCode.UNKNOWN_TASK,
            f"unknown task(s): {', '.join(unknown)}",
            field="tasks",
            observed=unknown,
            expected=names,
        )
    return list(dict.fromkeys(requested)) if requested else list(names)


def build_predict_response(
    prediction: Prediction,
    *,
    selected: list[str],
    include_embedding: bool,
    request_id: str,
    started_at: float,
    lane: Lane = DEFAULT_LANE,
    include_attention: bool = False,
) -> PredictResponse:
    card = prediction.card
    tasks = {task.name: task for task in card.tasks}
    findings = []
    for name in selected:
        task = tasks[name]
        probability = prediction.result.probabilities[name]
        metrics.FINDING_PROBABILITY.labels(finding=task.name).observe(probability)
        findings.append(
            Finding(
                name=task.name,
                probability=probability,
                threshold=task.threshold,
                positive=probability >= task.threshold,
            )
        )
    scan = prediction.scan
    timings = dict(prediction.timings_ms)
    timings["total"] = round((time.perf_counter() - started_at) * 1000.0, 3)
    return PredictResponse(
        request_id=request_id,
        model=ModelRef(name=card.name, version=card.model_version, sha256=card.checkpoint_sha256),
        findings=findings,
        embedding=(
            prediction.result.embedding.tolist()
            if include_embedding and prediction.result.embedding is not None
            else None
        ),
        input=InputSummary(
            shape=list(scan.file_shape),
            spacing_mm=[round(s, 4) for s in scan.file_spacing_mm],
            source_format=scan.source_format,
        ),
        attention=_attention_maps(card, prediction, selected) if include_attention else None,
        warnings=[Warning(code=code, detail=detail) for code, detail in prediction.warnings],
        priority=lane.value,
        timings_ms=Timings.model_validate(timings),
        notice=card.notice if card.synthetic_demo else None,
    )


def no_maps(missing: list[str], asked: list[str]) -> ProblemError:
    """400 ``invalid_include``: maps asked of a model exported without them (or whose card does not say
    how they are made)."""
    return ProblemError(
        ProblemCode.INVALID_INCLUDE,
        f"the served model has no attention maps for {', '.join(missing)}",
        field="include",
        observed=asked,
        expected=sorted(INCLUDABLE - MAP_INCLUDES),
    )


def _attention_maps(card: ModelCard, prediction: Prediction, selected: list[str]) -> dict[str, AttentionMap]:
    """The selected findings' maps ({task: [g, g, g] array}) as the response's `attention` object."""
    methods = {task.name: task.attention_method for task in card.tasks}
    maps = prediction.result.attention
    missing = [name for name in selected if name not in maps or methods.get(name) is None]
    if missing:
        raise no_maps(missing, asked=["attention"])
    return {
        name: AttentionMap(
            grid=list(maps[name].shape),
            method=str(methods[name]),
            values=[round(float(v), 8) for v in maps[name].ravel(order="C")],
            space=ATTENTION_SPACE,
        )
        for name in selected
    }
