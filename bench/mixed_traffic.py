"""Mixed traffic: short interactive calls while a bulk caller embeds big lists, Sieve vs Infinity.

An application backend embeds one query at a time while a batch job sends the same server its largest calls. What
the interactive callers see is the question: does a 1-text call wait behind a 1,024-text call?
  bulk         one caller sending --bulk-calls calls of --bulk-texts passages (6-60 words), back to back
  interactive  --interactive callers, each sending 1 query (6-12 words), sleeping --think s, again, until the bulk
               caller is done
Per system: the interactive latency alone (the same callers, no bulk traffic), then mixed: interactive p50 / p99 /
max, and the bulk caller's texts/s. The systems take turns for --rounds passes (medians of rates, percentiles over
all calls). Writes bench/results/NAME.json (+ .png).

    python bench/mixed_traffic.py [--threads 1] [--bulk-calls 3] [--bulk-texts 1024] [--interactive 4]
        [--think 0.1] [--rounds 2] [--name mixed-traffic]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, device_name, stop, write_results  # noqa: E402

from service import MODEL, ROOT, WORDS, _post_infinity, make_texts, start_infinity, start_sieve  # noqa: E402


def make_queries(n: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 12))) for _ in range(n)]


async def traffic(call, bulk: list[list[str]] | None, queries: list[str], interactive: int, think: float,
                  alone_calls: int) -> dict:
    """Interactive callers (and the bulk caller, when `bulk`) against one system -> latencies and rates."""
    latencies: list[float] = []
    bulk_latencies: list[float] = []
    done = asyncio.Event()
    counter = iter(range(10**9))

    async def user(i: int) -> None:
        calls = 0
        while not done.is_set() and (bulk is not None or calls < alone_calls):
            q = queries[(next(counter) + i) % len(queries)]
            t0 = time.perf_counter()
            await call([q])
            latencies.append(time.perf_counter() - t0)
            calls += 1
            await asyncio.sleep(think)

    async def batch_job() -> None:
        await asyncio.sleep(think)  # the interactive callers are already going
        for texts in bulk:
            t0 = time.perf_counter()
            await call(texts)
            bulk_latencies.append(time.perf_counter() - t0)
        done.set()

    start = time.perf_counter()
    jobs = [user(i) for i in range(interactive)] + ([batch_job()] if bulk is not None else [])
    await asyncio.gather(*jobs)
    seconds = time.perf_counter() - start
    out = {"latencies": latencies, "seconds": seconds}
    if bulk is not None:
        out["bulk_texts_per_s"] = sum(map(len, bulk)) / sum(bulk_latencies)
        out["bulk_call_s"] = bulk_latencies
    return out


def sieve_call(target: str):
    from sieve_client import AsyncSieveClient

    client = AsyncSieveClient(target, timeout=600)

    async def call(texts):
        return await client.embed(texts)

    return client, call


def infinity_call(url: str, model_id: str, pool: ThreadPoolExecutor):
    async def call(texts):
        return await asyncio.get_running_loop().run_in_executor(pool, _post_infinity, url, model_id, texts)

    return call


def percentiles(latencies: list[float]) -> dict:
    lat = sorted(latencies) or [float("nan")]
    return {"calls": len(latencies), "p50_ms": round(statistics.median(lat) * 1e3, 1),
            "p99_ms": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1e3, 1), "max_ms": round(lat[-1] * 1e3, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads of every system")
    ap.add_argument("--bulk-calls", type=int, default=3)
    ap.add_argument("--bulk-texts", type=int, default=1024, help="texts per bulk call (Sieve's per-call limit)")
    ap.add_argument("--interactive", type=int, default=4, help="interactive callers")
    ap.add_argument("--think", type=float, default=0.1, help="seconds an interactive caller waits between calls")
    ap.add_argument("--alone-calls", type=int, default=25, help="calls per interactive caller without bulk traffic")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--home", type=Path, default=ROOT / ".sieve_home" / "bench-service")
    ap.add_argument("--name", default="mixed-traffic")
    args = ap.parse_args()

    import torch

    from sieve.registry import resolve_embedder

    torch.set_num_threads(args.threads)  # only for the device line: the servers are separate processes
    model_path = resolve_embedder(MODEL)
    texts = make_texts(args.bulk_calls * args.bulk_texts, seed=2)
    bulk = [texts[i:i + args.bulk_texts] for i in range(0, len(texts), args.bulk_texts)]
    queries = make_queries(512)
    sieve_proc, target = start_sieve(args)
    infinity = start_infinity(args, model_path)
    pool = ThreadPoolExecutor(args.interactive + 1)
    systems = {"sieve-grpc": None}
    if infinity is not None:
        systems["infinity"] = infinity_call(infinity[1], str(model_path), pool)
    runs: dict[tuple[str, str], list[dict]] = {}
    try:
        async def one_round() -> None:
            client, call = sieve_call(target)
            systems["sieve-grpc"] = call
            async with client:
                for name, fn in systems.items():
                    await fn(["warm up"])
                    for phase, load in (("alone", None), ("mixed", bulk)):
                        r = await traffic(fn, load, queries, args.interactive, args.think, args.alone_calls)
                        runs.setdefault((name, phase), []).append(r)
                        p = percentiles(r["latencies"])
                        bulk_rate = f"  bulk {r['bulk_texts_per_s']:.1f} texts/s" if load else ""
                        print(f"{name:>10} {phase:>5}: interactive p50 {p['p50_ms']:>8.1f} ms  p99 {p['p99_ms']:>8.1f}"
                              f"  max {p['max_ms']:>8.1f} ({p['calls']} calls){bulk_rate}", flush=True)

        for _ in range(args.rounds):
            asyncio.run(one_round())
    finally:
        stop(sieve_proc)
        if infinity is not None:
            stop(infinity[0])
        pool.shutdown()
    rows = []
    for (name, phase), rs in runs.items():
        row = {"system": name, "model": MODEL, "phase": phase, "threads": args.threads, "rounds": len(rs),
               "interactive_callers": args.interactive, "think_s": args.think,
               **percentiles([x for r in rs for x in r["latencies"]])}
        if phase == "mixed":
            rates = [round(r["bulk_texts_per_s"], 1) for r in rs]
            row.update(bulk_calls=args.bulk_calls, bulk_texts=args.bulk_texts,
                       bulk_texts_per_s=statistics.median(rates), bulk_texts_per_s_rounds=rates)
        rows.append(row)
    if infinity is None:
        print("infinity: not installed; rows without it (`make peers`)")
    out = write_results(args.name, rows, device_name("cpu"))
    plot(rows, out.with_suffix(".png"))
    print(f"wrote {out}")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = list(dict.fromkeys(r["system"] for r in rows))
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.35
    for i, phase in enumerate(("alone", "mixed")):
        vals = [next((r["p99_ms"] for r in rows if r["system"] == s and r["phase"] == phase), 0) for s in systems]
        ax.bar([x + i * width for x in range(len(systems))], vals, width, label=f"p99, {phase}")
    ax.set_xticks([x + width / 2 for x in range(len(systems))], systems)
    ax.set_yscale("log")
    ax.set_ylabel("interactive call latency (ms)")
    ax.set_title("1-text calls beside a bulk caller")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    RESULTS.mkdir(parents=True, exist_ok=True)
    main()
