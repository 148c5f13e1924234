"""gRPC server interceptors for the `headct.v1.HeadCT` service: API keys + per-key limit (same rules
and problem codes as REST, `api.auth`) and the outcome log line (same logger as REST,
``headct.access``). The health and reflection services stay open, like /livez and /readyz.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
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

# The key id of calls in flight, for the outcome line (the context object has no free attributes).
_IDENTITY: dict[int, str] = {}


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
            _IDENTITY[id(context)] = identity  # popped by the access log interceptor around us
            try:
                return await behaviour(request, context)
            finally:
                if limited:
                    slots.release(identity)

        return guarded


class AccessLogInterceptor(_ServiceInterceptor):
    """One ``headct.access`` line per HeadCT call: request id, method, gRPC status, problem code,
    key id, duration. Reads only what the handler put in the trailing metadata."""

    def wrap(self, method: str, behaviour: Behaviour) -> Behaviour:
        async def logged(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.perf_counter()
            try:
                return await behaviour(request, context)
            finally:
                _log(method, context, started)

        return logged


def _log(method: str, context: grpc.aio.ServicerContext, started: float) -> None:
    trailing = {k: v for k, v in (context.trailing_metadata() or ()) if isinstance(v, str)}
    code = context.code()
    status = code.name if isinstance(code, grpc.StatusCode) else "OK"
    line = AccessLine(
        request_id=trailing.get("x-request-id"),
        method="grpc",
        route=method,
        status=status,
        code=trailing.get("headct-problem-code"),
        api_key=_IDENTITY.pop(id(context), None),
        duration_ms=elapsed_ms(started),
    )
    log_access(line, logging.WARNING if status in {"INTERNAL", "UNKNOWN", "DATA_LOSS"} else logging.INFO)


def interceptors(settings: Settings, service: str) -> list[grpc.aio.ServerInterceptor]:
    """For `grpc.aio.server(interceptors=...)`; the first is the outermost."""
    return [AccessLogInterceptor(service), ApiKeyInterceptor(settings, service)]
