"""RFC 9457 problem details: every error the gateway returns is `application/problem+json` with a
machine-readable `code` from the catalogue in `api.problem_codes`."""

from __future__ import annotations

from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from api import metrics
from api.problem_codes import STATUS_MEANINGS, ProblemCode

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
    """Raised anywhere in request handling; rendered as problem+json by the app's handler (REST) or as a
    gRPC error (`api.grpc.problems`). Status, gRPC status and title come from the `ProblemCode`."""

    def __init__(
        self,
        problem: ProblemCode,
        detail: str,
        *,
        field: str | None = None,
        observed: Any | None = None,
        expected: Any | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.problem: ProblemCode | None = problem
        self.status = problem.http_status
        self.code = problem.code
        self.title = problem.title
        self.detail = detail
        self.field = field
        self.observed = observed
        self.expected = expected
        self.headers = headers or {}

    @classmethod
    def from_http_exception(cls, status: int, detail: str, headers: dict[str, str]) -> ProblemError:
        """Starlette's own HTTP errors: 404 / 405 from the catalogue; any other status (none is raised
        today) as the uncatalogued ``http_<status>``, so the client still gets problem+json."""
        problem = ProblemCode.for_http_status(status)
        if problem is not None:
            return cls(problem, detail, headers=headers)
        error = cls.__new__(cls)
        Exception.__init__(error, detail)
        error.problem, error.status, error.code = None, status, f"http_{status}"
        error.title, error.detail, error.headers = f"HTTP {status}", detail, headers
        error.field = error.observed = error.expected = None
        return error

    @property
    def grpc_status(self) -> grpc.StatusCode:
        return self.problem.grpc_status if self.problem is not None else grpc.StatusCode.INTERNAL

    def __reduce__(self) -> tuple[Any, ...]:
        # Crosses process boundaries (preprocessing runs in a process pool): rebuild from the fields,
        # not from `args`, which hold only the detail.
        if self.problem is None:
            return (ProblemError.from_http_exception, (self.status, self.detail, self.headers))
        keywords = {
            "field": self.field,
            "observed": self.observed,
            "expected": self.expected,
            "headers": self.headers,
        }
        return (_rebuild_problem, (self.problem.code, self.detail, keywords))

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


def _rebuild_problem(code: str, detail: str, keywords: dict[str, Any]) -> ProblemError:
    return ProblemError(ProblemCode.from_code(code), detail, **keywords)


def problem_responses(*selection: ProblemCode | int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` for routes: per HTTP status, the problem+json schema and a description
    listing the catalogue's codes. `selection` holds members, or HTTP statuses meaning all their codes."""
    chosen: list[ProblemCode] = []
    for item in selection:
        for member in [item] if isinstance(item, ProblemCode) else ProblemCode.with_status(item):
            if member not in chosen:
                chosen.append(member)
    responses: dict[int | str, dict[str, Any]] = {}
    for status in sorted({member.http_status for member in chosen}):
        lines = [f"- `{m.code}`: {m.description}" for m in chosen if m.http_status == status]
        responses[status] = {
            "description": f"{STATUS_MEANINGS[status]}. `code` is one of:\n\n" + "\n".join(lines),
            # The schema goes under the media type we actually send (problem+json); `model` registers
            # the component (FastAPI also lists it under application/json, which is harmless).
            "model": Problem,
            "content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        }
    return responses


def problem_response(error: ProblemError, request: Request) -> JSONResponse:
    metrics.REJECTIONS.labels(code=error.code).inc()
    request.state.problem_code = error.code  # for the access log line
    request_id = getattr(request.state, "request_id", None)
    body = error.to_problem(request_id).model_dump(exclude_none=True)
    return JSONResponse(body, status_code=error.status, media_type=PROBLEM_MEDIA_TYPE, headers=error.headers)


def install_problem_handlers(app: FastAPI) -> None:
    async def on_problem(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, ProblemError)
        return problem_response(error, request)

    async def on_validation(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, RequestValidationError)
        first = error.errors()[0] if error.errors() else {}
        location = ".".join(str(part) for part in first.get("loc", ()))
        problem = ProblemError(
            ProblemCode.INVALID_REQUEST, first.get("msg", "invalid request"), field=location or None
        )
        return problem_response(problem, request)

    async def on_http(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, StarletteHTTPException)
        problem = ProblemError.from_http_exception(
            error.status_code, str(error.detail), dict(error.headers or {})
        )
        return problem_response(problem, request)

    app.add_exception_handler(ProblemError, on_problem)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
