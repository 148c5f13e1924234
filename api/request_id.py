"""Request ids: echo the caller's `X-Request-ID` (REST header, gRPC metadata or option) when it is a sane
token, else make one. The id lands in logs and response headers, so anything else is replaced."""

from __future__ import annotations

import uuid
from typing import Final

REQUEST_ID_HEADER: Final = "X-Request-ID"
MAX_REQUEST_ID_LENGTH: Final = 128


def sanitize_request_id(supplied: str = "") -> str:
    if 0 < len(supplied) <= MAX_REQUEST_ID_LENGTH and supplied.isascii() and supplied.isprintable():
        return supplied
    return uuid.uuid4().hex
