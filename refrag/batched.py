"""Answer streams that decode together: continuous batching for one REFRAG decoder.

`BatchedDecoder.decode(...)` is what `Answerer` runs in place of its one-stream loop when it has a batched decoder.
Each call waits for a row; the decoder runs in *ticks*, small jobs it hands to `submit` (by default its own thread;
the service hands them to the model's lane, so Rerank jobs on the same decoder run between ticks). A tick admits
waiting calls (each one's prompt prefilled alone, through `inputs_embeds`, then joined to the batch with its KV),
then runs one decoding step for every row (`backbone.batch_decode.DecodeBatch`). Tokens go to each call through a
queue; a row leaves at its end token, at its `max_new_tokens`, or when its caller cancels or stops reading, checked
before every step. A call that joins while others decode waits for one step, not for their whole answers.

Limits: at most `max_rows` rows decode at once; at most `max_waiting` calls wait for a row, one more gets `Busy` at
once; a call whose `deadline` (time.monotonic()) passes before it gets a row gets `TimeoutError`. A prefill that
fails fails its own call; a step that fails fails the rows of that step, and the decoder carries on.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from sieve.backbone.batch_decode import DecodeBatch
from sieve.backbone.generate import sample


class Busy(RuntimeError):
    """Every row is decoding and `max_waiting` calls already wait."""


@dataclass(eq=False)
class _Call:
    key: int
    embed: Callable[[], torch.Tensor]  # -> the prompt's inputs_embeds [1, T, dim], run on the decoder's thread
    max_new_tokens: int
    temperature: float
    cancel: threading.Event
    deadline: float | None
    on_admit: Callable[[float], None] | None = None  # told the seconds the call waited for a row
    queued: float = field(default_factory=time.perf_counter)
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)  # ("token", id) | ("end", why) | ("error", e)
    made: int = 0  # tokens generated
    next: int = 0  # the token the next step feeds
    gone: bool = False  # the consumer stopped reading

    @property
    def dead(self) -> bool:
        return self.gone or self.cancel.is_set()


class BatchedDecoder:
    def __init__(self, model, stop_tokens: Sequence[int], *, max_rows: int = 8, max_waiting: int = 16,
                 submit: Callable[[Callable[[], None]], object] | None = None):
        if max_rows < 1:
            raise ValueError("max_rows must be at least 1")
        self.model = model
        self.stop = set(stop_tokens)
        self.max_rows = max_rows
        self.max_waiting = max_waiting
        self._own = None if submit is not None else ThreadPoolExecutor(1, thread_name_prefix="sieve-answers")
        self._submit = submit or self._own.submit
        self._lock = threading.Lock()
        self._waiting: deque[_Call] = deque()
        self._rows: dict[int, _Call] = {}
        self._scheduled = False
        self._closed = False
        self._keys = itertools.count()
        self.batch = DecodeBatch(model)
        self.steps = 0  # batched steps run (for tests and metrics)
        self.widest = 0  # the most rows one step has run

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def decoding(self) -> int:
        return len(self._rows)

    def decode(self, embed: Callable[[], torch.Tensor], *, max_new_tokens: int, temperature: float = 0.0,
               cancel: threading.Event | None = None, deadline: float | None = None,
               on_admit: Callable[[float], None] | None = None) -> Generator[int, None, str]:
        """Yield the answer's token ids (not the end token) as the batch makes them; returns why it stopped:
        "eos", "max_new_tokens" or "cancelled". Raises Busy at once when the decoder is full. `on_admit(seconds)`:
        called when the call gets its row, with how long it waited."""
        call = _Call(next(self._keys), embed, max_new_tokens, temperature, cancel or threading.Event(), deadline,
                     on_admit)
        with self._lock:
            if self._closed:
                raise RuntimeError("the decoder is shut down")
            if len(self._rows) >= self.max_rows and len(self._waiting) >= self.max_waiting:
                raise Busy(f"{len(self._rows)} answers are decoding and {len(self._waiting)} wait (limit "
                           f"{self.max_waiting}); retry with backoff")
            self._waiting.append(call)
            self._schedule()
        try:
            while True:
                kind, value = call.out.get()
                if kind == "token":
                    if call.cancel.is_set():  # made before the decoder saw the event: not handed over
                        return "cancelled"
                    yield value
                elif kind == "end":
                    return value
                else:
                    raise value
        finally:
            call.gone = True  # stopped reading (done, closed or failed): its row leaves before the next step

    def close(self) -> None:
        """Refuse new calls and end every waiting or decoding one with an error (their readers never hang)."""
        with self._lock:
            self._closed = True
            calls = list(self._waiting) + list(self._rows.values())
            self._waiting.clear()
        for call in calls:
            call.out.put(("error", RuntimeError("the decoder shut down while this answer was in progress")))
        if self._own is not None:
            self._own.shutdown(wait=False, cancel_futures=True)

    # ---------------------------------------------------------------------------------------------- the ticks

    def _schedule(self) -> None:  # under the lock
        if not self._scheduled and not self._closed:
            self._scheduled = True
            try:
                self._submit(self._tick)
            except RuntimeError:  # the executor is shut down: nothing will decode these any more
                self._scheduled = False
                threading.Thread(target=self.close, daemon=True).start()  # close takes the lock we hold

    def _tick(self) -> None:
        if self._closed:
            return
        try:
            with torch.inference_mode():
                self._admit()
                self._step()
        finally:
            with self._lock:
                self._scheduled = False
                if self._waiting or self._rows:
                    self._schedule()

    def _admit(self) -> None:
        while len(self._rows) < self.max_rows:
            with self._lock:
                if not self._waiting:
                    return
                call = self._waiting.popleft()
            if call.dead:
                call.out.put(("end", "cancelled"))
                continue
            if call.deadline is not None and time.monotonic() >= call.deadline:
                call.out.put(("error", TimeoutError("the deadline passed while waiting for a decoder row")))
                continue
            if call.on_admit is not None:
                call.on_admit(time.perf_counter() - call.queued)
            try:
                self._prefill(call)
            except Exception as exc:  # this call's prompt broke the model: only this call fails
                call.out.put(("error", exc))

    def _prefill(self, call: _Call) -> None:
        from .answer import prefill_embeds

        embeds = call.embed()
        length = embeds.shape[1]
        _, logits = prefill_embeds(self.model, embeds, call.max_new_tokens)
        if self._emit(call, logits):
            kv = [(k[:1, :, :length], v[:1, :, :length]) for k, v in self.model.cache_tensors()]
            self.batch.join(call.key, kv, length, room=call.max_new_tokens - call.made)
            self._rows[call.key] = call

    def _emit(self, call: _Call, logits: torch.Tensor) -> bool:
        """Sample the call's next token from logits [1, V] and hand it over -> whether the call goes on."""
        token = int(sample(logits, temperature=call.temperature)[0])
        if token in self.stop:
            call.out.put(("end", "eos"))
            return False
        call.made += 1
        call.next = token
        call.out.put(("token", token))
        if call.made >= call.max_new_tokens:
            call.out.put(("end", "max_new_tokens"))
            return False
        return True

    def _step(self) -> None:
        dead = [k for k in self.batch.keys if self._rows[k].dead]
        for k in dead:
            self._rows.pop(k).out.put(("end", "cancelled"))
        self.batch.leave(dead)
        if not len(self.batch):
            return
        keys = list(self.batch.keys)
        try:
            logits = self.batch.step(torch.tensor([self._rows[k].next for k in keys]))
            self.steps += 1
            self.widest = max(self.widest, len(keys))
            done = [k for i, k in enumerate(keys) if not self._emit(self._rows[k], logits[i:i + 1])]
        except Exception as exc:  # the step's rows fail; the decoder stays usable
            for k in keys:
                self._rows.pop(k).out.put(("error", exc))
            self.batch.leave(keys)
            return
        for k in done:
            del self._rows[k]
        self.batch.leave(done)
