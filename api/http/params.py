"""The query parameters and headers both prediction routes take (`/v1/predict` and
`/v1/studies/{study_uid}/predict`), declared once."""

from __future__ import annotations

from typing import Annotated

from fastapi import Header, Query, Request

from api.auth import ANONYMOUS, keyring
from api.http.map_answers import MapFormat
from api.inference.lanes import PRIORITY_HEADER, Lane, resolve_lane
from api.settings import Settings

TasksQuery = Annotated[str | None, Query(description="comma-separated subset of findings")]
IncludeQuery = Annotated[
    str | None,
    Query(
        description="comma-separated extras: `embedding`; `attention` (per finding, its 8x8x8 explanation "
        "map on the model-input grid; with `Accept: application/dicom` also a DICOM Parametric Map of "
        "the maps on the source series); `preview` (the maps as a PNG montage in the JSON answer)"
    ),
]
FormatQuery = Annotated[
    MapFormat | None,
    Query(
        alias="format",
        description="answer with the findings' maps on the scan's own grid instead of JSON: `nifti` "
        "(gzip NIfTI in the upload's affine, one volume per finding) or `png` (the preview montage)",
    ),
]
PriorityQuery = Annotated[
    str | None,
    Query(
        max_length=16,
        description="priority lane: `stat` (emergency: first in every queue), `routine` (default) or "
        "`bulk` (archives; refused first when busy). Also the `X-HeadCT-Priority` header.",
    ),
]
PriorityHeader = Annotated[str | None, Header(alias=PRIORITY_HEADER, max_length=16, include_in_schema=False)]


def split_list(value: str | None) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``."""
    return [part.strip() for part in (value or "").split(",") if part.strip()]


def request_lane(request: Request, settings: Settings, asked: str | None) -> Lane:
    """The lane asked for (query or header) as the caller's API key allows it (400
    ``invalid_priority``, 403 ``priority_not_allowed``), noted for the access log line."""
    identity = getattr(request.state, "api_key_id", ANONYMOUS)
    lane = resolve_lane(asked, keyring(settings).lanes(identity))
    request.state.lane = lane.value
    return lane
