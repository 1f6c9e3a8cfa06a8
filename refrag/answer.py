"""The answer loop: question + passages -> compressed prompt -> prefill through `inputs_embeds` -> streamed text.

`Answerer.stream(...)` validates everything at once (ValueError with a message a person can act on) and returns an
`AnswerStream`: iterate it for text pieces in order; it tells which passages were used and which blocks were
expanded. Generation is lazy: it runs only while the consumer reads, so a consumer that stops (break, `close()`)
stops it, and so does `cancel()` or a set `cancel` event, checked before every decoding step.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from sieve.backbone.generate import DecodeCursor, sample

from .batched import BatchedDecoder
from .encoder import MAX_K, EncodedPassage
from .model import Refrag

MAX_PASSAGES = 200
MAX_QUESTION_TOKENS = 512


@dataclass
class AnswerStats:
    prompt_positions: int = 0  # decoder positions of the compressed prompt
    full_prompt_tokens: int = 0  # the same prompt with every block as tokens
    blocks: int = 0
    expanded: int = 0
    generated_tokens: int = 0
    ttft_s: float | None = None  # call to first text piece
    queue_s: float = 0.0  # waiting for a row of the batched decoder (included in ttft_s)
    seconds: float = 0.0
    stopped: str = ""  # "eos", "max_new_tokens", "cancelled", "closed"


@dataclass
class AnswerStream:
    """Iterate for the answer's text pieces. `passages`: indices (into the caller's list) of the passages in the
    prompt, in order; `expanded`: (passage index, block index) of the blocks fed as tokens."""

    passages: list[int]
    expanded: list[tuple[int, int]]
    stats: AnswerStats
    _pieces: Iterator[str] = field(repr=False)
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False)
    token_ids: list[int] = field(default_factory=list)

    def __iter__(self) -> Iterator[str]:
        return self._pieces

    def __next__(self) -> str:
        return next(self._pieces)

    def cancel(self) -> None:
        self._cancel.set()

    def close(self) -> None:
        self._pieces.close()

    @property
    def text(self) -> str:
        """Everything generated so far (drain the stream first for the whole answer)."""
        return "".join(self._seen)

    _seen: list[str] = field(default_factory=list, repr=False)


def prefill_embeds(model, embeds: torch.Tensor, max_new_tokens: int) -> tuple[DecodeCursor, torch.Tensor]:
    """Run the prompt `embeds` [1, T, dim] (a compressed layout) through the decoder -> (a cursor whose KV cache
    holds it with room for max_new_tokens more, the logits at its last position [1, vocab])."""
    t = embeds.shape[1]
    cursor = DecodeCursor.start(model, torch.ones((1, t), dtype=torch.long, device=embeds.device), t + max_new_tokens)
    last = torch.tensor([t - 1], device=embeds.device)
    return cursor, model(inputs_embeds=embeds, input_pos=0, return_hidden=False, logits_at=last).logits[:, -1]


class Answerer:
    def __init__(self, refrag: Refrag, *, max_passages: int = MAX_PASSAGES, decoder: BatchedDecoder | None = None):
        """decoder: a `BatchedDecoder` on refrag.model, so several streams decode together; None: one stream at
        a time on the model's own KV cache (a second concurrent stream gets RuntimeError)."""
        self.refrag = refrag
        self.max_passages = max_passages
        self.decoder = decoder
        self._busy = threading.Lock()  # the decoder has one KV cache: one stream decodes at a time

    def stream(self, question: str, passages: Sequence[str | EncodedPassage], *, k: int | None = None,
               expansion: float | None = None, policy: str | None = None, max_new_tokens: int = 128,
               temperature: float = 0.0, cancel: threading.Event | None = None,
               deadline: float | None = None) -> AnswerStream:
        """Start answering `question` from `passages` (texts, or encodings precomputed at index time with the same
        k). expansion: fraction of blocks fed as full tokens (0: all compressed, 1: the full-context prompt), picked
        by `policy`; None: the model's defaults (`refrag.expansion` / `refrag.policy`, from its refrag.json).
        deadline (time.monotonic()): with a batched decoder, the call fails with TimeoutError if it has not got a
        row by then."""
        t0 = time.perf_counter()
        r = self.refrag
        k = r.k if k is None else k
        expansion = r.expansion if expansion is None else expansion
        policy = r.policy if policy is None else policy
        if not isinstance(question, str) or not question.strip():
            raise ValueError("the question is empty")
        if not passages:
            raise ValueError("no passages: give at least one passage to answer from")
        if len(passages) > self.max_passages:
            raise ValueError(f"{len(passages)} passages is more than the limit of {self.max_passages}")
        if not 1 <= k <= MAX_K:
            raise ValueError(f"k={k} is not a block size between 1 and {MAX_K} (trained: {r.k})")
        if not 0.0 <= expansion <= 1.0:
            raise ValueError(f"expansion must be a fraction between 0 and 1, got {expansion}")
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        for i, p in enumerate(passages):
            if isinstance(p, str) and not p.strip():
                raise ValueError(f"passage {i} is empty")
            if isinstance(p, EncodedPassage) and p.k != k:
                raise ValueError(f"passage {i} was encoded with k={p.k}, asked for k={k}")
            if isinstance(p, EncodedPassage) and p.encoder != r.blocks.fingerprint:
                raise ValueError(f"passage {i} was encoded by {p.encoder}, this model uses {r.blocks.fingerprint}; "
                                 "re-encode it")
        q_tokens = len(r.tokenizer.encode(question, add_bos=False))
        if q_tokens > MAX_QUESTION_TOKENS:
            raise ValueError(f"the question is {q_tokens} tokens; the limit is {MAX_QUESTION_TOKENS}")

        texts = [(i, p) for i, p in enumerate(passages) if isinstance(p, str)]
        encoded: list[EncodedPassage | None] = [p if isinstance(p, EncodedPassage) else None for p in passages]
        for (i, _), e in zip(texts, r.encode([t for _, t in texts], k)):
            encoded[i] = e
        layout = r.qa_layout(question, encoded)
        blocks = layout.blocks
        query = r.blocks.encode_query(question) if 0 < expansion < 1 else None
        expand = r.choose_expansion(layout, expansion, query=query, policy=policy)
        positions = layout.n_positions(expand)
        limit = r.model.args.max_seq_len
        if positions + max_new_tokens > limit:
            raise ValueError(f"the prompt takes {positions} decoder positions (k={k}, expansion={expansion}) and "
                             f"{max_new_tokens} new tokens were asked for: more than the model's {limit}-token "
                             "context; give fewer or shorter passages, a larger k, or less expansion")
        stats = AnswerStats(prompt_positions=positions, full_prompt_tokens=len(layout.full_ids()),
                            blocks=len(blocks), expanded=len(expand))
        out = AnswerStream(passages=list(layout.passages),
                           expanded=sorted((blocks[b].passage, blocks[b].block) for b in expand), stats=stats,
                           _pieces=iter(()))
        if cancel is not None:
            out._cancel = cancel
        out._pieces = self._generate(layout, expand, out, max_new_tokens, temperature, t0, deadline)
        return out

    def _generate(self, layout, expand, out: AnswerStream, max_new_tokens: int, temperature: float,
                  t0: float, deadline: float | None) -> Iterator[str]:
        tokenizer = self.refrag.tokenizer
        ids = self._token_ids(layout, expand, out, max_new_tokens, temperature, deadline)
        try:
            for piece in tokenizer.stream_decode(ids):
                if out.stats.ttft_s is None:
                    out.stats.ttft_s = time.perf_counter() - t0
                out._seen.append(piece)
                yield piece
        finally:
            ids.close()
            out.stats.seconds = time.perf_counter() - t0
            out.stats.stopped = out.stats.stopped or "closed"

    @torch.inference_mode()  # as a decorator: torch switches the mode around each step of the generator only
    def _token_ids(self, layout, expand, out: AnswerStream, max_new_tokens: int, temperature: float,
                   deadline: float | None) -> Iterator[int]:
        if out._cancel.is_set():
            out.stats.stopped = "cancelled"
            return
        if self.decoder is not None:
            ids = self.decoder.decode(lambda: self.refrag.embed(layout, expand), max_new_tokens=max_new_tokens,
                                      temperature=temperature, cancel=out._cancel, deadline=deadline,
                                      on_admit=lambda s: setattr(out.stats, "queue_s", s))
        elif not self._busy.acquire(blocking=False):
            raise RuntimeError("another answer is streaming on this model (one KV cache); finish or close it first")
        else:
            ids = self._decode(layout, expand, out._cancel, max_new_tokens, temperature)
        try:
            while True:
                try:
                    tid = next(ids)
                except StopIteration as stop:
                    out.stats.stopped = stop.value
                    return
                out.token_ids.append(tid)
                out.stats.generated_tokens += 1
                yield tid
        finally:
            ids.close()
            if self.decoder is None:
                self._busy.release()

    def _decode(self, layout, expand, cancel: threading.Event, max_new_tokens: int,
                temperature: float) -> Generator[int, None, str]:
        """One stream on the model's own KV cache: token ids, then why it stopped."""
        r = self.refrag
        stop = set(r.tokenizer.eos_ids)
        cursor, logits = prefill_embeds(r.model, r.embed(layout, expand), max_new_tokens)
        for i in range(max_new_tokens):
            token = sample(logits, temperature=temperature)
            tid = int(token[0])
            if tid in stop:
                return "eos"
            yield tid
            if cancel.is_set():
                return "cancelled"
            if i == max_new_tokens - 1:
                return "max_new_tokens"
            logits = cursor.step(token)

    def answer(self, question: str, passages: Sequence[str | EncodedPassage], **options) -> str:
        """The whole answer as one string."""
        return "".join(self.stream(question, passages, **options))
