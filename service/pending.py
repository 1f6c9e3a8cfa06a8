"""Rerank and Answer: their messages are part of the v1 API now, their libraries land with later issues. Until
then both answer UNIMPLEMENTED with a message saying so (after the same auth checks they will have)."""

from __future__ import annotations

from sieve_client._proto import answer_pb2_grpc, rerank_pb2_grpc

from .auth import require
from .errors import invalid, rpc, rpc_stream, unimplemented


class RerankServicer(rerank_pb2_grpc.RerankServiceServicer):
    @rpc
    async def Rerank(self, request, context):
        require("rerank")
        if not request.query.strip():
            raise invalid("query", "empty; send the query the passages are ranked for")
        if not request.passages:
            raise invalid("passages", "empty; send at least one passage")
        raise unimplemented("Rerank", "the full-list reranker is not wired into the service yet")


class AnswerServicer(answer_pb2_grpc.AnswerServiceServicer):
    @rpc_stream
    async def Answer(self, request, context):
        if request.collection:
            require("search", request.collection)
        else:
            require("answer")
        if not request.question.strip():
            raise invalid("question", "empty; send the question to answer")
        if not request.collection and not request.passages:
            raise invalid("collection", "set a collection to retrieve from, or send passages")
        raise unimplemented("Answer", "REFRAG answering is not wired into the service yet")
        yield  # pragma: no cover - makes this an async generator, like the real one
