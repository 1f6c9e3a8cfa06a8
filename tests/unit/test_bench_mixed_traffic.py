"""bench/mixed_traffic.py's traffic driver against a fake server that serves one call at a time, in order."""

import asyncio

import pytest


@pytest.fixture
def mixed(bench_module):
    return bench_module("mixed_traffic")


class OneAtATime:
    """A server with no batching: calls are served in arrival order, 1 ms a text."""

    def __init__(self):
        self.lock = asyncio.Lock()
        self.sizes: list[int] = []

    async def __call__(self, texts):
        async with self.lock:
            self.sizes.append(len(texts))
            await asyncio.sleep(0.001 * len(texts))


def test_interactive_callers_run_until_the_bulk_caller_is_done(mixed):
    server = OneAtATime()
    r = asyncio.run(mixed.traffic(server, [["x"] * 200] * 2, ["q"], 3, 0.005, alone_calls=5))
    assert server.sizes.count(200) == 2
    assert len(r["latencies"]) == server.sizes.count(1) >= 3
    assert len(r["bulk_call_s"]) == 2 and r["bulk_texts_per_s"] == pytest.approx(400 / sum(r["bulk_call_s"]))
    # an interactive call queued behind a bulk call waits for it: this server's p99 shows it
    assert mixed.percentiles(r["latencies"])["max_ms"] >= 150


def test_alone_every_caller_makes_its_calls(mixed):
    server = OneAtATime()
    r = asyncio.run(mixed.traffic(server, None, ["q1", "q2"], 4, 0.0, alone_calls=6))
    assert server.sizes == [1] * 24 and len(r["latencies"]) == 24 and "bulk_texts_per_s" not in r
    p = mixed.percentiles(r["latencies"])
    assert p["calls"] == 24 and p["p50_ms"] <= p["p99_ms"] <= p["max_ms"]
