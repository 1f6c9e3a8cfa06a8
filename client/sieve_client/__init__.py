"""sieve-client: the Python SDK of the Sieve gRPC service (grpcio + protobuf only).

    from sieve_client import SieveClient

    with SieveClient("127.0.0.1:50051", api_key="sk-sieve-...") as client:
        vectors = client.embed(["a text", "another"], query=True).vectors
        job = client.upsert("docs", [("d1", "some text", {"lang": "en"})])
        client.wait_job(job.id)
        hits = client.search("docs", "what is in the text?", k=5)

Failed calls raise a `SieveError` subclass named after the gRPC status (`InvalidArgument`, `NotFound`, ...);
UNAVAILABLE and RESOURCE_EXHAUSTED are retried with backoff first.
"""

from ._channel import RetryPolicy
from .aio import AsyncSieveClient
from .client import SieveClient
from .errors import (
    AlreadyExists,
    Cancelled,
    DeadlineExceeded,
    InternalError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    SieveError,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)
from .results import Collection, Document, EmbedResult, Hit, Job, JobError, ModelInfo, Rank, ServerInfo, Tokens

__version__ = "0.1.0"
__all__ = [
    "AlreadyExists", "AsyncSieveClient", "Cancelled", "Collection", "DeadlineExceeded", "Document", "EmbedResult",
    "Hit", "InternalError", "InvalidArgument", "Job", "JobError", "ModelInfo", "NotFound", "PermissionDenied", "Rank",
    "ResourceExhausted", "RetryPolicy", "ServerInfo", "SieveClient", "SieveError", "Tokens", "Unauthenticated",
    "Unavailable", "Unimplemented",
]
