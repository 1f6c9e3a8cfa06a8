"""REFRAG speed: time-to-first-token and decode tokens/s of compressed prompts (k = 8 / 16 / 32) against the
full-context token prompt, same decoder, same passages, one run, at each context size.

Passages: Paul Graham essays cut into 128-token chunks (like retrieved chunks) until the context size is reached;
one question. Systems per size:
  full-context            tokens -> prefill -> first token (the plain backbone path)
  refrag-kK precomputed   block vectors stored at index time: projector + prefill over the compressed prompt
  refrag-kK encode        the same, plus encoding every block with the chunk encoder at request time
TTFT is prompt assembly + prefill + the first sampled token; decode tokens/s is over the next --new-tokens tokens
(no stop token, so every system decodes the same number). Repetitions are interleaved across systems.
Writes bench/results/NAME.json.

    python bench/refrag.py [--sizes 512,2048] [--ks 8,16,32] [--new-tokens 32] [--repeat 3] [--threads 2]
                           [--device cpu] [--model refrag-k16] [--name refrag-speed]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import device_name, write_results  # noqa: E402
from sieve.backbone import load_backbone  # noqa: E402
from sieve.backbone.generate import decode_one_token  # noqa: E402
from sieve.refrag import Refrag, load_refrag  # noqa: E402
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
    """-> (seconds to the first token, seconds for the next new_tokens - 1 tokens, prompt positions)."""
    t0 = time.perf_counter()
    embeds = embeds_fn()
    t = embeds.shape[1]
    model.setup_caches(1, min(model.args.max_seq_len, -(-(t + new_tokens) // 256) * 256))
    logits = model(inputs_embeds=embeds, input_pos=0, return_hidden=False,
                   logits_at=torch.tensor([t - 1], device=embeds.device)).logits[:, -1]
    token = logits.argmax(-1)
    sync()
    t1 = time.perf_counter()
    for i in range(new_tokens - 1):
        token = decode_one_token(model, token, None, t + i).argmax(-1)
    sync()
    return t1 - t0, time.perf_counter() - t1, t


def systems_for(refrag: Refrag, passages: list[str], ks: list[int]) -> dict[str, tuple[dict, object]]:
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
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="512,2048", help="context tokens (8192 too on a GPU)")
    ap.add_argument("--ks", default="8,16,32")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--model", default="refrag-k16")
    ap.add_argument("--data", type=Path, default=None)
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
    sync = torch.cuda.synchronize if backbone.device.type == "cuda" else (lambda: None)
    data = a.data or settings.data_path()
    text = "\n\n".join(p.read_text() for p in sorted((data / "text/pg-essays").glob("*.txt"))[:20])
    ks = [int(x) for x in a.ks.split(",")]
    rows = []
    for size in [int(x) for x in a.sizes.split(",")]:
        passages = chunks_of(refrag.tokenizer, text, size)
        systems = systems_for(refrag, passages, ks)
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
            rows.append(meta | {"context_tokens": size, "passages": len(passages), "prompt_positions": got[name][0][2],
                                "ttft_ms": round(1000 * ttft, 2), "ttft_speedup": round(full_ttft / ttft, 3),
                                "decode_tokens_per_s": round((a.new_tokens - 1) / dec, 2) if dec > 0 else None,
                                "new_tokens": a.new_tokens, "repeat": a.repeat})
            print(f"{size:>6} {meta['system']:<14} {meta['mode']:<24} positions {got[name][0][2]:>5}  "
                  f"ttft {1000 * ttft:8.1f} ms  x{full_ttft / ttft:5.2f}  "
                  f"decode {rows[-1]['decode_tokens_per_s']} tok/s")
    out = write_results(a.name, rows, device_name(str(backbone.device)))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
