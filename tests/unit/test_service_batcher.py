"""The token-budget batcher with a fake model: merging, budget, order, admission, deadlines, cancellation,
failure isolation."""

from __future__ import annotations

import asyncio
import threading

import grpc
import numpy as np
import pytest
from sieve.service.batcher import Batcher
from sieve.service.errors import Expired, QueueFull, ServiceError
from sieve.service.metrics import Metrics

POISON = 666


class FakeModel:
    """vector of a text = [length, first id, sum of ids]; can be held (to let a queue build) or poisoned."""

    def __init__(self):
        self.batches: list[list[list[int]]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def __call__(self, group, items):
        self.entered.set()
        self.gate.wait(10)
        ids = [i for i, _ in items]
        self.batches.append(ids)
        if any(POISON in i for i in ids):
            raise RuntimeError("poisoned input")
        return np.array([[len(i), i[0], sum(i)] for i in ids], dtype=np.float32)

    def seen(self) -> set[int]:
        return {i[0] for b in self.batches for i in b}


def items(*lengths_and_first):
    return [([first] + [1] * (length - 1), [1] * length) for length, first in lengths_and_first]


def run(coro):
    return asyncio.run(coro)


async def _with_batcher(model, fn, **kw):
    kw.setdefault("max_batch_tokens", 1000)
    kw.setdefault("max_queued_texts", 100)
    b = Batcher(runner=model, **kw)
    b.start()
    try:
        return await fn(b)
    finally:
        model.gate.set()
        await b.close()


async def _behind_a_busy_model(model, b, queue):
    """Hold the model on a one-token call while `queue()` submits calls (-> their futures), then let it go: the
    queued calls meet in the batcher. -> their outcomes, in order."""
    model.gate.clear()
    blocker = asyncio.ensure_future(b.submit("g", items((1, 1))))
    await asyncio.to_thread(model.entered.wait, 5)
    futures = queue()
    await asyncio.sleep(0.05)
    model.gate.set()
    await blocker
    return await asyncio.gather(*futures)


def test_concurrent_calls_merge_into_one_forward_and_keep_order():
    model = FakeModel()
    metrics = Metrics()

    async def go(b):
        model.gate.clear()
        first = asyncio.ensure_future(b.submit("g", items((4, 100))))
        await asyncio.to_thread(model.entered.wait, 5)  # the model is busy with `first`: the rest queue up
        rest = [asyncio.ensure_future(b.submit("g", items((3, 200 + k), (5, 300 + k)))) for k in range(10)]
        await asyncio.sleep(0.05)
        model.gate.set()
        return await first, await asyncio.gather(*rest)

    first, rest = run(_with_batcher(model, go, metrics=metrics))
    assert first.vectors[0].tolist() == [4, 100, 103]
    for k, out in enumerate(rest):  # each call gets its own texts back, in its order
        assert out.vectors[:, :2].tolist() == [[3, 200 + k], [5, 300 + k]]
        assert out.tokens == 8
    assert len(model.batches) == 2, model.batches  # 10 calls, one forward
    assert len(model.batches[1]) == 20
    text = metrics.text()
    assert "sieve_batch_requests_bucket{le=\"16.0\"} 2.0" in text  # the 10-call batch is in the <=16 bucket
    assert "sieve_batch_requests_count 2.0" in text


def test_batches_respect_the_token_budget_and_group_similar_lengths():
    model = FakeModel()
    lengths = [3, 50, 4, 48, 5, 52, 3, 49, 6, 51, 200]

    async def go(b):
        return await _behind_a_busy_model(model, b, lambda: [
            asyncio.ensure_future(b.submit("g", items(*[(n, 10 + i) for i, n in enumerate(lengths)])))])

    (out,) = run(_with_batcher(model, go, max_batch_tokens=110))
    assert out.vectors[:, 0].tolist() == lengths  # all back, in order
    for batch in model.batches[1:]:
        longest = max(len(i) for i in batch)
        assert len(batch) == 1 or len(batch) * longest <= 110, batch
    # short texts went together, long ones together: no batch mixes a <=6 text with a >=48 one
    for batch in model.batches[1:]:
        lens = [len(i) for i in batch]
        assert not (min(lens) <= 6 and max(lens) >= 48), lens
    assert [len(b) for b in model.batches[1:]].count(1) >= 1  # the 200-token text ran alone (over the budget)


def test_a_gathered_batch_of_mixed_lengths_runs_as_forwards_of_similar_lengths():
    model = FakeModel()
    metrics = Metrics()

    async def go(b):
        def queue():
            calls = [asyncio.ensure_future(b.submit("g", items((4, 100 + k), (300, 200 + k)))) for k in range(2)]
            return calls + [asyncio.ensure_future(b.submit("g", items((5, 300 + k)))) for k in range(8)]

        return await _behind_a_busy_model(model, b, queue)

    outs = run(_with_batcher(model, go, max_batch_tokens=4000, metrics=metrics))
    for k in range(2):  # a call whose texts ran in two forwards gets both back, in its order
        assert outs[k].vectors[:, :2].tolist() == [[4, 100 + k], [300, 200 + k]]
    for k in range(8):
        assert outs[2 + k].vectors[:, :2].tolist() == [[5, 300 + k]]
    # all 12 fit the budget together (12 x 300 <= 4000) but would be 3,600 positions, mostly padding: the short
    # ones run together, the long ones together
    assert sorted(sorted(len(i) for i in batch) for batch in model.batches[1:]) == [[4, 4] + [5] * 8, [300, 300]]
    text = metrics.text()
    assert "sieve_batch_slots_total 651.0" in text and "sieve_batch_tokens_total 649.0" in text  # 10 x 5 + 2 x 300


def test_calls_leave_in_arrival_order_under_load():
    """A queue of many calls, each with texts of mixed lengths, several batches deep: calls finish in the order
    they came, up to the calls of one batch (8 forwards' worth of tokens), which finish as their forwards do. A
    later call's short texts never overtake an earlier call by more than that, and every forward fits the
    budget."""
    import random

    model = FakeModel()
    rng = random.Random(0)
    calls = [[(rng.randint(2, 30), 1000 * c + j) for j in range(4)] for c in range(60)]  # each under its share
    finished: list[int] = []

    async def go(b):
        def queue():
            futures = []
            for c, texts in enumerate(calls):
                f = asyncio.ensure_future(b.submit("g", items(*texts)))
                f.add_done_callback(lambda _, c=c: finished.append(c))
                futures.append(f)
            return futures

        return await _behind_a_busy_model(model, b, queue)

    outs = run(_with_batcher(model, go, max_batch_tokens=120, max_queued_texts=1000))
    for texts, out in zip(calls, outs, strict=True):
        assert out.vectors[:, :2].tolist() == [[n, first] for n, first in texts]
    assert sorted(finished) == list(range(60))
    sizes = [sum(n for n, _ in texts) for texts in calls]
    per_batch = max(j - i for i in range(60) for j in range(i, 61) if sum(sizes[i:j]) <= 8 * 120)
    for place, c in enumerate(finished):
        assert abs(place - c) < per_batch, (place, c, per_batch, finished)
    assert sum(sizes) > 3 * 8 * 120  # several batches' worth queued
    for batch in model.batches[1:]:
        assert len(batch) * max(len(i) for i in batch) <= 120, batch


def test_a_short_call_behind_a_long_one_rides_in_the_next_batch():
    """A 1-text call that arrives after a 300-text call gets its share of the next batch and comes back after that
    batch's first forwards, long before the big call (which still gets its vectors in order)."""
    model = FakeModel()
    finished: list[str] = []

    async def go(b):
        def queue():
            big = asyncio.ensure_future(b.submit("g", items(*[(10, k) for k in range(300)])))
            big.add_done_callback(lambda _: finished.append("big"))
            small = asyncio.ensure_future(b.submit("g", items((3, 7777))))
            small.add_done_callback(lambda _: finished.append("small"))
            return [big, small]

        return await _behind_a_busy_model(model, b, queue)

    big, small = run(_with_batcher(model, go, max_batch_tokens=100, max_queued_texts=1000))
    assert finished == ["small", "big"]
    assert small.vectors[:, :2].tolist() == [[3, 7777]]
    assert big.vectors[:, 1].tolist() == list(range(300))
    forward = next(i for i, batch in enumerate(model.batches) if [3] + [1] * 2 == batch[0] or
                   any(ids[0] == 7777 for ids in batch))
    assert forward <= 2, forward  # the blocker's forward, then the big call's share (10 x 10 tokens), or with it
    assert len(model.batches) >= 1 + 300 // 10  # the big call ran in forwards of the budget after it


def test_a_call_arriving_mid_batch_interrupts_a_big_calls_forwards():
    """A batch of one big call's texts (8 forwards) is running when a 1-text call arrives: the batch stops after
    its current forward, the newcomer runs next, and the big call's other texts follow, none lost or repeated."""
    import time

    class SlowModel(FakeModel):
        def __call__(self, group, items):
            time.sleep(0.02)
            out = super().__call__(group, items)
            if len(self.batches) == 2:
                third.set()  # the model is about to run the batch's third forward
            return out

    model = SlowModel()
    third = threading.Event()

    async def go(b):
        big = asyncio.ensure_future(b.submit("g", items(*[(10, k) for k in range(160)])))
        await asyncio.to_thread(third.wait, 5)
        small = await b.submit("g", items((3, 7777)))
        done_after = len(model.batches)
        return await big, small, done_after

    big, small, forwards_when_small_done = run(_with_batcher(model, go, max_batch_tokens=100, max_queued_texts=1000))
    assert small.vectors[:, :2].tolist() == [[3, 7777]]
    assert big.vectors[:, 1].tolist() == list(range(160))
    at = next(i for i, batch in enumerate(model.batches) if any(ids[0] == 7777 for ids in batch))
    assert at <= 4, at  # forwards 0-1 ran, 2 was running or about to: one gather would run to forward 7
    assert forwards_when_small_done <= 5
    ran = sorted(ids[0] for batch in model.batches for ids in batch if ids[0] != 7777)
    assert ran == list(range(160))  # every text of the big call ran exactly once


def test_texts_handed_back_by_an_interrupted_batch_count_only_for_live_calls():
    """An interrupted batch's unrun texts go back to the queue, except those of a call that ended meanwhile (the
    caller left): they would count as queued, and the queue refuse calls early, until it next emptied."""
    from sieve.service.batcher import _Call, _Text

    async def go():
        b = Batcher(runner=FakeModel(), max_batch_tokens=100, max_queued_texts=10)
        loop = asyncio.get_running_loop()
        live, gone = (_Call(loop.create_future(), 1, None, 0.0, waiting=0) for _ in range(2))
        gone.future.cancel()
        b._requeue("g", [_Text(gone, 0, ([1, 1], [1, 1]), 0), _Text(live, 0, ([2, 1], [1, 1]), 1)])
        return b.queued, live.waiting, gone.waiting, [t.call is live for t in b._pending["g"]]

    assert run(go()) == (1, 1, 0, [True])


def test_groups_never_share_a_forward():
    model = FakeModel()

    async def go(b):
        return await asyncio.gather(b.submit("a", items((3, 1))), b.submit("b", items((3, 2))))

    run(_with_batcher(model, go))
    assert sorted(b[0][0] for b in model.batches) == [1, 2] and len(model.batches) == 2


def test_full_queue_refuses_unary_at_once_and_streams_wait():
    model = FakeModel()
    metrics = Metrics()

    async def go(b):
        model.gate.clear()
        first = asyncio.ensure_future(b.submit("g", items((2, 1))))
        await asyncio.to_thread(model.entered.wait, 5)
        queued = asyncio.ensure_future(b.submit("g", items((2, 2), (2, 3), (2, 4))))  # fills the queue (3)
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFull, match="busy"):
            await b.submit("g", items((2, 5)))
        waiting = asyncio.ensure_future(b.submit("g", items((2, 6)), wait=True))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        model.gate.set()
        return await first, await queued, await waiting

    _, queued, waiting = run(_with_batcher(model, go, max_queued_texts=3, metrics=metrics))
    assert queued.vectors[:, 1].tolist() == [2, 3, 4] and waiting.vectors[0, 1] == 6
    assert 5 not in model.seen()
    assert "sieve_queue_rejected_total 1.0" in metrics.text()


