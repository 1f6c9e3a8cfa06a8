"""Indexing throughput through the whole pipeline, and FAISS search latency / recall, in one run.

Part 1 (pipeline): the first N SciFact abstracts, chunked as the workers chunk them, are
  - embedded by the embedder's raw `encode_documents` in this process (the ceiling), and
  - indexed end to end by 1 and then 2 real `sieve worker` processes (submit -> broker -> claim -> chunk -> embed
    -> SQL -> FAISS snapshot), each worker and the raw run on the same number of torch threads per process.
  Reported: documents/s for each (the median of --rounds passes, taking turns), the pipeline's overhead vs raw,
  and the 2-worker speedup.
Part 2 (search): synthetic clustered vectors (100k and 1M, 384-d, normalized), Sieve's index kinds (flat, hnsw,
  ivf-pq) built through `sieve.store.index`; p50/p99 latency of single-query search and recall@10 vs flat.

    python bench/indexing.py [--docs 600] [--threads 1] [--embedder all-minilm-l6-v2] [--sizes 100000 1000000]
        [--rounds 1] [--name indexing]

Writes bench/results/NAME.json (+ .png).
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import device_name, write_results  # noqa: E402

from sieve.settings import Settings  # noqa: E402


def corpus(n: int, out: Path) -> Path:
    src = Settings().data_path() / "retrieval" / "scifact" / "corpus.jsonl.gz"
    with gzip.open(src, "rt") as f, open(out, "w") as g:
        for _, line in zip(range(n), f):
            g.write(line)
    return out


def raw_encode(path: Path, embedder_name: str, threads: int, settings: Settings) -> tuple[float, int, int]:
    """Seconds for the embedder alone on exactly the chunks the workers will embed; (seconds, chunks, tokens)."""
    import torch
    from sieve.embedder import load_embedder
    from sieve.workers.chunking import chunk_text
    from sieve.workers.sources import read_documents

    from sieve.registry import resolve_embedder

    torch.set_num_threads(threads)
    emb = load_embedder(resolve_embedder(embedder_name), home=settings.home / "cache", device="cpu")
    size = max(8, min(settings.chunk_tokens, emb.max_length - 8))
    overlap = min(settings.chunk_overlap, size // 2)
    texts = [p.text for d in read_documents([path])
             for p in chunk_text(d.text, emb.token_spans, size=size, overlap=overlap)]
    emb.encode_documents(texts[:16])  # warm-up
    t0 = time.perf_counter()
    emb.encode_documents(texts)
    seconds = time.perf_counter() - t0
    tokens = sum(len(emb.encoder.prepare(t, emb.document_instruction, True)[0]) for t in texts)
    return seconds, len(texts), tokens


def pipeline(path: Path, embedder_name: str, workers: int, threads: int, n_docs: int) -> float:
    """Seconds from submitting the documents to the job finishing, with `workers` worker processes already up."""
    home = Path(tempfile.mkdtemp(prefix="sieve-bench-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIEVE_")}
    env.update(SIEVE_HOME=str(home), SIEVE_THREADS=str(threads), SIEVE_DEVICE="cpu", SIEVE_LOG_LEVEL="WARNING",
               SIEVE_BATCH_DOCUMENTS="25", SIEVE_REFRAG_BLOCKS=os.environ.get("SIEVE_REFRAG_BLOCKS", "0"))
    shared_cache = Settings().home / "cache"  # converted weights: reuse, do not re-convert
    (home / "cache").parent.mkdir(parents=True, exist_ok=True)
    if shared_cache.is_dir():
        os.symlink(shared_cache, home / "cache")
    cli = [sys.executable, "-m", "sieve.cli"]
    subprocess.run([*cli, "collections", "create", "bench", "--embedder", embedder_name], env=env, check=True,
                   capture_output=True)
    logs = [open(home / f"worker{i}.log", "w") for i in range(workers)]
    procs = [subprocess.Popen([*cli, "worker"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
             for log in logs]
    try:
        deadline = time.monotonic() + 120
        while not all("sieve worker ready" in (home / f"worker{i}.log").read_text() for i in range(workers)):
            if time.monotonic() > deadline:
                raise TimeoutError("workers did not start")
            time.sleep(0.2)
        from sieve.store import make_engine
        from sieve.workers import jobs
        from sieve.workers.app import QUEUE, make_app
        from sieve.workers.sources import read_documents

        docs = list(read_documents([path]))
        app = make_app(Settings(home=home))  # the workers' broker (the embedded SQLite one under this home)
        engine = make_engine(f"sqlite:///{home / 'sieve.db'}")
        t0 = time.perf_counter()  # from submitting the documents to the job's last batch being done
        info = jobs.submit_upsert(engine, "bench", docs, batch_documents=25, fanout=8, enqueue=lambda job, n: [
            app.send_task("sieve.drain_job", (job,), queue=QUEUE) for _ in range(n)])
        while not (info := jobs.get_job(engine, info.id)).finished:
            time.sleep(0.05)
        seconds = time.perf_counter() - t0
        assert info.done == n_docs, info
        engine.dispose()
        return seconds
    finally:
        for p in procs:
            os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            p.wait(timeout=60)
        for log in logs:
            log.close()
        shutil.rmtree(home, ignore_errors=True)


def clustered(n: int, dim: int, seed: int = 0, latent: int = 32) -> np.ndarray:
    """Embedding-like synthetic vectors: 1,024 clusters in a 32-d latent space, mapped linearly into `dim`
    (one fixed map for every call, so queries and corpus share it), small isotropic noise, L2-normalized.
    Real embeddings have a low intrinsic dimension; i.i.d. Gaussian vectors would make every neighbour
    equidistant and no ANN index meaningful."""
    fixed = np.random.default_rng(12345)
    centers = fixed.standard_normal((1024, latent)).astype("float32")
    mapping = fixed.standard_normal((latent, dim)).astype("float32") / np.sqrt(latent)
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype="float32")
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        z = centers[rng.integers(0, 1024, m)] + 0.35 * rng.standard_normal((m, latent), dtype="float32")
        out[start:start + m] = z @ mapping + 0.02 * rng.standard_normal((m, dim), dtype="float32")
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


def search_rows(sizes: list[int], dim: int, n_queries: int, kinds: list[str], device: str) -> list[dict]:
    from sieve.store.index import CollectionIndex, IndexSpec

    rows = []
    for n in sizes:
        data = clustered(n, dim)
        queries = clustered(n_queries, dim, seed=1)
        ids = np.arange(n, dtype="int64")
        truth = None
        for kind in kinds:
            spec = IndexSpec(dim=dim, kind=kind, nlist=int(4 * np.sqrt(n)), pq_m=48 if dim % 48 == 0 else 16)
            index = CollectionIndex(Path(tempfile.mkdtemp()), spec)
            t0 = time.perf_counter()
            for start in range(0, n, 200_000):
                index.add(ids[start:start + 200_000], data[start:start + 200_000])
            build = time.perf_counter() - t0
            lat, found = [], []
            for q in queries:
                t = time.perf_counter()
                _, got = index.search(q[None], 10)
                lat.append(time.perf_counter() - t)
                found.append(got[0])
            found = np.asarray(found)
            if kind == "flat":
                truth = found
            recall = float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)])) if truth is not None \
                else float("nan")
            row = {"system": f"faiss-{kind}", "mode": "search", "vectors": n, "dim": dim, "device": device,
                   "p50_ms": 1e3 * float(np.percentile(lat, 50)), "p99_ms": 1e3 * float(np.percentile(lat, 99)),
                   "recall@10": recall, "build_s": build}
            print(f"{kind:7s} n={n:>8d}  p50 {row['p50_ms']:.3f} ms  p99 {row['p99_ms']:.3f} ms  "
                  f"recall@10 {recall:.3f}  build {build:.1f} s", flush=True)
            rows.append(row)
            del index
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=600)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker process and for raw encode")
    ap.add_argument("--embedder", default="all-minilm-l6-v2")
    ap.add_argument("--sizes", type=int, nargs="*", default=[100_000, 1_000_000])
    ap.add_argument("--kinds", nargs="*", default=["flat", "hnsw", "ivf-pq"])
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--skip-pipeline", action="store_true")
    ap.add_argument("--rounds", type=int, default=1, help="pipeline passes, taking turns (median kept)")
    ap.add_argument("--name", default="indexing", help="results file name (bench/results/NAME.json, .png)")
    args = ap.parse_args()
    device = device_name("cpu")
    rows: list[dict] = []
    if not args.skip_pipeline:
        settings = Settings()
        path = corpus(args.docs, Path(tempfile.mkdtemp()) / "docs.jsonl")
        times: dict[str, list[float]] = {"raw": [], "1": [], "2": []}
        for r in range(args.rounds):  # raw, 1 worker, 2 workers take turns, so machine drift hits all alike
            raw_s, chunks, tokens = raw_encode(path, args.embedder, args.threads, settings)
            times["raw"].append(raw_s)
            for workers in (1, 2):
                times[str(workers)].append(pipeline(path, args.embedder, workers, args.threads, args.docs))
            print(f"round {r + 1}: raw {times['raw'][-1]:.1f} s, 1 worker {times['1'][-1]:.1f} s, 2 workers "
                  f"{times['2'][-1]:.1f} s", flush=True)
        raw_s = statistics.median(times["raw"])
        common = {"threads_per_worker": args.threads, "documents": args.docs, "chunks": chunks, "tokens": tokens,
                  "rounds": args.rounds, "device": device}
        rows.append({"system": f"{args.embedder} encode_documents (raw)", "mode": "raw", "workers": 1,
                     "seconds": raw_s, "seconds_rounds": times["raw"], "docs_per_s": args.docs / raw_s, **common})
        print(f"raw encode: {args.docs / raw_s:.1f} docs/s ({chunks} chunks, {tokens} tokens, {raw_s:.1f} s)")
        for workers in (1, 2):
            s = statistics.median(times[str(workers)])
            rows.append({"system": "sieve pipeline", "mode": "pipeline", "workers": workers, "seconds": s,
                         "seconds_rounds": times[str(workers)], "docs_per_s": args.docs / s,
                         "overhead_vs_raw": s / raw_s - 1 if workers == 1 else None, "speedup_vs_1_worker": None,
                         **common})
            print(f"pipeline, {workers} worker(s): {args.docs / s:.1f} docs/s ({s:.1f} s)", flush=True)
        one, two = rows[-2], rows[-1]
        two["speedup_vs_1_worker"] = two["docs_per_s"] / one["docs_per_s"]
        print(f"overhead vs raw (1 worker): {100 * one['overhead_vs_raw']:.1f} %; 2 workers: "
              f"{two['speedup_vs_1_worker']:.2f}x one (cores: {os.cpu_count()}; medians of {args.rounds} rounds)")
    if args.sizes:
        rows += search_rows(args.sizes, 384, args.queries, args.kinds, device)
    out = write_results(args.name, rows, device)
    plot(rows, out.with_suffix(".png"))
    print(f"wrote {out}")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    pipe = [r for r in rows if r["mode"] in ("raw", "pipeline")]
    if pipe:
        labels = ["raw encode" if r["mode"] == "raw" else f"pipeline x{r['workers']}" for r in pipe]
        axes[0].bar(labels, [r["docs_per_s"] for r in pipe], color=["gray", "tab:blue", "tab:green"][:len(pipe)])
        axes[0].set_ylabel("documents / s")
        axes[0].set_title("indexing throughput")
    search = [r for r in rows if r["mode"] == "search"]
    for kind in sorted({r["system"] for r in search}):
        pts = [r for r in search if r["system"] == kind]
        axes[1].plot([r["vectors"] for r in pts], [r["p50_ms"] for r in pts], "o-",
                     label=f"{kind} (recall@10 {pts[-1]['recall@10']:.2f})")
    if search:
        axes[1].set_xscale("log")
        axes[1].set_yscale("log")
        axes[1].set_xlabel("vectors")
        axes[1].set_ylabel("p50 latency, ms")
        axes[1].set_title("FAISS search, one query")
        axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
