"""Embedding throughput: Sieve's `Embedder.encode` vs HF transformers (AutoModel on the same SmolLM2 weights,
manual mean pooling) and vs sentence-transformers `encode` for all-MiniLM-L6-v2, on the same texts in one run.
A `pack=False` row runs Sieve's encoder on plain `nn.Linear`s instead of oneDNN-prepacked weights (CPU float32), and
an 8,192-token row runs it with larger batches than its CPU default of 2,048 tokens.

Texts: the first N SciFact abstracts (real, varied lengths), cut at --max-tokens. HF runs the way a user would
write it: fixed-size batches in the given order, each padded to its longest text, at --batch-size texts and (CPU)
at the batch that fills Sieve's CPU token budget, its faster size here. Sieve's encode sorts by length
and packs batches by a token budget. Speed is real (non-padding) tokens per second. Writes
bench/results/embedder-speed.json (+ .png).

    python bench/embedder.py [--docs 256] [--max-tokens 256] [--batch-size 32] [--dtypes float32] [--threads 2]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, device_name, write_results  # noqa: E402
from sieve.embedder import Embedder, load_embedder  # noqa: E402
from sieve.embedder.batching import CPU_BATCH_TOKENS, OTHER_BATCH_TOKENS  # noqa: E402
from sieve.embedder.data import load_retrieval_set  # noqa: E402

from sieve.registry import resolve_backbone, resolve_embedder  # noqa: E402
from sieve.settings import Settings  # noqa: E402


def hf_encode(model, tokenizer, texts: list[str], batch_size: int, max_tokens: int, device) -> None:
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i: i + batch_size], padding=True, truncation=True, max_length=max_tokens,
                        return_tensors="pt").to(device)
        hidden = model(**enc).last_hidden_state
        m = enc["attention_mask"][..., None].to(hidden.dtype)
        torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1).float().cpu()


def hf_batch_sizes(args) -> list[int]:
    """--batch-size texts, and the batch that fills Sieve's CPU token budget with --max-tokens texts (HF at its
    best batch on this CPU, not only at the usual 32)."""
    matched = max(1, CPU_BATCH_TOKENS // args.max_tokens)
    return [args.batch_size] + ([matched] if matched != args.batch_size and args.device == "cpu" else [])


def run_dtype(dtype: str, texts: list[str], gguf: Path, home: Path, args) -> list[dict]:
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    rows: list[dict] = []
    sieve = load_embedder(resolve_embedder("sieve-embed"), home=home, device=args.device, dtype=dtype)
    sieve.encoder.max_length = args.max_tokens
    big_batches = Embedder(sieve.encoder, batch_tokens=OTHER_BATCH_TOKENS)  # the same model, the GPU's budget
    unpacked = load_embedder(resolve_embedder("sieve-embed"), home=home, device=args.device, dtype=dtype, pack=False)
    unpacked.encoder.max_length = args.max_tokens
    tokens = sum(len(sieve.encoder.prepare(t, "", True)[0]) for t in texts)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tok.pad_token = tok.pad_token or tok.eos_token
    hf = AutoModel.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=getattr(torch, dtype))
    hf = hf.to(args.device).eval()
    st = SentenceTransformer(str(resolve_embedder("all-minilm-l6-v2")), device=args.device)
    st.max_seq_length = min(args.max_tokens, 256)
    st_tokens = sum(min(len(st.tokenizer(t).input_ids), st.max_seq_length) for t in texts)
    runs = {
        "sieve-embed (Embedder.encode)": (lambda: sieve.encode(texts), tokens),
        f"sieve-embed, {OTHER_BATCH_TOKENS}-token batches": (lambda: big_batches.encode(texts), tokens),
        "sieve-embed, plain nn.Linear (pack=False)": (lambda: unpacked.encode(texts), tokens),
        **{f"hf-transformers AutoModel + mean pool, batch {bs}": (
            lambda bs=bs: hf_encode(hf, tok, texts, bs, args.max_tokens, args.device), tokens)
           for bs in hf_batch_sizes(args)},
        "sentence-transformers all-MiniLM-L6-v2": (
            lambda: st.encode(texts, batch_size=args.batch_size, normalize_embeddings=True), st_tokens),
    }
    times = {name: [] for name in runs}
    with torch.inference_mode():
        for fn, _ in runs.values():
            fn()  # warm-up
        for _ in range(args.repeat):  # interleaved: drift hits every system alike
            for name, (fn, _) in runs.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    for name, (_, n_tokens) in runs.items():
        s = min(times[name])
        rows.append({"system": name, "dtype": dtype, "texts": len(texts), "max_tokens": args.max_tokens,
                     "batch_size": args.batch_size, "tokens": n_tokens, "seconds": round(s, 2),
                     "tokens_per_s": round(n_tokens / s, 1), "texts_per_s": round(len(texts) / s, 1)})
    hf_rows = [r for r in rows if r["dtype"] == dtype and r["system"].startswith("hf-")]
    same_batch = next(r for r in hf_rows if r["system"].endswith(f"batch {args.batch_size}"))
    best_hf = max(hf_rows, key=lambda r: r["tokens_per_s"])
    for r in rows:
        if r["dtype"] == dtype and r["system"].startswith("sieve"):
            r["speedup_vs_hf"] = round(r["tokens_per_s"] / same_batch["tokens_per_s"], 2)
            r["speedup_vs_best_hf"] = round(r["tokens_per_s"] / best_hf["tokens_per_s"], 2)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--dtypes", default="float32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    settings = Settings()
    home = settings.home / "cache"
    from rich.console import Console
    from rich.table import Table

    ds = load_retrieval_set(settings.data_path(), "scifact")
    texts = list(itertools.islice(ds.corpus.values(), args.docs))
    gguf = resolve_backbone("smollm2-135m-instruct")
    rows = []
    for dtype in args.dtypes.split(","):
        rows += run_dtype(dtype, texts, gguf, home, args)

    device = device_name(args.device)
    table = Table(title=f"embedding throughput, {device}")
    for col in ("system", "dtype", "seconds", "tokens/s", "texts/s", f"vs HF batch {args.batch_size}",
                "vs best HF"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["system"], r["dtype"], str(r["seconds"]), str(r["tokens_per_s"]), str(r["texts_per_s"]),
                      str(r.get("speedup_vs_hf", "")), str(r.get("speedup_vs_best_hf", "")))
    Console().print(table)
    out = write_results("embedder-speed", rows, device)
    plot(rows, RESULTS / "embedder-speed.png", device)
    print(f"wrote {out}")


def plot(rows: list[dict], path: Path, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3))
    labels = [f"{r['system']}\n{r['dtype']}" for r in rows]
    bars = ax.barh(labels, [r["tokens_per_s"] for r in rows], color=["C0", "C1", "C2"] * 4)
    ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("tokens / s (real tokens, padding excluded)")
    ax.set_title(f"Embedding throughput, {rows[0]['texts']} SciFact abstracts\n{device}", fontsize=9)
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
