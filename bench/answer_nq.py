"""NQ-open answered end to end through a real Sieve server: retrieval from an indexed collection, then REFRAG
compressed decoding, the way a RAG backend uses the Answer RPC.

The first --questions questions of the NQ-open evaluated portion (`refrag.data.nq_eval`: each question's gold
passage + 19 BM25 hard negatives from the pool) give the corpus: every distinct passage of those questions is one
document. A `sieve.service` process with its embedded worker (SQLite, SQLAlchemy broker, FAISS files under a fresh
SIEVE_HOME) indexes them: chunks, sieve-embed vectors, and the REFRAG block encodings Answer reads. Then each
question is answered with `Answer(collection, k)` once per setting:

  default        expansion unset: the served model's refrag.json (shipped: 0.25 of the blocks, by similarity)
  half           expansion 0.5 (by the model's default policy)
  compressed     expansion 0: every block one vector
  full           expansion 1: every block as tokens (the plain full-context prompt over the same retrieved chunks)

Per setting: exact match and accuracy (answer string in the first line, `refrag.data`), how often the gold passage
was among the retrieved chunks (retrieval recall@k, the same for every setting), mean time to first token and
prompt positions as the server reports them. Writes bench/results/NAME.json and NAME.png.

    python bench/answer_nq.py [--questions 50] [--k 5] [--threads 2] [--max-new-tokens 32] [--name answer-nq]
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, device_name, start_server, stop, write_results  # noqa: E402
from sieve.refrag.data import exact_match, has_answer, nq_eval  # noqa: E402

from sieve.settings import Settings  # noqa: E402

SETTINGS = {"default": None, "half": 0.5, "compressed": 0.0, "full": 1.0}  # name -> the call's expansion (None: unset)


def doc_id(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def corpus(examples) -> dict[str, str]:
    """Every distinct passage of the questions, by a content id (the same passage under two questions is one doc)."""
    return {doc_id(p): p for ex in examples for p in ex.passages}


def first_line(text: str) -> str:
    return text.strip().split("\n")[0].strip()


def score(rows: list[dict]) -> dict:
    """Per-setting summary of per-question rows."""
    return {"questions": len(rows),
            "exact_match": round(statistics.mean(r["em"] for r in rows), 4),
            "accuracy": round(statistics.mean(r["acc"] for r in rows), 4),
            "gold_retrieved": round(statistics.mean(r["gold_retrieved"] for r in rows), 4),
            "ttft_ms": round(1000 * statistics.mean(r["ttft_s"] for r in rows), 1),
            "prompt_positions": round(statistics.mean(r["positions"] for r in rows), 1),
            "full_prompt_tokens": round(statistics.mean(r["full_tokens"] for r in rows), 1),
            "expanded_blocks": round(statistics.mean(r["expanded"] for r in rows), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--questions", type=int, default=50)
    ap.add_argument("--k", type=int, default=5, help="chunks Answer retrieves per question")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--home", type=Path, default=None, help="the server's SIEVE_HOME (default: a fresh temp dir)")
    ap.add_argument("--name", default="answer-nq")
    a = ap.parse_args()
    from rich.progress import Progress
    from sieve_client import SieveClient

    examples = nq_eval(a.data or Settings().data_path(), n_docs=20, limit=a.questions)
    docs = corpus(examples)
    home = a.home or Path(tempfile.mkdtemp(prefix="sieve-answer-nq-"))
    home.mkdir(parents=True, exist_ok=True)
    log = open(home / "server.log", "w")  # noqa: SIM115 (open for the server's life)
    proc, target = start_server({"SIEVE_HOME": str(home), "SIEVE_THREADS": str(a.threads),
                                 "SIEVE_LOG_LEVEL": "WARNING", "SIEVE_METRICS_PORT": "-1"},
                                worker=True, log=log, timeout=600)
    per: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    try:
        with SieveClient(target) as c, Progress() as bar:
            c.create_collection("nq")
            t0 = time.perf_counter()
            job = c.upsert("nq", list(docs.items()))
            task = bar.add_task(f"indexing {len(docs)} passages", total=len(docs))
            for state in c.watch_job(job.id):
                bar.update(task, completed=state.done + state.failed)
            if state.status != "done":
                raise RuntimeError(f"indexing ended {state.status}: {state.errors}")
            index_s = time.perf_counter() - t0
            for expansion in SETTINGS.values():  # warm-up: the first call loads the REFRAG model(s)
                c.answer(examples[0].question, collection="nq", k=a.k, expansion=expansion, max_new_tokens=2).read()
            task = bar.add_task("answering", total=len(examples) * len(SETTINGS))
            for ex in examples:
                gold = {doc_id(ex.passages[g]) for g in ex.gold}
                for name, expansion in SETTINGS.items():
                    stream = c.answer(ex.question, collection="nq", k=a.k, expansion=expansion,
                                      max_new_tokens=a.max_new_tokens)
                    pred = first_line(stream.read())
                    u = stream.usage
                    per[name].append({"em": exact_match(pred, ex.answers), "acc": has_answer(pred, ex.answers),
                                      "gold_retrieved": bool(gold & {x.document_id for x in stream.citations}),
                                      "ttft_s": u.time_to_first_token_s, "positions": u.prompt_positions,
                                      "full_tokens": u.full_prompt_tokens, "expanded": u.expanded_blocks,
                                      "model": u.model})
                    bar.advance(task)
    finally:
        stop(proc)
    rows = [{"system": f"sieve-answer ({name})", "setting": name,
             "expansion": "model default" if e is None else e, "k": a.k, "model": per[name][0]["model"],
             "dataset": "nq-open-20doc", "split": "eval", "documents": len(docs),
             "index_seconds": round(index_s, 1), **score(per[name])} for name, e in SETTINGS.items()]
    for r in rows:
        print(f"{r['setting']:<11} EM {r['exact_match']:.3f}  acc {r['accuracy']:.3f}  gold retrieved "
              f"{r['gold_retrieved']:.2f}  TTFT {r['ttft_ms']:7.1f} ms  positions {r['prompt_positions']:7.1f} "
              f"of {r['full_prompt_tokens']:.0f}  expanded blocks {r['expanded_blocks']}")
    import torch

    torch.set_num_threads(a.threads)  # the device line names the server's thread count
    device = device_name("cpu")
    out = write_results(a.name, rows, device)
    plot(rows, RESULTS / f"{a.name}.png", device)
    print(f"indexed {len(docs)} passages in {index_s:.0f} s; wrote {out}")


def plot(rows: list[dict], path: Path, device: str) -> None:
    """Accuracy against time to first token, one point per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for r in rows:
        ax.scatter(r["ttft_ms"], r["accuracy"], s=40)
        ax.annotate(f"{r['setting']} (EM {r['exact_match']:.2f})", (r["ttft_ms"], r["accuracy"]), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")
    ax.margins(x=0.2, y=0.15)  # room for the labels
    ax.set_xlabel("mean time to first token, ms (server-reported)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"NQ-open through Answer(collection), k={rows[0]['k']}, {rows[0]['questions']} questions\n{device}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
