"""The row of one scan in `headct batch`'s output: its columns (`FIELDS`) and how an outcome becomes one.

Outcomes, in the ``status`` column: ``ok`` (findings, model version and sha256, warnings, optionally the
CLS embedding: `ok_row`), ``refused`` (a 4xx problem about the scan itself, e.g. ``not_head``, recorded
with its code: final) and ``failed`` (retries used up, a 5xx: `problem_row`; an unreadable local file:
`failure_row`; tried again by the next run).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Final

import pyarrow as pa

from headct.client.batch.retry import RETRY_STATUSES
from headct.client.http import HeadCTProblem

Row = dict[str, Any]

# The statuses a rerun skips: the scan was scored, or refused for good.
DONE: Final = frozenset({"ok", "refused"})

# The row of one scan: the names of api/schemas.py's PredictResponse, flattened one level.
FINDING_TYPE: Final = pa.struct(
    [
        ("name", pa.string()),
        ("probability", pa.float64()),
        ("threshold", pa.float64()),
        ("positive", pa.bool_()),
    ]
)
WARNING_TYPE: Final = pa.struct([("code", pa.string()), ("detail", pa.string())])
FIELDS: Final = (
    pa.field("scan_id", pa.string(), nullable=False),
    pa.field("status", pa.string(), nullable=False),
    pa.field("problem_code", pa.string()),
    pa.field("problem_status", pa.int16()),
    pa.field("problem_detail", pa.string()),
    pa.field("findings", pa.list_(FINDING_TYPE)),
    pa.field("warnings", pa.list_(WARNING_TYPE)),
    pa.field("model_name", pa.string()),
    pa.field("model_version", pa.string()),
    pa.field("model_sha256", pa.string()),
    pa.field("input_source_format", pa.string()),
    pa.field("input_shape", pa.list_(pa.int32())),
    pa.field("input_spacing_mm", pa.list_(pa.float64())),
    pa.field("request_id", pa.string()),
    pa.field("priority", pa.string()),  # the lane the gateway ran it in
    pa.field("attempts", pa.int16()),
    pa.field("finished_at", pa.string()),
)
COLUMNS: Final = (*(field.name for field in FIELDS), "embedding")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _row(scan_id: str, status: str, attempts: int, **values: Any) -> Row:
    row: Row = dict.fromkeys(COLUMNS)
    row.update(scan_id=scan_id, status=status, attempts=attempts, finished_at=_now(), **values)
    return row


def ok_row(scan_id: str, result: dict[str, Any], attempts: int) -> Row:
    """A prediction as a row: its findings and warnings as the API names them, model and input flattened."""
    model, scan = result.get("model") or {}, result.get("input") or {}
    return _row(
        scan_id,
        "ok",
        attempts,
        findings=[{key: f.get(key) for key in FINDING_TYPE.names} for f in result.get("findings", [])],
        warnings=[{key: w.get(key) for key in WARNING_TYPE.names} for w in result.get("warnings", [])],
        model_name=model.get("name"),
        model_version=model.get("version"),
        model_sha256=model.get("sha256"),
        input_source_format=scan.get("source_format"),
        input_shape=scan.get("shape"),
        input_spacing_mm=scan.get("spacing_mm"),
        request_id=result.get("request_id"),
        priority=result.get("priority"),
        embedding=result.get("embedding"),
    )


def problem_row(scan_id: str, problem: HeadCTProblem, attempts: int) -> Row:
    """A gateway problem: ``refused`` when it is about the scan (4xx), else ``failed`` (tried again)."""
    refused = 400 <= problem.status < 500 and problem.status not in RETRY_STATUSES
    return _row(
        scan_id,
        "refused" if refused else "failed",
        attempts,
        problem_code=problem.code,
        problem_status=problem.status,
        problem_detail=problem.detail,
        request_id=problem.request_id,
    )


def failure_row(scan_id: str, code: str, error: Exception, attempts: int) -> Row:
    """A failure on this side of the wire (no connection, an unreadable local file)."""
    return _row(
        scan_id, "failed", attempts, problem_code=code, problem_detail=f"{type(error).__name__}: {error}"
    )
