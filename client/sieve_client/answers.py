"""Streamed answers: `SieveClient.answer` returns an `AnswerStream`, `AsyncSieveClient.answer` an
`AsyncAnswerStream`. Iterate either for the answer's text pieces, in order, as the server generates them.

    stream = client.answer("who wrote it?", passages=["...", "..."])
    for piece in stream:
        print(piece, end="", flush=True)
    stream.citations     # the passages the answer draws on (there from the first piece on)
    stream.finish_reason # "eos" or "max_new_tokens", once the stream has ended
    stream.usage         # AnswerUsage: compressed vs full prompt size, tokens, time to first token

`cancel()` (or leaving a `with` block early) ends the call; the server stops generating within a token.
"""

from __future__ import annotations

import grpc

from .errors import from_rpc_error
from .results import AnswerUsage, Citation


class _State:
    def __init__(self, call):
        self._call = call
        self.citations: list[Citation] = []
        self.finish_reason = ""
        self.usage: AnswerUsage | None = None
        self.tokens = 0
        self.request_id = ""
        self.finished = False
        self.cancelled = False
        self._pieces: list[str] = []

    def _take(self, r) -> str:
        if r.citations:
            self.citations = [Citation(c.index, c.chunk_id, c.document_id, c.score, c.text) for c in r.citations]
        if r.finish_reason:
            self.finish_reason = r.finish_reason
            u = r.usage
            self.usage = AnswerUsage(u.prompt_positions, u.full_prompt_tokens, u.blocks, u.expanded_blocks,
                                     u.generated_tokens, u.precomputed_passages, u.time_to_first_token_ns / 1e9,
                                     u.model, u.block_size)
            self.tokens = r.metadata.tokens
            self.request_id = r.metadata.request_id
        if r.text:
            self._pieces.append(r.text)
        return r.text

    def _failed(self, e: grpc.RpcError):
        if self.cancelled and e.code() == grpc.StatusCode.CANCELLED:
            return None
        return from_rpc_error(e)

    @property
    def text(self) -> str:
        """Everything received so far (the whole answer once the stream has ended)."""
        return "".join(self._pieces)


class AnswerStream(_State):
    def __init__(self, call):
        super().__init__(call)
        self._gen = self._run()

    def _run(self):
        try:
            for r in self._call:
                piece = self._take(r)
                if piece:
                    yield piece
        except grpc.RpcError as e:
            error = self._failed(e)
            if error is not None:
                raise error from None
        finally:
            self.finished = True

    def __iter__(self):
        return self._gen

    def __next__(self) -> str:
        return next(self._gen)

    def read(self) -> str:
        """Wait for the whole answer and return it."""
        for _ in self:
            pass
        return self.text

    def cancel(self) -> None:
        """End the call now: the server stops generating."""
        self.cancelled = True
        self._call.cancel()

    def __enter__(self) -> AnswerStream:
        return self

    def __exit__(self, *exc) -> None:
        if not self.finished:
            self.cancel()


class AsyncAnswerStream(_State):
    def __init__(self, call):
        super().__init__(call)
        self._gen = self._run()

    async def _run(self):
        try:
            async for r in self._call:
                piece = self._take(r)
                if piece:
                    yield piece
        except grpc.RpcError as e:
            error = self._failed(e)
            if error is not None:
                raise error from None
        finally:
            self.finished = True

    def __aiter__(self):
        return self._gen

    async def __anext__(self) -> str:
        return await self._gen.__anext__()

    async def read(self) -> str:
        async for _ in self:
            pass
        return self.text

    def cancel(self) -> None:
        self.cancelled = True
        self._call.cancel()

    async def __aenter__(self) -> AsyncAnswerStream:
        return self

    async def __aexit__(self, *exc) -> None:
        if not self.finished:
            self.cancel()
