"""Answer streams that decode together (`refrag/batched.py`) on a tiny random backbone: the same tokens as alone,
while others join and leave; cancellation, closing, limits, deadlines and failures stay per call."""

from __future__ import annotations

import threading
import time

import pytest
from sieve.refrag import Answerer, BatchedDecoder, Busy

from . import test_refrag
from .test_refrag import text

backbone, refrag = test_refrag.backbone, test_refrag.refrag  # fixtures: the tiny backbone and its REFRAG model


QUESTIONS = [("which gene?", [text(10, 1), text(13, 2)]), ("cancer risk", [text(30, 3)]),
             ("blood level?", [text(7, 4), text(20, 5), text(9, 6)]), ("q?", [text(40, 7)])]


def _in_threads(fn, n):
    out, errors = [None] * n, []

    def run(i):
        try:
            out[i] = fn(i)
        except Exception as e:  # noqa: BLE001 - reported by the test
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return out


def _settles(decoder):
    """Every row has left (the decoder's thread may still be a statement behind the last consumer)."""
    deadline = time.monotonic() + 5
    while decoder.decoding and time.monotonic() < deadline:
        time.sleep(0.01)
    assert decoder.decoding == 0


def test_concurrent_streams_decode_together_and_answer_as_alone(refrag):
    alone = Answerer(refrag)
    want = []
    for q, passages in QUESTIONS:
        s = alone.stream(q, passages, k=4, expansion=0.5, max_new_tokens=16)
        list(s)
        want.append((s.token_ids, s.stats.stopped))
    decoder = BatchedDecoder(refrag.model, refrag.tokenizer.eos_ids, max_rows=4)
    batched = Answerer(refrag, decoder=decoder)
    start = threading.Barrier(len(QUESTIONS))

    def answer(i):
        q, passages = QUESTIONS[i]
        start.wait()
        s = batched.stream(q, passages, k=4, expansion=0.5, max_new_tokens=16)
        text_out = "".join(s)
        return s.token_ids, s.stats.stopped, text_out

    got = _in_threads(answer, len(QUESTIONS))
    assert [(ids, why) for ids, why, _ in got] == want
    assert all(t == refrag.tokenizer.decode(ids) for ids, _, t in got)
    assert decoder.widest >= 2  # they really shared steps
    _settles(decoder)
    assert decoder.waiting == 0 and len(decoder.batch) == 0
    decoder.close()


def test_a_cancelled_or_closed_stream_leaves_and_the_others_finish(refrag):
    decoder = BatchedDecoder(refrag.model, refrag.tokenizer.eos_ids, max_rows=4)
    answerer = Answerer(refrag, decoder=decoder)
    event = threading.Event()
    cancelled = answerer.stream("q?", [text(20, 1)], k=4, max_new_tokens=60, cancel=event)
    closed = answerer.stream("cancer risk", [text(20, 2)], k=4, max_new_tokens=60)
    full = answerer.stream("which gene?", [text(20, 3)], k=4, max_new_tokens=20)
    ids_closed = []

    def read_cancelled(_):
        at = None
        for _ in cancelled:
            if at is None:
                at = len(cancelled.token_ids)
                event.set()
        return at

    def read_closed(_):
        for _ in closed:
            if len(closed.token_ids) >= 3:
                ids_closed.append(len(closed.token_ids))
                closed.close()
                break

    results = _in_threads(lambda i: [read_cancelled, read_closed, lambda _: list(full)][i](i), 3)
    assert cancelled.stats.stopped == "cancelled" and len(cancelled.token_ids) == results[0] < 60
    assert closed.stats.stopped == "closed" and len(closed.token_ids) == ids_closed[0] < 60
    assert full.stats.stopped in ("eos", "max_new_tokens") and len(full.token_ids) <= 20
    _settles(decoder)  # the closed row leaves at the next step
    decoder.close()


def test_a_full_decoder_refuses_at_once(refrag):
    ticks = []  # the test runs the decoder's ticks itself
    decoder = BatchedDecoder(refrag.model, refrag.tokenizer.eos_ids, max_rows=1, max_waiting=0, submit=ticks.append)
    embeds = refrag.embed(refrag.qa_layout("q?", refrag.encode([text(8, 1)], 4)), ())
    waited = []
    first = decoder.decode(lambda: embeds, max_new_tokens=3, on_admit=waited.append)
    got = []
    reader = threading.Thread(target=lambda: got.extend(first))
    reader.start()
    while decoder.waiting != 1:
        time.sleep(0.001)
    time.sleep(0.05)
    ticks.pop(0)()  # admits the first call: the only row
    assert len(waited) == 1 and waited[0] >= 0.05  # told how long it waited for its row
    assert decoder.decoding == 1
    with pytest.raises(Busy, match="limit 0"):
        next(decoder.decode(lambda: embeds, max_new_tokens=3))
    while ticks:  # the first call decodes to its end
        ticks.pop(0)()
    reader.join(10)
    assert 1 <= len(got) <= 3 and decoder.decoding == 0


def test_a_late_call_times_out_and_a_broken_prompt_fails_alone(refrag):
    decoder = BatchedDecoder(refrag.model, refrag.tokenizer.eos_ids)
    embeds = refrag.embed(refrag.qa_layout("q?", refrag.encode([text(8, 1)], 4)), ())
    with pytest.raises(TimeoutError, match="deadline"):
        list(decoder.decode(lambda: embeds, max_new_tokens=5, deadline=time.monotonic() - 1))

    def broken():
        raise RuntimeError("this prompt breaks the model")

    def call(i):
        if i == 0:
            with pytest.raises(RuntimeError, match="breaks"):
                list(decoder.decode(broken, max_new_tokens=5))
            return None
        return list(decoder.decode(lambda: embeds, max_new_tokens=5))

    out = _in_threads(call, 2)
    assert 1 <= len(out[1]) <= 5  # the healthy call got its tokens
    decoder.close()


def test_closing_ends_waiting_and_decoding_calls_with_an_error(refrag):
    ticks = []
    decoder = BatchedDecoder(refrag.model, refrag.tokenizer.eos_ids, max_rows=1, submit=ticks.append)
    embeds = refrag.embed(refrag.qa_layout("q?", refrag.encode([text(8, 1)], 4)), ())
    errors = []

    def read(gen):
        try:
            list(gen)
        except RuntimeError as e:
            errors.append(str(e))

    readers = [threading.Thread(target=read, args=(decoder.decode(lambda: embeds, max_new_tokens=50),))
               for _ in range(2)]
    for r in readers:
        r.start()
    while decoder.waiting != 2:
        time.sleep(0.001)
    ticks.pop(0)()  # one call decodes, the other waits for the row
    assert decoder.decoding == 1 and decoder.waiting == 1
    decoder.close()
    for r in readers:
        r.join(10)
    assert len(errors) == 2 and all("shut down" in e for e in errors)
    with pytest.raises(RuntimeError, match="shut down"):
        next(decoder.decode(lambda: embeds, max_new_tokens=5))
