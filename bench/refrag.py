"""REFRAG speed: time-to-first-token and decode tokens/s of compressed prompts (k = 8 / 16 / 32) against the
full-context token prompt, same decoder, same passages, one run, at each context size.

Passages: Paul Graham essays cut into 128-token chunks (like retrieved chunks) until the context size is reached;
one question. Systems per size:
  full-context            tokens -> prefill -> first token (the plain backbone path)
  refrag-kK precomputed   block vectors stored at index time: projector + prefill over the compressed prompt
  refrag-kK encode        the same, plus encoding every block with the chunk encoder at request time
  refrag-kK precomputed, expanded (--expansions)   stored vectors, the question encoded, a fraction of the blocks
                          chosen by --policy and fed as tokens (what Answer does by default: 0.25, similarity)
TTFT is prompt assembly + prefill + the first sampled token; decode tokens/s is over the next --new-tokens tokens
(no stop token, so every system decodes the same number). Repetitions are interleaved across systems.
Decoding is the service's: `refrag.answer.prefill_embeds` (one prefill over the prompt embeddings), as `Answerer`
does, on a decoder set up by `apply_speed_options` like the service's (float32: oneDNN-packed linears; --quant
int8/int4 and --compile as SIEVE_DECODE_QUANT / SIEVE_COMPILE_DECODE).
Writes bench/results/NAME.json and NAME.png.

    python bench/refrag.py [--sizes 512,2048,8192] [--ks 8,16,32] [--new-tokens 32] [--repeat 3] [--threads 2]
                           [--device cpu] [--model refrag-k16] [--quant none] [--compile] [--name refrag-speed]
                           [--expansions 0.25 --policy similarity]   (+ precomputed rows with blocks expanded)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, device_name, write_results  # noqa: E402
from sieve.backbone import load_backbone  # noqa: E402
from sieve.backbone.runtime import apply_speed_options, decode_path  # noqa: E402
from sieve.refrag import Refrag, load_refrag  # noqa: E402
from sieve.refrag.answer import prefill_embeds  # noqa: E402
from sieve.refrag.model_dir import RefragConfig, resolve_refrag  # noqa: E402
from sieve.refrag.prompt import qa_layout  # noqa: E402

from sieve.registry import resolve_backbone  # noqa: E402
from sieve.settings import Settings  # noqa: E402

QUESTION = "What does the author think founders should do first?"


def chunks_of(tokenizer, text: str, total: int, size: int = 128) -> list[str]:
    ids = tokenizer.encode(text, add_bos=False)[:total]
    return [tokenizer.decode(ids[i:i + size]) for i in range(0, len(ids), size)]


@torch.inference_mode()
def run(model, embeds_fn, new_tokens: int, sync) -> tuple[float, float, int]:
    """-> (seconds to the first token, seconds for the next new_tokens - 1 tokens, prompt positions).
    The same steps as `refrag.answer.Answerer._decode`, without its stop token."""
    t0 = time.perf_counter()
    embeds = embeds_fn()
    t = embeds.shape[1]
    cursor, logits = prefill_embeds(model, embeds, new_tokens)
    token = logits.argmax(-1)
    sync()
    t1 = time.perf_counter()
    for _ in range(new_tokens - 1):
        token = cursor.step(token).argmax(-1)
    sync()
    return t1 - t0, time.perf_counter() - t1, t


def fitting(refrag: Refrag, passages: list[str], new_tokens: int) -> list[str]:
    """The passages, last ones dropped until the full-context prompt and new_tokens fit the decoder's context."""
    limit = refrag.model.args.max_seq_len - new_tokens
    while len(qa_layout(refrag.tokenizer, QUESTION, refrag.encode(passages, 32)).full_ids()) > limit:
        passages = passages[:-1]
    return passages


