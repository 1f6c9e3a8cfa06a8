"""Answer serving: concurrent RAG streams through the server, decoded together (continuous batching) or one at a time.

Two real `python -m sieve.service` processes with the shipped REFRAG model (refrag-k16 on SmolLM2, loaded at
start), the same settings but `SIEVE_ANSWER_BATCH`: 1 (one stream at a time on the model's lane, the behaviour
before session 30) and --batch (streams share decoding steps). They take turns, --rounds passes each. At each
concurrency, callers send --calls Answer calls in all (a question and --passages passages of 128 tokens cut from Paul
Graham essays, sent by the client; the model's default expansion), each asking --new-tokens tokens.
Rows: generated tokens/s over the pass (all callers), and per call p50 / p99 of the time to the first text piece and
of the whole call. Writes bench/results/NAME.json (+ .png).

    python bench/answer_serving.py [--threads 2] [--batch 8] [--concurrency 1,4,8] [--calls 16] [--new-tokens 32]
        [--passages 5] [--rounds 2] [--name answer-serving]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, device_name, plot_by_concurrency, start_server, stop, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def essay_pieces() -> list[str]:
    """128-token pieces (SmolLM2's tokenizer) of the first 20 Paul Graham essays in the shared data."""
    from sieve.backbone.tokenizer import tokenizer_from_gguf

    from sieve.registry import resolve_backbone
    from sieve.settings import Settings

    text = "\n\n".join(p.read_text() for p in sorted((Settings().data_path() / "text/pg-essays").glob("*.txt"))[:20])
    tokenizer = tokenizer_from_gguf(resolve_backbone("smollm2-135m-instruct"))
    ids = tokenizer.encode(text, add_bos=False)
    return [tokenizer.decode(ids[i:i + 128]) for i in range(0, len(ids) - 128, 128)]


def make_requests(pieces: list[str], n: int, passages: int, seed: int = 0) -> list[tuple[str, list[str]]]:
    """n (question, passages) pairs: questions about the essays, passages drawn from their pieces."""
    rng = random.Random(seed)
    questions = ["What does the author think founders should do first?", "Why do startups fail?",
                 "What makes a good essay?", "How should you choose what to work on?",
                 "What is the best way to learn to program?", "Why is it hard to raise money?"]
    return [(rng.choice(questions), rng.sample(pieces, passages)) for _ in range(n)]


def run_pass(target: str, requests: list[tuple[str, list[str]]], concurrency: int, new_tokens: int) -> dict:
    from sieve_client import SieveClient

    todo = list(reversed(requests))
    lock = threading.Lock()
    ttft, total, tokens, errors = [], [], [0], [0]

    def caller():
        with SieveClient(target, timeout=600) as c:
            while True:
                with lock:
                    if not todo:
                        return
                    question, passages = todo.pop()
                t0 = time.perf_counter()
                first = None
                try:
                    stream = c.answer(question, passages=passages, max_new_tokens=new_tokens)
                    for _ in stream:
                        if first is None:
                            first = time.perf_counter() - t0
                    with lock:
                        total.append(time.perf_counter() - t0)
                        ttft.append(first if first is not None else total[-1])
                        tokens[0] += stream.usage.generated_tokens
                except Exception:
                    with lock:
                        errors[0] += 1

    start = time.perf_counter()
    threads = [threading.Thread(target=caller) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"seconds": time.perf_counter() - start, "ttft": ttft, "total": total, "tokens": tokens[0],
            "errors": errors[0]}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs) or [float("nan")]
    return round(xs[min(len(xs) - 1, int(q * len(xs)))] * 1e3, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="torch threads of each server")
    ap.add_argument("--batch", type=int, default=8, help="SIEVE_ANSWER_BATCH of the batched server")
    ap.add_argument("--concurrency", default="1,4,8")
    ap.add_argument("--calls", type=int, default=16, help="Answer calls per pass (at least the concurrency)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--passages", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--home", type=Path, default=ROOT / ".sieve_home" / "bench-answer")
    ap.add_argument("--name", default="answer-serving")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)  # the device line; the servers are separate processes
    env = {"SIEVE_THREADS": str(args.threads), "SIEVE_LOG_LEVEL": "WARNING", "SIEVE_HOME": str(args.home),
           "SIEVE_METRICS_PORT": "-1", "SIEVE_PRELOAD_MODELS": "1", "SIEVE_REFRAG_BLOCK_MODELS": "",
           "SIEVE_MAX_WAITING_GENERATIONS": "64"}
    pieces = essay_pieces()
    servers = {f"answer-batch-{b}": start_server(dict(env, SIEVE_ANSWER_BATCH=str(b))) for b in (1, args.batch)}
    levels = [int(c) for c in args.concurrency.split(",")]
    rows = []
    try:
        for _, target in servers.values():  # warm up: first-call allocations
            run_pass(target, make_requests(pieces, 2, args.passages, seed=99), 2, 4)
        for c in levels:
            requests = make_requests(pieces, max(args.calls, c), args.passages, seed=c)
            runs: dict[str, list[dict]] = {name: [] for name in servers}
            for _ in range(args.rounds):  # the servers take turns
                for name, (_, target) in servers.items():
                    runs[name].append(run_pass(target, requests, c, args.new_tokens))
            for name, rs in runs.items():
                rates = [round(r["tokens"] / r["seconds"], 1) for r in rs]
                ttft = [x for r in rs for x in r["ttft"]]
                total = [x for r in rs for x in r["total"]]
                row = {"system": name, "answer_batch": int(name.rsplit("-", 1)[1]), "concurrency": c,
                       "calls": len(total), "errors": sum(r["errors"] for r in rs), "rounds": len(rs),
                       "new_tokens": args.new_tokens, "passages": args.passages, "threads": args.threads,
                       "tokens_per_s": statistics.median(rates), "tokens_per_s_rounds": rates,
                       "ttft_p50_ms": pct(ttft, 0.5), "ttft_p99_ms": pct(ttft, 0.99),
                       "call_p50_ms": pct(total, 0.5), "call_p99_ms": pct(total, 0.99)}
                rows.append(row)
                print(f"{name:>16} x{c:<2} {row['tokens_per_s']:>7.1f} tok/s {rates}  ttft p50 "
                      f"{row['ttft_p50_ms']:>8.1f} p99 {row['ttft_p99_ms']:>8.1f} ms  call p50 "
                      f"{row['call_p50_ms']:>8.1f} p99 {row['call_p99_ms']:>8.1f} ms  errors {row['errors']}",
                      flush=True)
    finally:
        for proc, _ in servers.values():
            stop(proc)
    out = write_results(args.name, rows, device_name("cpu"))
    plot(rows, out.with_suffix(".png"))
    print(f"wrote {out}")


def plot(rows: list[dict], path: Path) -> None:
    plot_by_concurrency(rows, path, [("tokens_per_s", "generated tokens/s (all callers)"),
                                     ("ttft_p99_ms", "time to first text, p99 (ms)")], "concurrent Answer callers")


if __name__ == "__main__":
    RESULTS.mkdir(parents=True, exist_ok=True)
    main()
