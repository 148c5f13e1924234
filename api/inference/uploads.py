"""Spool uploaded bytes to disk with a hard size cap, so memory stays bounded by the decoded volume.
One spooler for both front ends: REST streams the request body, gRPC the scan's chunks."""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterable
from pathlib import Path

from starlette.requests import Request

from api.problems import ProblemCode, ProblemError


def _too_large(limit: int, observed: int | str) -> ProblemError:
    return ProblemError(
        ProblemCode.PAYLOAD_TOO_LARGE,
        f"the body exceeds the {limit} byte limit of this gateway",
        observed=observed,
        expected=f"<= {limit} bytes",
    )


async def spool_chunks(
    chunks: AsyncIterable[bytes], *, limit: int, directory: str | None, prefix: str = "headct-upload-"
) -> Path:
    """Write `chunks` to a private temporary file and return its path (the caller deletes it).

    Raises 413 `payload_too_large` as soon as more than `limit` bytes arrived, 400 `empty_body` when
    none did; the partial file is removed in both cases.
    """
    handle, name = tempfile.mkstemp(prefix=prefix, dir=directory)
    path = Path(name)
    received = 0
    try:
        with os.fdopen(handle, "wb") as sink:
            async for chunk in chunks:
                received += len(chunk)
                if received > limit:
                    raise _too_large(limit, f"> {limit}")
                sink.write(chunk)
        if received == 0:
            raise ProblemError(ProblemCode.EMPTY_BODY, "the request body is empty; send one head CT scan")
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


def check_declared_length(declared: int, *, limit: int) -> None:
    """Refuse (413) from a declared length (REST Content-Length) before reading a byte."""
    if declared > limit:
        raise _too_large(limit, declared)


def declared_length(request: Request) -> int | None:
    """The REST body's Content-Length, when it is declared and well-formed."""
    value = request.headers.get("content-length")
    return int(value) if value is not None and value.isdigit() else None
