"""A gateway problem (`api.problems.ProblemError`) as a gRPC error: the gRPC status its `ProblemCode`
names in the catalogue (`api.problem_codes`), and the problem itself in the trailing metadata
(``headct-problem-code``, ``headct-problem-http-status``, ``headct-problem-bin`` with the problem+json
body, ``x-request-id``, ``retry-after``), so gRPC callers get the same machine-readable codes as REST
callers."""

from __future__ import annotations

import grpc

from api import metrics
from api.problems import ProblemCode, ProblemError


def grpc_status(problem: ProblemError | ProblemCode) -> grpc.StatusCode:
    """The gRPC status of a problem, from the catalogue (the problem's own `code` travels in the
    trailing metadata)."""
    return problem.grpc_status


async def abort_with_problem(context: grpc.aio.ServicerContext, error: ProblemError, request_id: str) -> None:
    """End the call with `error`: its gRPC status, and the problem (code, HTTP status, JSON body,
    request id, Retry-After) in the trailing metadata, as every gRPC error of the gateway does."""
    metrics.REJECTIONS.labels(code=error.code).inc()
    problem = error.to_problem(request_id).model_dump_json(exclude_none=True)
    context.set_trailing_metadata(
        (
            ("headct-problem-code", error.code),
            ("headct-problem-http-status", str(error.status)),
            ("headct-problem-bin", problem.encode()),
            ("x-request-id", request_id),
            *((("retry-after", value),) if (value := error.headers.get("Retry-After")) else ()),
        )
    )
    await context.abort(grpc_status(error), f"{error.code}: {error.detail}")
