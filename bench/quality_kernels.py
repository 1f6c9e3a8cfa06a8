"""Quality of the kernels' approximations on the real SmolLM2-135M: quantized weights and sparse attention.

1. WikiText-2 raw test perplexity (../shared/data/text/wikitext-2-raw/test.txt), non-overlapping windows:
   fp32 / int8 / int4 (weight-only, `sieve.backbone.quant.quantize`) at `--window` tokens, and dense vs
   sparse attention (the `sparse` mode: estimated block-sparse prefill) at `--long-window` tokens (the model's
   8,192-token context by default; a window's NLL covers every predicted token).
2. Needle in a haystack: Paul Graham essays (../shared/data/text/pg-essays) cut to each `--needle-lengths`
   context, a sentence with a magic number put at each `--depths` fraction, then a question; greedy answer with
   dense and with sparse prefill. Reports whether each found the number and whether sparse answered as dense.

Writes bench/results/quality-kernels.json. The full run is long on CPU (8K windows, 30 layers);
a smoke run:  python bench/quality_kernels.py --max-windows 1 --window 256 --long-window 1024 --min-length 512 \
              --needle-lengths 1024 --depths 0.5
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import device_name, write_results  # noqa: E402
from sieve.backbone import load_backbone  # noqa: E402
from sieve.backbone.quant import quant_summary, quantize  # noqa: E402
from sieve.kernels import SparseConfig, register_sparse_attention  # noqa: E402

from sieve.registry import resolve_backbone  # noqa: E402
from sieve.settings import Settings  # noqa: E402

NEEDLE = "The special magic number that Ada keeps in her notebook is {number}."
QUESTION = ("\n\nQuestion: What is the special magic number that Ada keeps in her notebook?\n"
            "Answer: The special magic number that Ada keeps in her notebook is")


def load(device: str, scheme: str | None = None):
    bb = load_backbone(resolve_backbone("smollm2-135m-instruct"), home=Settings().home / "cache", device=device,
                       dtype="float32")
    if scheme:
        quantize(bb.model, scheme)
    return bb


@torch.inference_mode()
def window_nll(model, ids: torch.Tensor, mode: str, chunk: int = 1024) -> tuple[float, int]:
    """Summed next-token NLL over one window [1, T] (logits computed in chunks: the vocab is 49K wide)."""
    h = model(ids, mode=mode, return_logits=False).hidden_states[0]  # [T, dim]
    total = 0.0
    for s in range(0, ids.shape[1] - 1, chunk):
        e = min(ids.shape[1] - 1, s + chunk)
        logits = model.output(h[s:e]).float()
        total += torch.nn.functional.cross_entropy(logits, ids[0, s + 1: e + 1], reduction="sum").item()
    return total, ids.shape[1] - 1


def perplexity(model, tokens: list[int], window: int, max_windows: int | None, mode: str, device) -> dict:
    n = len(tokens) // window
    n = min(n, max_windows) if max_windows else n
    nll, count, t0 = 0.0, 0, time.perf_counter()
    for i in range(n):
        ids = torch.tensor([tokens[i * window: (i + 1) * window]], device=device)
        a, b = window_nll(model, ids, mode)
        nll, count = nll + a, count + b
    return {"perplexity": round(math.exp(nll / count), 4), "windows": n, "tokens_scored": count,
            "seconds": round(time.perf_counter() - t0, 1)}


@torch.inference_mode()
def greedy(model, ids: list[int], max_new: int, mode: str, stop: set[int]) -> list[int]:
    """Greedy decode; the prompt's prefill uses `mode` (e.g. sparse), decode steps are single-query (dense)."""
    device = model.tok_embeddings.weight.device
    model.setup_caches(1, min(model.args.max_seq_len, len(ids) + max_new))
    x = torch.tensor([ids], device=device)
    logits = model(x, mode=mode, input_pos=0, logits_at=torch.tensor([len(ids) - 1], device=device)).logits[0, -1]
    out: list[int] = []
    for i in range(max_new):
        tok = int(logits.argmax())
        if tok in stop:
            break
        out.append(tok)
        pos = len(ids) + i
        if pos >= model.args.max_seq_len - 1:
            break
        logits = model(torch.tensor([[tok]], device=device), input_pos=pos).logits[0, -1]
    model.clear_caches()
    return out