def test_expired_and_cancelled_work_never_reaches_the_model():
    model = FakeModel()

    async def go(b):
        model.gate.clear()
        first = asyncio.ensure_future(b.submit("g", items((2, 1))))
        await asyncio.to_thread(model.entered.wait, 5)
        expiring = asyncio.ensure_future(b.submit("g", items((2, 7), (2, 8)), timeout=0.02))
        leaving = asyncio.ensure_future(b.submit("g", items((2, 9))))
        staying = asyncio.ensure_future(b.submit("g", items((2, 10))))
        await asyncio.sleep(0.05)  # the deadline passes while the model is busy
        leaving.cancel()
        await asyncio.sleep(0)
        assert b.queued == 3  # the cancelled caller's text left the queue at once
        model.gate.set()
        await first
        with pytest.raises(Expired):
            await expiring
        return await staying

    staying = run(_with_batcher(model, go))
    assert staying.vectors[0, 1] == 10
    assert model.seen().isdisjoint({7, 8, 9})


def test_a_failing_call_does_not_fail_its_batch_mates_or_the_loop():
    model = FakeModel()

    async def go(b):
        model.gate.clear()
        first = asyncio.ensure_future(b.submit("g", items((2, 1))))
        await asyncio.to_thread(model.entered.wait, 5)
        good = [asyncio.ensure_future(b.submit("g", items((3, 20 + k)))) for k in range(3)]
        bad = asyncio.ensure_future(b.submit("g", items((3, POISON))))
        await asyncio.sleep(0.02)
        model.gate.set()
        await first
        results = await asyncio.gather(*good)
        with pytest.raises(ServiceError) as e:
            await bad
        after = await b.submit("g", items((2, 30)))  # the loop still runs
        return results, e.value, after

    results, error, after = run(_with_batcher(model, go))
    assert [r.vectors[0, 1] for r in results] == [20, 21, 22]
    assert error.code == grpc.StatusCode.INTERNAL and "model failed" in error.message
    assert after.vectors[0, 1] == 30
    assert any(len(b) == 4 for b in model.batches)  # they really were batched together first


