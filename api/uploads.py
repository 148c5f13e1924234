"""Spool request bodies to disk with a hard size cap, so memory stays bounded by the decoded volume."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from starlette.requests import Request

from api.problems import ProblemError


def _too_large(limit: int, observed: int | str) -> ProblemError:
    return ProblemError(
        413,
        "payload_too_large",
        f"the body exceeds the {limit} byte limit of this gateway",
        observed=observed,
        expected=f"<= {limit} bytes",
    )


async def spool_body(request: Request, *, limit: int, directory: str | None) -> Path:
    """Write the request body to a private temporary file and return its path (the caller deletes it).

    Refuses early from Content-Length when present, and again while streaming (chunked bodies).
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit, int(declared))
    handle, name = tempfile.mkstemp(prefix="headct-upload-", dir=directory)
    path = Path(name)
    received = 0
    try:
        with os.fdopen(handle, "wb") as sink:
            async for chunk in request.stream():
                received += len(chunk)
                if received > limit:
                    raise _too_large(limit, f"> {limit}")
                sink.write(chunk)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    if received == 0:
        path.unlink(missing_ok=True)
        raise ProblemError(400, "empty_body", "the request body is empty; send one head CT scan")
    return path