def haystack_ids(tok, data: Path, length: int, depth: float, number: int) -> list[int]:
    essays = sorted((data / "text" / "pg-essays").glob("*.txt"))
    text = "\n\n".join(p.read_text() for p in essays)
    hay = tok.encode(text)
    question = tok.encode(QUESTION)
    needle = tok.encode(" " + NEEDLE.format(number=number) + " ")
    room = length - len(question) - len(needle)
    hay = hay[:room]
    cut = int(len(hay) * depth)
    # put the needle at a sentence boundary near the depth
    for j in range(cut, min(len(hay), cut + 200)):
        if tok.decode([hay[j]]).strip().endswith("."):
            cut = j + 1
            break
    return hay[:cut] + needle + hay[cut:] + question


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--window", type=int, default=2048, help="perplexity window for fp32/int8/int4")
    ap.add_argument("--long-window", type=int, default=8192, help="perplexity window for dense vs sparse")
    ap.add_argument("--max-windows", type=int, default=None, help="limit windows per setting (smoke runs)")
    ap.add_argument("--schemes", default="fp32,int8,int4")
    ap.add_argument("--gamma", type=float, default=SparseConfig.gamma)
    ap.add_argument("--min-length", type=int, default=4096, help="sparse below this many keys stays dense (the "
                    "library default, 64K, is past the model's 8K context)")
    ap.add_argument("--needle-lengths", default="2048,4096,8000")
    ap.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    ap.add_argument("--skip", default="", help="comma list of: quant, sparse, needle")
    ap.add_argument("--name", default="quality-kernels")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = Settings().data_path()
    device = torch.device(args.device)
    cfg = SparseConfig(gamma=args.gamma, min_length=args.min_length)
    sparse_fn, _ = register_sparse_attention(cfg)
    rows: list[dict] = []

    base = load(args.device)
    tok = base.tokenizer
    text = (data / "text" / "wikitext-2-raw" / "test.txt").read_text()
    tokens = tok.encode(text)
    print(f"wikitext-2-raw test: {len(tokens)} tokens", flush=True)
    common = {"dataset": "wikitext-2-raw", "split": "test"}

    if "quant" not in args.skip:
        for scheme in args.schemes.split(","):
            bb = base if scheme == "fp32" else load(args.device, scheme)
            r = perplexity(bb.model, tokens, args.window, args.max_windows, "causal", device)
            rows.append({"system": f"smollm2-{scheme}", **common, "window": args.window, "attention": "dense",
                         "weights": scheme, "cpu_path": quant_summary(bb.model).get("prefill", "fp32"), **r})
            print(rows[-1], flush=True)
            if bb is not base:
                del bb

    if "sparse" not in args.skip:
        for mode in ("causal", "sparse"):
            before = (sparse_fn.stats.blocks_computed, sparse_fn.stats.blocks_causal)
            r = perplexity(base.model, tokens, args.long_window, args.max_windows, mode, device)
            row = {"system": f"smollm2-fp32-{'dense' if mode == 'causal' else 'sparse'}", **common,
                   "window": args.long_window, "attention": "dense" if mode == "causal" else "sparse",
                   "weights": "fp32", **r}
            if mode == "sparse":
                done = sparse_fn.stats.blocks_computed - before[0]
                full = sparse_fn.stats.blocks_causal - before[1]
                row.update({"block_density": round(done / full, 4) if full else 1.0, "gamma": args.gamma,
                            "min_length": args.min_length})
            rows.append(row)
            print(rows[-1], flush=True)

    if "needle" not in args.skip:
        stop = set(tok.eos_ids)
        for length in map(int, args.needle_lengths.split(",")):
            for depth in map(float, args.depths.split(",")):
                number = 1000 + (length * 7 + int(depth * 100) * 13) % 9000
                ids = haystack_ids(tok, data, min(length, base.args.max_seq_len - 16), depth, number)
                answers = {}
                for mode in ("causal", "sparse"):
                    answers[mode] = tok.decode(greedy(base.model, ids, 8, mode, stop))
                for mode, answer in answers.items():
                    rows.append({"system": f"smollm2-fp32-{'dense' if mode == 'causal' else 'sparse'}",
                                 "task": "needle-in-a-haystack", "dataset": "pg-essays", "context_tokens": len(ids),
                                 "depth": depth, "needle": number, "answer": answer.strip(),
                                 "found": float(str(number) in answer),
                                 "same_as_dense": float(answer == answers["causal"])})
                    print(rows[-1], flush=True)

    out = write_results(args.name, rows, device_name(args.device)
                        + (f", torch.set_num_threads({args.threads})" if device.type == "cpu" else ""))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
