"""One outcome line per request, REST and gRPC alike (logger ``headct.access``), replacing uvicorn's
access log.

Fields, and only these: `request_id`, `method`, `route` (the template, never the raw path or query,
which may carry a series UID), `status`, `code` (the problem code of an error), `api_key` (a short
hash, `api.auth.key_id`), `lane` (a prediction's priority lane), `timings_ms` (the stages of a
prediction), `duration_ms`. Probes and
/metrics are logged at DEBUG so they do not drown the rest.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any, Final

from starlette.types import Scope

logger = logging.getLogger("headct.access")

_QUIET_ROUTES: Final = frozenset({"/livez", "/readyz", "/metrics"})


@dataclass(frozen=True)
class AccessLine:
    """The fields of one outcome line; None fields are left out of the record."""

    request_id: str | None
    method: str  # the HTTP method, or "grpc"
    route: str  # the route template or the gRPC method, never the raw path
    status: int | str  # HTTP status, or the gRPC status name
    duration_ms: float
    code: str | None = None
    api_key: str | None = None
    lane: str | None = None
    timings_ms: dict[str, float] | None = None


def log_access(line: AccessLine, level: int = logging.INFO) -> None:
    logger.log(level, "request", extra={k: v for k, v in asdict(line).items() if v is not None})


def elapsed_ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000.0, 3)


def log_request(scope: Scope, status: int, started: float) -> None:
    """The outcome line of one finished HTTP request, from what the routes and the problem handler left
    on ``scope["state"]`` (called by api/http/request_context.py)."""
    state: dict[str, Any] = scope.get("state", {})
    route = getattr(scope.get("route"), "path", "unmatched")
    level = logging.DEBUG if route in _QUIET_ROUTES and status < 500 else logging.INFO
    if status >= 500:
        level = logging.WARNING
    if not logger.isEnabledFor(level):
        return
    line = AccessLine(
        request_id=state.get("request_id"),
        method=str(scope.get("method")),
        route=route,
        status=status,
        code=state.get("problem_code"),
        api_key=state.get("api_key_id"),
        lane=state.get("lane"),
        timings_ms=state.get("timings_ms"),
        duration_ms=elapsed_ms(started),
    )
    log_access(line, level)
