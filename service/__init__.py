"""The gRPC service: thin servicers over the embedder, store and workers; the token-budget batcher; interceptors
(request ids, metrics, API keys); health and reflection.

    server.py        create_server(settings) -> SieveServer (port bound); start / wait_ready / stop; run()
    state.py         what servicers share, and embedding through the batcher (prepare -> queue -> finish)
    batcher.py       the token-budget batcher: length-sorted windows, bounded queue, deadlines, failure isolation
    embed.py         Info, Embed, EmbedStream, Tokenize
    indexing.py      collections, Upsert / DeleteDocuments / GetJob / WatchJob, Search
    generation.py    Rerank, Answer, Search's rerank step: lazily loaded decoders, one lane (thread) per decoder
    models.py        the embedders a server holds, loaded once each
    auth.py          API keys, scopes, principals; create / revoke / list keys
    interceptors.py  request ids, metrics, authentication
    metrics.py       Prometheus metrics and their /metrics endpoint
    errors.py        domain errors -> gRPC status codes

The generated messages live in the SDK (`sieve_client._proto`), so server and client share one copy.
"""

from .server import SieveServer, create_server, run

__all__ = ["SieveServer", "create_server", "run"]
