"""gRPC server interceptors for the `headct.v1.HeadCT` service: API keys + per-key limit (same rules
and problem codes as REST, `api.auth`) and the outcome log line (same logger as REST,
``headct.access``). The health and reflection services stay open, like /livez and /readyz.

What the interceptors and the servicer learn about a call (its key, lane, stage timings) goes into its
`CallNotes` for the log line: a servicer context has no free attributes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

import grpc

from api.access_log import AccessLine, elapsed_ms, log_access
from api.auth import API_KEY_HEADER, key_slots, keyring
from api.grpc.problems import abort_with_problem
from api.problems import ProblemError
from api.request_id import sanitize_request_id
from api.settings import Settings

Behaviour = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]

_LIMITED_METHODS: Final = ("/Predict", "/PredictStream")


@dataclass
class CallNotes:
    """What one call's outcome line says beyond its status: set while the call runs."""

    api_key: str | None = None
    lane: str | None = None
    timings_ms: dict[str, float] | None = None


# The notes of the calls in flight, by id() of their context; made and dropped by AccessLogInterceptor.
_NOTES: dict[int, CallNotes] = {}


def call_notes(context: grpc.aio.ServicerContext) -> CallNotes:
    """The notes of the call in `context` (a detached, unlogged one outside the interceptors)."""
    return _NOTES.get(id(context)) or CallNotes()


class _ServiceInterceptor(grpc.aio.ServerInterceptor):
    """Wraps the behaviour of every method of one service (the others pass through untouched)."""

    def __init__(self, service: str) -> None:
        self.prefix = f"/{service}/"

    def wrap(self, method: str, behaviour: Behaviour) -> Behaviour:
        raise NotImplementedError

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(self.prefix):
            return handler
        # The service has only unary and client-streaming methods.
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self.wrap(details.method, handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self.wrap(details.method, handler.stream_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


class ApiKeyInterceptor(_ServiceInterceptor):
    """Metadata ``x-api-key: <key>`` or ``authorization: Bearer <key>``; UNAUTHENTICATED otherwise,
    RESOURCE_EXHAUSTED (`key_concurrency_exceeded`) over the key's limit on predictions."""

    def __init__(self, settings: Settings, service: str) -> None:
        super().__init__(service)
        self.settings = settings

    def wrap(self, method: str, behaviour: Behaviour) -> Behaviour:
        limited = method.endswith(_LIMITED_METHODS)

        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
            metadata = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
            slots = key_slots(self.settings)
            try:
                identity = keyring(self.settings).authenticate(
                    metadata.get(API_KEY_HEADER.lower()), metadata.get("authorization")
                )
                if limited:
                    slots.acquire(identity)
            except ProblemError as error:
                request_id = sanitize_request_id(metadata.get("x-request-id", ""))
                await abort_with_problem(context, error, request_id)
                raise  # unreachable: abort raises
            call_notes(context).api_key = identity
            try:
                return await behaviour(request, context)
            finally:
                if limited:
                    slots.release(identity)

        return guarded


class AccessLogInterceptor(_ServiceInterceptor):
    """One ``headct.access`` line per HeadCT call: request id, method, gRPC status, problem code,
    key id, lane, stage timings, duration: from the trailing metadata and the call's notes."""

    def wrap(self, method: str, behaviour: Behaviour) -> Behaviour:
        async def logged(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.perf_counter()
            _NOTES[id(context)] = CallNotes()
            try:
                return await behaviour(request, context)
            finally:
                _log(method, context, started, _NOTES.pop(id(context), CallNotes()))

        return logged


def _log(method: str, context: grpc.aio.ServicerContext, started: float, notes: CallNotes) -> None:
    trailing = {k: v for k, v in (context.trailing_metadata() or ()) if isinstance(v, str)}
    code = context.code()
    status = code.name if isinstance(code, grpc.StatusCode) else "OK"
    line = AccessLine(
        request_id=trailing.get("x-request-id"),
        method="grpc",
        route=method,
        status=status,
        code=trailing.get("headct-problem-code"),
        api_key=notes.api_key,
        lane=notes.lane,
        timings_ms=notes.timings_ms,
        duration_ms=elapsed_ms(started),
    )
    log_access(line, logging.WARNING if status in {"INTERNAL", "UNKNOWN", "DATA_LOSS"} else logging.INFO)


def interceptors(settings: Settings, service: str) -> list[grpc.aio.ServerInterceptor]:
    """For `grpc.aio.server(interceptors=...)`; the first is the outermost."""
    return [AccessLogInterceptor(service), ApiKeyInterceptor(settings, service)]