def systems_for(refrag: Refrag, passages: list[str], ks: list[int], expansions: list[float] = (),
                policy: str = "similarity") -> dict[str, tuple[dict, object]]:
    """name -> (row metadata, a function building the decoder input). `expansions`: more precomputed rows with
    that fraction of blocks expanded by `policy` (the question encoded and the blocks chosen at request time)."""
    model = refrag.model
    tok = refrag.tokenizer
    out = {}
    full_layout = qa_layout(tok, QUESTION, refrag.encode(passages, ks[0]))
    full_ids = full_layout.full_ids()

    def full():
        tok.encode_batch(passages)  # request-time tokenization of the passages (every system pays it)
        return model.tok_embeddings(torch.tensor([full_ids], device=refrag.device))

    out["full-context"] = ({"system": "full-context", "mode": "full"}, full)
    for k in ks:
        pre = refrag.encode(passages, k)

        def precomputed(pre=pre):  # vectors from the store; the text is re-tokenized (EncodedPassage.from_record)
            tok.encode_batch(passages)
            return refrag.embed(qa_layout(tok, QUESTION, pre))

        def encode(k=k):
            return refrag.embed(qa_layout(tok, QUESTION, refrag.encode(passages, k)))

        out[f"k{k}-pre"] = ({"system": f"refrag-k{k}", "mode": "compressed-precomputed", "k": k}, precomputed)
        out[f"k{k}-enc"] = ({"system": f"refrag-k{k}", "mode": "compressed-encode", "k": k}, encode)
        for e in expansions:
            def expanded(pre=pre, e=e):  # as Answer does: the question's vector, the policy, the chosen blocks
                tok.encode_batch(passages)
                layout = qa_layout(tok, QUESTION, pre)
                query = refrag.blocks.encode_query(QUESTION)
                return refrag.embed(layout, refrag.choose_expansion(layout, e, query=query, policy=policy))

            out[f"k{k}-pre-x{e:g}"] = ({"system": f"refrag-k{k}", "mode": "compressed-precomputed", "k": k,
                                       "expansion": e, "policy": policy}, expanded)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="512,2048,8192", help="context tokens")
    ap.add_argument("--ks", default="8,16,32")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--model", default="refrag-k16")
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--quant", default="none", help="decoder weights: none (float32, packed on CPU), int8, int4")
    ap.add_argument("--compile", action="store_true", help="compiled decode step (AOTInductor on CPU)")
    ap.add_argument("--expansions", default="", help="expansion fractions for more precomputed rows, e.g. 0.25")
    ap.add_argument("--policy", default="similarity", help="the expansion policy of those rows")
    ap.add_argument("--name", default="refrag-speed")
    a = ap.parse_args()
    settings = Settings()
    if a.threads:
        torch.set_num_threads(a.threads)
    device, dtype = a.device or settings.device, a.dtype or settings.dtype
    folder = resolve_refrag(a.model)
    backbone = load_backbone(resolve_backbone(RefragConfig.load(folder).backbone), home=settings.home / "cache",
                             device=device, dtype=dtype)
    refrag = load_refrag(folder, home=settings.home / "cache", backbone=backbone)
    apply_speed_options(refrag.model, quant=a.quant, compile=a.compile, cache_dir=settings.home / "cache" / "aot")
    print(f"decoder: {decode_path(refrag.model)}")
    sync = torch.cuda.synchronize if backbone.device.type == "cuda" else (lambda: None)
    data = a.data or settings.data_path()
    text = "\n\n".join(p.read_text() for p in sorted((data / "text/pg-essays").glob("*.txt"))[:20])
    ks = [int(x) for x in a.ks.split(",")]
    rows = []
    for size in [int(x) for x in a.sizes.split(",")]:
        passages = fitting(refrag, chunks_of(refrag.tokenizer, text, size), a.new_tokens)
        context = sum(len(ids) for ids in refrag.tokenizer.encode_batch(passages, add_bos=False))
        systems = systems_for(refrag, passages, ks, [float(x) for x in a.expansions.split(",") if x], a.policy)
        for _, fn in systems.values():  # warm-up
            run(refrag.model, fn, 2, sync)
        got: dict[str, list] = {name: [] for name in systems}
        for _ in range(a.repeat):
            for name, (_, fn) in systems.items():
                got[name].append(run(refrag.model, fn, a.new_tokens, sync))
        full_ttft = statistics.median(g[0] for g in got["full-context"])
        for name, (meta, _) in systems.items():
            ttft = statistics.median(g[0] for g in got[name])
            dec = statistics.median(g[1] for g in got[name])
            rows.append(meta | {"context_tokens": size, "passage_tokens": context, "passages": len(passages),
                                "prompt_positions": got[name][0][2],
                                "ttft_ms": round(1000 * ttft, 2), "ttft_speedup": round(full_ttft / ttft, 3),
                                "decode_tokens_per_s": round((a.new_tokens - 1) / dec, 2) if dec > 0 else None,
                                "new_tokens": a.new_tokens, "repeat": a.repeat,
                                "decoder": decode_path(refrag.model)})
            mode = meta["mode"] + (f" x{meta['expansion']:g}" if "expansion" in meta else "")
            print(f"{context:>6} {meta['system']:<14} {mode:<30} positions {got[name][0][2]:>5}  "
                  f"ttft {1000 * ttft:8.1f} ms  x{full_ttft / ttft:5.2f}  "
                  f"decode {rows[-1]['decode_tokens_per_s']} tok/s")
    device = device_name(str(backbone.device))
    out = write_results(a.name, rows, device)
    plot(rows, RESULTS / f"{a.name}.png", device)
    print(f"wrote {out}")


def plot(rows: list[dict], path: Path, device: str) -> None:
    """Time to first token per context size, one bar per system (log scale), speedups over full context."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["passage_tokens"] for r in rows})
    systems = list(dict.fromkeys((r["system"], r["mode"], r.get("expansion")) for r in rows))
    fig, ax = plt.subplots(figsize=(9, 3.8))
    width = 0.8 / len(systems)
    for i, (system, mode, e) in enumerate(systems):
        got = {r["passage_tokens"]: r for r in rows
               if (r["system"], r["mode"], r.get("expansion")) == (system, mode, e)}
        xs = [j + i * width for j, s in enumerate(sizes) if s in got]
        label = system if mode == "full" else f"{system} ({mode.split('-')[1]}" + (f", {e:g} expanded)" if e else ")")
        bars = ax.bar(xs, [got[s]["ttft_ms"] for s in sizes if s in got], width, label=label)
        if mode != "full":
            ax.bar_label(bars, labels=[f"{got[s]['ttft_speedup']:.1f}x" for s in sizes if s in got], fontsize=6)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(sizes))], [f"{s} context tokens" for s in sizes])
    ax.set_yscale("log")
    ax.set_ylabel("time to first token, ms")
    ax.legend(fontsize=6, ncol=2)
    ax.set_title(f"REFRAG time to first token (bars: speedup over full context)\n{device}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
