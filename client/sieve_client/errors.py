"""Typed exceptions, one per gRPC status a caller may want to handle differently."""

from __future__ import annotations

import grpc


class SieveError(Exception):
    """A call failed. `code` is the gRPC status, `message` the server's explanation (it names the field at fault)."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None, request_id: str | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.request_id = request_id

    def __str__(self) -> str:
        rid = f" [request {self.request_id}]" if self.request_id else ""
        return f"{self.code.name}: {self.message}{rid}"


class InvalidArgument(SieveError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(SieveError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(SieveError):
    code = grpc.StatusCode.ALREADY_EXISTS


class Unauthenticated(SieveError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(SieveError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(SieveError):
    """The server's queue is full (retried with backoff by the client before this is raised)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(SieveError):
    """The server is unreachable, shutting down, or its model is still loading (retried before this is raised)."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(SieveError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class FailedPrecondition(SieveError):
    """The call is valid but the state does not allow it (e.g. Answer on a collection with nothing indexed)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Unimplemented(SieveError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Cancelled(SieveError):
    code = grpc.StatusCode.CANCELLED


class InternalError(SieveError):
    code = grpc.StatusCode.INTERNAL


_BY_CODE = {cls.code: cls for cls in (InvalidArgument, NotFound, AlreadyExists, Unauthenticated, PermissionDenied,
                                      ResourceExhausted, Unavailable, DeadlineExceeded, FailedPrecondition,
                                      Unimplemented, Cancelled, InternalError)}
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)


def from_rpc_error(error: grpc.RpcError) -> SieveError:
    """The typed exception for a failed call (grpc.RpcError from a sync or an async stub)."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    message = (error.details() if hasattr(error, "details") else None) or str(code)
    request_id = None
    try:
        metadata = error.initial_metadata() if hasattr(error, "initial_metadata") else None
        request_id = dict(metadata or ()).get("x-request-id")
    except Exception:  # metadata is not always available on a failed call
        request_id = None
    cls = _BY_CODE.get(code, SieveError)
    return cls(message, code=code, request_id=request_id)
