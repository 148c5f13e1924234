"""Per-request context for every HTTP request: the request id (the caller's `X-Request-ID` when sane,
else a new one) and the start time on ``scope["state"]`` (read as ``request.state`` by the routes and
the problem handlers), the id echoed in the response headers; once the request is over, the request
counter and duration histogram labelled by route template and the access log line (api/access_log.py),
also for requests that raise. Outermost of the app's middlewares.

Pure ASGI on purpose: Starlette's `BaseHTTPMiddleware` (what ``@app.middleware("http")`` makes) runs
every chunk of the request body through an anyio task group; for a 7 MB upload that was a third of
the gateway process's CPU per scan.
"""

from __future__ import annotations

import time
from typing import Any

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import metrics
from api.access_log import log_request
from api.request_id import REQUEST_ID_HEADER, sanitize_request_id


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state: dict[str, Any] = scope.setdefault("state", {})
        request_id = sanitize_request_id(Headers(scope=scope).get(REQUEST_ID_HEADER, ""))
        started = time.perf_counter()
        state["request_id"] = request_id
        state["started_at"] = started
        status = 500  # what the client gets when the app raises before responding

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except BaseException:
            state.setdefault("problem_code", "internal_error")
            raise
        finally:
            log_request(scope, status, started)
            # Label by route template, never by raw path, so scanners cannot blow up label cardinality.
            route = getattr(scope.get("route"), "path", "unmatched")
            if route != "/metrics":
                metrics.REQUESTS.labels(route=route, status=str(status)).inc()
                metrics.REQUEST_DURATION.labels(route=route).observe(time.perf_counter() - started)
