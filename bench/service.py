"""Serving overhead and batching: Sieve over gRPC vs in-process `Embedder.encode` (vs Infinity, if installed).

The same all-MiniLM-L6-v2 weights and the same texts for every system, at 1, 8 and 64 concurrent callers:
  sieve-grpc     a real `python -m sieve.service` process (no worker), AsyncSieveClient callers on loopback;
                 calls from all callers are merged by the server's token-budget batcher
  in-process     caller threads sharing one Embedder in this process, one `encode` at a time (a lock, as one
                 model allows), no merging across callers: what an application without a server does
  infinity       `infinity_emb v2` from .peers/infinity (its own venv, git-ignored), OpenAI-style /embeddings
                 over HTTP on loopback; skipped when not installed (`make peers` installs it)
Rows: texts/s (the median of --rounds passes, the systems taking turns), p50/p99 latency per call (over all
passes), and each server's agreement with the in-process vectors (the lowest cosine over 16 texts: the systems
must embed alike for the speed comparison to count). Writes bench/results/NAME.json (+ .png).

    python bench/service.py [--threads 2] [--requests 256] [--texts-per-request 4] [--concurrency 1,8,64]
        [--rounds 3] [--name service]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, device_name, free_port, plot_by_concurrency, start_server, stop, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = "all-minilm-l6-v2"
INFINITY = ROOT / ".peers" / "infinity" / "bin" / "infinity_emb"
WORDS = ("retrieval model query document vector index search rank answer token batch server latency throughput "
         "protein cell gene patient study result method data network energy water climate market policy").split()


def make_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 60))) for _ in range(n)]


@dataclass
class Run:
    """One pass of all requests through one system at one concurrency."""

    latencies: list[float]
    texts: int
    seconds: float
    errors: int


def summary(system: str, concurrency: int, runs: list[Run], args) -> dict:
    """One row from a system's rounds: the median round's texts/s (each round's too), latency percentiles over the
    calls of every round."""
    lat = sorted(x for r in runs for x in r.latencies) or [float("nan")]
    rates = [round(r.texts / r.seconds, 1) for r in runs]
    return {"system": system, "model": MODEL, "concurrency": concurrency, "texts_per_request": args.texts_per_request,
            "requests": len(lat), "rounds": len(runs), "errors": sum(r.errors for r in runs),
            "texts_per_s": statistics.median(rates), "texts_per_s_rounds": rates,
            "p50_ms": round(statistics.median(lat) * 1e3, 2),
            "p99_ms": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1e3, 2), "threads": args.threads}


# -- systems -------------------------------------------------------------------------------------------------


def run_in_process(embedder, requests: list[list[str]], concurrency: int) -> Run:
    lock = threading.Lock()

    def one(texts):
        t0 = time.perf_counter()
        with lock:
            embedder.encode(texts)
        return time.perf_counter() - t0

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = list(pool.map(one, requests))
    return Run(latencies, sum(map(len, requests)), time.perf_counter() - start, 0)


async def _drive(call, requests: list[list[str]], concurrency: int) -> tuple[list[float], int, float]:
    queue = list(reversed(requests))
    latencies: list[float] = []
    errors = 0

    async def worker():
        nonlocal errors
        while queue:
            texts = queue.pop()
            t0 = time.perf_counter()
            try:
                await call(texts)
                latencies.append(time.perf_counter() - t0)
            except Exception:
                errors += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, errors, time.perf_counter() - start


def start_sieve(args) -> tuple[subprocess.Popen, str]:
    return start_server({"SIEVE_EMBEDDER": MODEL, "SIEVE_THREADS": str(args.threads), "SIEVE_LOG_LEVEL": "WARNING",
                         "SIEVE_HOME": str(args.home), "SIEVE_MAX_QUEUED_TEXTS": "100000",
                         "SIEVE_METRICS_PORT": "-1"})


def sieve_vectors(target: str, texts: list[str]) -> list[list[float]]:
    from sieve_client import AsyncSieveClient

    async def go():
        async with AsyncSieveClient(target) as c:
            return (await c.embed(texts)).vectors

    return asyncio.run(go())


def run_sieve(target: str, requests: list[list[str]], concurrency: int) -> Run:
    from sieve_client import AsyncSieveClient

    async def go():
        async with AsyncSieveClient(target) as c:
            await c.embed(["warm up"])
            return await _drive(c.embed, requests, concurrency)

    latencies, errors, seconds = asyncio.run(go())
    return Run(latencies, sum(map(len, requests)), seconds, errors)


def start_infinity(args, model_path: Path) -> tuple[subprocess.Popen, str] | None:
    if not INFINITY.exists():
        return None
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    proc = subprocess.Popen([str(INFINITY), "v2", "--model-id", str(model_path), "--port", str(port),
                             "--host", "127.0.0.1", "--engine", "torch", "--device", "cpu"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import urllib.request

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc, f"http://127.0.0.1:{port}"
        except Exception:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("infinity did not start within 300 s")


def _post_infinity(url: str, model_id: str, texts: list[str]) -> dict:
    import json
    import urllib.request

    body = json.dumps({"model": model_id, "input": texts}).encode()
    req = urllib.request.Request(f"{url}/embeddings", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def infinity_vectors(url: str, model_id: str, texts: list[str]) -> list[list[float]]:
    return [d["embedding"] for d in sorted(_post_infinity(url, model_id, texts)["data"], key=lambda d: d["index"])]


def lowest_cosine(a, b) -> float:
    """The lowest cosine between row i of a and row i of b."""
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    return round(float((a * b).sum(1).min()), 6)


def run_infinity(url: str, model_id: str, requests: list[list[str]], concurrency: int) -> Run:
    pool = ThreadPoolExecutor(concurrency)

    async def call(texts):
        return await asyncio.get_running_loop().run_in_executor(pool, _post_infinity, url, model_id, texts)

    latencies, errors, seconds = asyncio.run(_drive(call, requests, concurrency))
    pool.shutdown()
    return Run(latencies, sum(map(len, requests)), seconds, errors)


# -- main ----------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="torch threads of every system")
    ap.add_argument("--requests", type=int, default=256, help="calls per system and concurrency")
    ap.add_argument("--texts-per-request", type=int, default=4)
    ap.add_argument("--concurrency", default="1,8,64")
    ap.add_argument("--rounds", type=int, default=3, help="passes per system and level, taking turns (median kept)")
    ap.add_argument("--home", type=Path, default=ROOT / ".sieve_home" / "bench-service")
    ap.add_argument("--name", default="service")
    args = ap.parse_args()

    import torch
    from sieve.embedder import load_embedder

    from sieve.registry import resolve_embedder

    torch.set_num_threads(args.threads)
    model_path = resolve_embedder(MODEL)
    embedder = load_embedder(model_path, home=args.home / "cache", device="cpu", dtype="float32")
    texts = make_texts(args.requests * args.texts_per_request)
    requests = [texts[i:i + args.texts_per_request] for i in range(0, len(texts), args.texts_per_request)]
    levels = [int(c) for c in args.concurrency.split(",")]
    rows: list[dict] = []
    sieve_proc, target = start_sieve(args)
    infinity = start_infinity(args, model_path)
    try:
        probe = texts[:16]
        reference = embedder.encode(probe)
        agreement = {"sieve-grpc": lowest_cosine(reference, sieve_vectors(target, probe))}
        if infinity is not None:
            agreement["infinity"] = lowest_cosine(reference, infinity_vectors(infinity[1], str(model_path), probe))
        print("lowest cosine to the in-process vectors:", agreement)
        systems = {"in-process": lambda c: run_in_process(embedder, requests, c),
                   "sieve-grpc": lambda c: run_sieve(target, requests, c)}
        if infinity is not None:
            systems["infinity"] = lambda c: run_infinity(infinity[1], str(model_path), requests, c)
        for c in levels:
            runs: dict[str, list[Run]] = {name: [] for name in systems}
            for _ in range(args.rounds):  # the systems take turns, so machine drift hits all alike
                for name, run in systems.items():
                    runs[name].append(run(c))
            for name in systems:
                row = summary(name, c, runs[name], args)
                if name in agreement:
                    row["lowest_cosine"] = agreement[name]
                rows.append(row)
                print(f"{name:>11} x{c:<3} {row['texts_per_s']:>8.1f} texts/s {row['texts_per_s_rounds']}  "
                      f"p50 {row['p50_ms']:>8.2f} ms  p99 {row['p99_ms']:>8.2f} ms  errors {row['errors']}")
    finally:
        stop(sieve_proc)
        if infinity is not None:
            stop(infinity[0])
    if infinity is None:
        print(f"infinity: not installed at {INFINITY}; rows without it")
    out = write_results(args.name, rows, device_name("cpu"))
    plot(rows, out.with_suffix(".png"))
    print(f"wrote {out}")


def plot(rows: list[dict], path: Path) -> None:
    plot_by_concurrency(rows, path, [("texts_per_s", "throughput (texts/s)"), ("p99_ms", "p99 latency (ms)")],
                        log2_x=True)


if __name__ == "__main__":
    RESULTS.mkdir(parents=True, exist_ok=True)
    main()