def test_a_forward_failing_after_others_ran_reruns_only_the_texts_without_vectors():
    """Forwards hand their vectors over as they finish, so when a later forward of the batch fails, a call whose
    short text already came back reruns only its long text, and gets both vectors once."""
    model = FakeModel()

    async def go(b):
        async def settle(futures):  # the poisoned call's error as a value
            return await asyncio.gather(*futures, return_exceptions=True)

        def queue():
            return [settle([asyncio.ensure_future(b.submit("g", items((300, 1), (4, 2)))),
                            asyncio.ensure_future(b.submit("g", items((290, POISON))))])]

        (good, bad), = await _behind_a_busy_model(model, b, queue)
        return good, bad

    good, bad = run(_with_batcher(model, go, max_batch_tokens=4000))
    assert isinstance(bad, ServiceError) and bad.code == grpc.StatusCode.INTERNAL
    assert good.vectors[:, :2].tolist() == [[300, 1], [4, 2]]
    firsts = [[ids[0] for ids in batch] for batch in model.batches[1:]]
    assert firsts[0] == [2]  # the short forward ran first and delivered
    assert firsts.count([2]) == 1 and [1] in firsts  # rerun: the long text alone, the short one not again


def test_closing_refuses_new_work():
    model = FakeModel()

    async def go():
        b = Batcher(runner=model, max_batch_tokens=100, max_queued_texts=10)
        b.start()
        out = await b.submit("g", items((2, 1)))
        await b.close()
        with pytest.raises(ServiceError) as e:
            await b.submit("g", items((2, 2)))
        return out, e.value

    out, error = run(go())
    assert out.vectors[0, 1] == 1 and error.code == grpc.StatusCode.UNAVAILABLE
