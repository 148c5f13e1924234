"""gRPC server interceptors for the `headct.v1.HeadCT` service: API keys + per-key limit (same rules
and problem codes as REST, `api.auth`) and the outcome log line (same logger as REST,
``headct.access``). The health and reflection services stay open, like /livez and /readyz.

The abort and request-id functions are passed in by `api.grpc_server`, so a refused call carries the
problem code in its trailing metadata exactly like every other gRPC error of the gateway.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

import grpc

from api.auth import API_KEY_HEADER, key_slots, keyring
from api.problems import ProblemError
from api.settings import Settings

logger = logging.getLogger("headct.access")

Abort = Callable[[grpc.aio.ServicerContext, ProblemError, str], Awaitable[None]]
RequestId = Callable[[str], str]
Behaviour = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]

_LIMITED_METHODS: Final = ("/Predict", "/PredictStream")


def _wrap(handler: grpc.RpcMethodHandler, wrap: Callable[[Behaviour], Behaviour]) -> grpc.RpcMethodHandler:
    """The same handler with its behaviour wrapped (the service only has unary and client-streaming
    methods)."""
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            wrap(handler.unary_unary),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(
            wrap(handler.stream_unary),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    return handler


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Metadata ``x-api-key: <key>`` or ``authorization: Bearer <key>``; UNAUTHENTICATED otherwise,
    RESOURCE_EXHAUSTED (`key_concurrency_exceeded`) over the key's limit on predictions."""

    def __init__(self, settings: Settings, service: str, abort: Abort, request_id: RequestId) -> None:
        self.settings = settings
        self.prefix = f"/{service}/"
        self.abort = abort
        self.request_id = request_id

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(self.prefix):
            return handler
        limited = details.method.endswith(_LIMITED_METHODS)

        def wrap(behaviour: Behaviour) -> Behaviour:
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
                    await self.abort(context, error, self.request_id(metadata.get("x-request-id", "")))
                    raise  # unreachable: abort raises
                _IDENTITY[id(context)] = identity  # popped by the access log interceptor around us
                try:
                    return await behaviour(request, context)
                finally:
                    if limited:
                        slots.release(identity)

            return guarded

        return _wrap(handler, wrap)


# The key id of calls in flight, for the outcome line (the context object has no free attributes).
_IDENTITY: dict[int, str] = {}


class AccessLogInterceptor(grpc.aio.ServerInterceptor):
    """One ``headct.access`` line per HeadCT call: request id, method, gRPC status, problem code,
    key id, duration. Reads only what the handler put in the trailing metadata."""

    def __init__(self, service: str) -> None:
        self.prefix = f"/{service}/"

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(self.prefix):
            return handler
        method = details.method

        def wrap(behaviour: Behaviour) -> Behaviour:
            async def logged(request: Any, context: grpc.aio.ServicerContext) -> Any:
                started = time.perf_counter()
                try:
                    return await behaviour(request, context)
                finally:
                    _log(method, context, started)

            return logged

        return _wrap(handler, wrap)


def _log(method: str, context: grpc.aio.ServicerContext, started: float) -> None:
    trailing = {k: v for k, v in (context.trailing_metadata() or ()) if isinstance(v, str)}
    code = context.code()
    status = code.name if isinstance(code, grpc.StatusCode) else "OK"
    fields = {
        "request_id": trailing.get("x-request-id"),
        "method": "grpc",
        "route": method,
        "status": status,
        "code": trailing.get("headct-problem-code"),
        "api_key": _IDENTITY.pop(id(context), None),
        "duration_ms": round((time.perf_counter() - started) * 1000.0, 3),
    }
    level = logging.WARNING if status in {"INTERNAL", "UNKNOWN", "DATA_LOSS"} else logging.INFO
    logger.log(level, "request", extra={k: v for k, v in fields.items() if v is not None})


def interceptors(
    settings: Settings, service: str, *, abort: Abort, request_id: RequestId
) -> list[grpc.aio.ServerInterceptor]:
    """For `grpc.aio.server(interceptors=...)`; the first is the outermost."""
    return [AccessLogInterceptor(service), ApiKeyInterceptor(settings, service, abort, request_id)]
