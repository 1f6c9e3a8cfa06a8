"""sieve-client: the Python SDK of the Sieve gRPC service (grpcio + protobuf only).

    from sieve_client import SieveClient

    with SieveClient("127.0.0.1:50051", api_key="sk-sieve-...") as client:
        vectors = client.embed(["a text", "another"], query=True).vectors
        job = client.upsert("docs", [("d1", "some text", {"lang": "en"})])
        client.wait_job(job.id)
        hits = client.search("docs", "what is in the text?", k=5, rerank=True)
        order = client.rerank("a query", ["passage one", "passage two"]).order
        for piece in client.answer("what is in the text?", collection="docs"):
            print(piece, end="")

Failed calls raise a `SieveError` subclass named after the gRPC status (`InvalidArgument`, `NotFound`, ...);
UNAVAILABLE and RESOURCE_EXHAUSTED are retried with backoff first.
"""

from ._channel import RetryPolicy
from .aio import AsyncSieveClient
from .answers import AnswerStream, AsyncAnswerStream
from .client import SieveClient
from .errors import (
    AlreadyExists,
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
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
from .results import (
    AnswerUsage,
    Citation,
    Collection,
    Document,
    EmbedResult,
    GenerationModel,
    Hit,
    Job,
    JobError,
    ModelInfo,
    Rank,
    RerankResult,
    ServerInfo,
    Tokens,
)

__version__ = "0.1.0"
__all__ = [
    "AlreadyExists", "AnswerStream", "AnswerUsage", "AsyncAnswerStream", "AsyncSieveClient", "Cancelled", "Citation",
    "Collection", "DeadlineExceeded", "Document", "EmbedResult", "FailedPrecondition", "GenerationModel", "Hit",
    "InternalError", "InvalidArgument", "Job", "JobError", "ModelInfo", "NotFound", "PermissionDenied", "Rank",
    "RerankResult", "ResourceExhausted", "RetryPolicy", "ServerInfo", "SieveClient", "SieveError", "Tokens",
    "Unauthenticated", "Unavailable", "Unimplemented",
]
