"""One outcome line per HTTP request (logger ``headct.access``), replacing uvicorn's access log.

Fields, and only these: `request_id`, `method`, `route` (the template, never the raw path or query,
which may carry a series UID), `status`, `code` (the problem code of an error), `api_key` (a short
hash, `api.auth.key_id`), `timings_ms` (the stages of a prediction), `duration_ms`. Probes and
/metrics are logged at DEBUG so they do not drown the rest.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Final

from starlette.types import Scope

logger = logging.getLogger("headct.access")

_QUIET_ROUTES: Final = frozenset({"/livez", "/readyz", "/metrics"})


def log_request(scope: Scope, status: int, started: float) -> None:
    """The outcome line of one finished request, from what the routes and the problem handler left on
    ``scope["state"]`` (called by api/request_context.py)."""
    state: dict[str, Any] = scope.get("state", {})
    route = getattr(scope.get("route"), "path", "unmatched")
    level = logging.DEBUG if route in _QUIET_ROUTES and status < 500 else logging.INFO
    if status >= 500:
        level = logging.WARNING
    if not logger.isEnabledFor(level):
        return
    fields: dict[str, Any] = {
        "request_id": state.get("request_id"),
        "method": scope.get("method"),
        "route": route,
        "status": status,
        "code": state.get("problem_code"),
        "api_key": state.get("api_key_id"),
        "timings_ms": state.get("timings_ms"),
        "duration_ms": round((time.perf_counter() - started) * 1000.0, 3),
    }
    logger.log(level, "request", extra={k: v for k, v in fields.items() if v is not None})
