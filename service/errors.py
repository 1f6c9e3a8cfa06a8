"""One place where failures become gRPC status codes, with a message a person can act on.

Servicers raise `ServiceError(code, message)` for what they check themselves and let the library's own errors
through; `status_of(exc)` maps both. Anything unexpected is INTERNAL with a generic message (the traceback goes
to the log, never to the caller).
"""

from __future__ import annotations

import asyncio

import grpc


class ServiceError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(field: str, problem: str) -> ServiceError:
    """INVALID_ARGUMENT naming the request field, e.g. invalid("options.dim", "must be between 1 and 384")."""
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {problem}")


def unimplemented(what: str, why: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.UNIMPLEMENTED, f"{what} is not available on this server yet: {why}")


class QueueFull(Exception):
    """The batcher's queue has no room (unary calls fail at once instead of waiting)."""


class Expired(Exception):
    """A call's deadline passed before its work reached the model."""


class ModelLoading(Exception):
    """The model a call needs is still loading."""


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, ServiceError):
        return exc.code, exc.message
    if isinstance(exc, QueueFull):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc) or "the server is busy; retry with backoff"
    if isinstance(exc, Expired | asyncio.TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(exc) or "the deadline passed before the work was done"
    if isinstance(exc, ModelLoading):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    try:  # the store / workers errors (their messages are written for the user)
        from sieve.store.errors import AlreadyExists, InvalidInput, NotFound
    except ImportError:  # pragma: no cover - the store library always ships with the server
        pass
    else:
        if isinstance(exc, NotFound):
            return grpc.StatusCode.NOT_FOUND, str(exc)
        if isinstance(exc, AlreadyExists):
            return grpc.StatusCode.ALREADY_EXISTS, str(exc)
        if isinstance(exc, InvalidInput):
            return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    return grpc.StatusCode.INTERNAL, "internal error; the server logged the details under this call's request id"


def _log_internal(exc: BaseException) -> None:
    import logging

    logging.getLogger("sieve.service.rpc").error("internal error", exc_info=exc)


async def abort_with(context, exc: BaseException):
    """End the call with the status `exc` maps to (logging the traceback of anything unexpected)."""
    code, message = status_of(exc)
    if code == grpc.StatusCode.INTERNAL and not isinstance(exc, ServiceError):
        _log_internal(exc)
    await context.abort(code, message)


def rpc(method):
    """Decorate a unary-response servicer method: library and validation errors become statuses."""
    import functools

    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as e:
            await abort_with(context, e)

    return wrapper


def rpc_stream(method):
    """The same for a servicer method that is an async generator (server-streaming or bidi)."""
    import functools

    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            async for response in method(self, request, context):
                yield response
        except grpc.aio.AbortError:
            raise
        except Exception as e:
            await abort_with(context, e)

    return wrapper
