"""Server interceptors, one concern each: request ids, metrics, API keys.

Each wraps the method handler grpc found, so its code runs inside the call (same task, same contextvars) and sees
how the call ended. Health checking and reflection are left alone: they answer without a key, are not counted,
and their streaming handlers are written in a style (`context.write`) the wrappers do not re-wrap.
"""

from __future__ import annotations

import contextvars
import logging
import time
import uuid
from collections.abc import Callable

import grpc
from grpc import aio

from .auth import KeyStore, current
from .errors import status_of
from .metrics import Metrics

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("sieve_request_id", default="-")
log = logging.getLogger("sieve.service.rpc")
UNWRAPPED = ("/grpc.health.v1.", "/grpc.reflection.")
NO_KEY = ("/sieve.v1.InfoService/",)  # what a caller needs before it has a key: limits, whether auth is on


class RequestIdFilter(logging.Filter):
    """Adds `record.request_id` (the current call's, or '-') so log formats can print it."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


def _metadata(context: aio.ServicerContext, key: str) -> str | None:
    for k, v in context.invocation_metadata() or ():
        if k == key:
            return v
    return None


def wrap(handler: grpc.RpcMethodHandler, around: Callable) -> grpc.RpcMethodHandler:
    """A copy of `handler` whose behaviour is `around(behaviour, streams_out)`."""
    kinds = (("unary_unary", grpc.unary_unary_rpc_method_handler, False),
             ("unary_stream", grpc.unary_stream_rpc_method_handler, True),
             ("stream_unary", grpc.stream_unary_rpc_method_handler, False),
             ("stream_stream", grpc.stream_stream_rpc_method_handler, True))
    for attr, make, streams_out in kinds:
        behaviour = getattr(handler, attr)
        if behaviour is not None:
            return make(around(behaviour, streams_out), request_deserializer=handler.request_deserializer,
                        response_serializer=handler.response_serializer)
    return handler


def _around(before: Callable, after: Callable) -> Callable:
    """Build wrappers that await `before(context)` -> state, run the call, then `after(context, state, exc)`."""

    def make(behaviour, streams_out):
        if streams_out:
            async def stream(request, context):
                state = await before(context)
                exc = None
                try:
                    async for response in behaviour(request, context):
                        yield response
                except BaseException as e:
                    exc = e
                    raise
                finally:
                    after(context, state, exc)
            return stream

        async def unary(request, context):
            state = await before(context)
            exc = None
            try:
                return await behaviour(request, context)
            except BaseException as e:
                exc = e
                raise
            finally:
                after(context, state, exc)
        return unary

    return make


def _code(context: aio.ServicerContext, exc: BaseException | None) -> grpc.StatusCode:
    import asyncio

    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if code is not None:  # some versions hand back the raw int
        return next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
    if exc is None:
        return grpc.StatusCode.OK
    if isinstance(exc, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    return status_of(exc)[0] if isinstance(exc, Exception) else grpc.StatusCode.UNKNOWN


class RequestIdInterceptor(aio.ServerInterceptor):
    """The caller's `x-request-id` (or a new one) for the logs, sent back in the initial metadata."""

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or details.method.startswith(UNWRAPPED):
            return handler

        async def before(context):
            rid = _metadata(context, "x-request-id") or uuid.uuid4().hex[:16]
            request_id.set(rid[:64])
            await context.send_initial_metadata((("x-request-id", rid[:64]),))
            return None

        def after(context, _state, exc):
            code = _code(context, exc)
            level = logging.DEBUG if code == grpc.StatusCode.OK else logging.INFO
            log.log(level, "%s %s", details.method, code.name)

        return wrap(handler, _around(before, after))


class MetricsInterceptor(aio.ServerInterceptor):
    """Counts and times every call by method and status code."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or details.method.startswith(UNWRAPPED):
            return handler
        method = details.method

        async def before(_context):
            return time.perf_counter()

        def after(context, start, exc):
            code = _code(context, exc).name
            self.metrics.rpc_requests.labels(method, code).inc()
            self.metrics.rpc_latency.labels(method, code).observe(time.perf_counter() - start)

        return wrap(handler, _around(before, after))


class AuthInterceptor(aio.ServerInterceptor):
    """Finds the caller's API key and puts its principal in `sieve.service.auth.current`; a missing or wrong key
    ends the call with UNAUTHENTICATED. What the principal may do is checked by the servicers (`require`), which
    know the collection a call is about."""

    def __init__(self, keys: KeyStore):
        self.keys = keys

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or details.method.startswith(UNWRAPPED + NO_KEY):
            return handler
        keys = self.keys

        def make(behaviour, streams_out):
            async def authenticate(context):
                raw = _metadata(context, "x-api-key")
                bearer = _metadata(context, "authorization")
                if raw is None and bearer is not None:
                    raw = bearer.removeprefix("Bearer ").removeprefix("bearer ").strip()
                try:
                    current.set(await keys.authenticate(raw))
                except Exception as e:
                    code, message = status_of(e)
                    await context.abort(code, message)

            if streams_out:
                async def stream(request, context):
                    await authenticate(context)
                    async for response in behaviour(request, context):
                        yield response
                return stream

            async def unary(request, context):
                await authenticate(context)
                return await behaviour(request, context)
            return unary

        return wrap(handler, make)
