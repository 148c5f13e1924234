"""RFC 9457 problem details: every error the gateway returns is `application/problem+json` with a
machine-readable `code`."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from api import metrics

PROBLEM_MEDIA_TYPE = "application/problem+json"


class Problem(BaseModel):
    """The error body. `type` is a stable URN derived from `code`."""

    type: str
    title: str
    status: int
    detail: str
    code: str
    field: str | None = None
    observed: Any | None = None
    expected: Any | None = None
    request_id: str | None = None


class ProblemError(Exception):
    """Raised anywhere in request handling; rendered as problem+json by the app's handler."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        *,
        title: str | None = None,
        field: str | None = None,
        observed: Any | None = None,
        expected: Any | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.title = title or code.replace("_", " ").capitalize()
        self.field = field
        self.observed = observed
        self.expected = expected
        self.headers = headers or {}

    def __reduce__(self) -> tuple[Any, ...]:
        # Crosses process boundaries (preprocessing runs in a process pool): rebuild from the fields,
        # not from `args`, which hold only the detail.
        keywords = {
            "title": self.title,
            "field": self.field,
            "observed": self.observed,
            "expected": self.expected,
            "headers": self.headers,
        }
        return (_rebuild_problem, (self.status, self.code, self.detail, keywords))

    def to_problem(self, request_id: str | None) -> Problem:
        return Problem(
            type=f"urn:headct:problem:{self.code}",
            title=self.title,
            status=self.status,
            detail=self.detail,
            code=self.code,
            field=self.field,
            observed=self.observed,
            expected=self.expected,
            request_id=request_id,
        )


def _rebuild_problem(status: int, code: str, detail: str, keywords: dict[str, Any]) -> ProblemError:
    return ProblemError(status, code, detail, **keywords)


def problem_response(error: ProblemError, request: Request) -> JSONResponse:
    metrics.REJECTIONS.labels(code=error.code).inc()
    request.state.problem_code = error.code  # for the access log line
    request_id = getattr(request.state, "request_id", None)
    body = error.to_problem(request_id).model_dump(exclude_none=True)
    return JSONResponse(body, status_code=error.status, media_type=PROBLEM_MEDIA_TYPE, headers=error.headers)


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


def install_problem_handlers(app: FastAPI) -> None:
    async def on_problem(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, ProblemError)
        return problem_response(error, request)

    async def on_validation(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, RequestValidationError)
        first = error.errors()[0] if error.errors() else {}
        location = ".".join(str(part) for part in first.get("loc", ()))
        problem = ProblemError(
            400, "invalid_request", first.get("msg", "invalid request"), field=location or None
        )
        return problem_response(problem, request)

    async def on_http(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, StarletteHTTPException)
        code = _HTTP_CODES.get(error.status_code, f"http_{error.status_code}")
        problem = ProblemError(error.status_code, code, str(error.detail), headers=dict(error.headers or {}))
        return problem_response(problem, request)

    app.add_exception_handler(ProblemError, on_problem)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
