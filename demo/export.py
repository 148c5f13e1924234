"""`python -m demo`: make the synthetic demo model servable by the local (CPU) Triton.

Trains it with `demo.train` only when its checkpoints are missing, then exports them as target
`cpu` with the card marked synthetic and the held-out AUCs and thresholds from `metrics.json`. The
export itself is skipped when the repository entry is already current (same checkpoint and head sha256s,
thresholds, AUCs and settings), so `make test` / `make serve` pay for it once.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from export.pipeline import ExportOutcome, ExportRequest, Log, run_export
from export.repository import ServingOptions
from export.tasks import TaskSpec
from headct import contract


def _auc(value: Any) -> float | None:
    # A one-class held-out split gives NaN, which the card's JSON would turn into null anyway.
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def demo_request(
    checkpoints: Path,
    metrics: dict[str, Any],
    *,
    repository: Path,
    model_name: str,
    serving: ServingOptions,
    force: bool,
) -> ExportRequest:
    """The export request for the trained demo checkpoints in `checkpoints`, described by `metrics`."""
    from demo import train

    tasks = metrics.get("task_order") or list(train.TASKS)
    # One multi-task run: every head was saved with the shared backbone in the same step (same epoch and
    # best_loss), so each task names that backbone and the pairing check verifies it.
    tasks = tuple(
        TaskSpec(
            name=task,
            head=train.head_path(checkpoints, task),
            backbone=train.backbone_path(checkpoints),
            threshold=float(metrics["tasks"][task]["threshold"]),
            heldout_auc=_auc(metrics["tasks"][task].get("auc")),
        )
        for task in tasks
    )
    return ExportRequest(
        backbone=train.backbone_path(checkpoints),
        tasks=tasks,
        target="cpu",
        repository=repository,
        model_name=model_name,
        num_heads=metrics.get("architecture", {}).get("num_heads"),
        synthetic_demo=True,
        serving=serving,
        force=force,
    )


def run_demo(
    *,
    repository: Path,
    model_name: str = contract.DEFAULT_MODEL_NAME,
    checkpoints: Path | None = None,
    serving: ServingOptions | None = None,
    force: bool = False,
    log: Log = print,
) -> ExportOutcome:
    from demo import train

    checkpoints = Path(checkpoints) if checkpoints is not None else train.DEFAULT_OUT
    missing = [path.name for path in train.output_paths(checkpoints) if not path.is_file()]
    if missing:
        log(
            f"demo checkpoints missing in {checkpoints} ({', '.join(missing)}): "
            "training the synthetic demo model"
        )
        train.run(checkpoints, log=log)
    metrics = json.loads((checkpoints / train.METRICS_FILENAME).read_text())
    request = demo_request(
        checkpoints,
        metrics,
        repository=Path(repository),
        model_name=model_name,
        serving=serving or ServingOptions(),
        force=force,
    )
    return run_export(request, log=log)
