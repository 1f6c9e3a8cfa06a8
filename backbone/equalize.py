"""Activation-aware channel equalization before per-output-channel int8 (AWQ / SmoothQuant style), data-free.

Per-output-channel int8 gives each weight row one step, set by its largest entry. Input channels that carry large
activations make the biggest output errors, so scaling their weight columns up by c_j (and the activations down by
1/c_j) lets the row's grid spend its resolution where it matters. With c_j = rms(x_j) ** alpha the product stays
exactly the same in float; only the rounding moves. The 1/c_j is folded into whatever makes x, so nothing is added
to the forward pass:

    wqkv, w13   inputs are RMSNorm outputs: divide the norm's weight by c
    wo          input is the attention output, a mix of v rows: divide wqkv's v rows by c (per kv head channel)
    w2          input is silu(gate) * up: divide w13's up rows by c

Row scaling of the producer is free under per-output-channel quantization (its row scale absorbs it), so only
the consumer's rounding changes. The activation statistics come from text the model samples itself from random
start tokens (no dataset needed, any backbone), and are cached per weights digest, so only the first int8 load
pays for them (about 30 s on 2 CPU cores for SmolLM2-135M).

Measured on SmolLM2-135M (Q4_1 GGUF dequantized), 12 x 512 tokens of Gutenberg text, against the float model:
argmax flips 3.43% -> 2.69% of positions, KL 3.1e-3 -> 1.8e-3 (alpha 0.25; 0.5 was worse: 3.30%, 3.1e-3).
GPTQ on top of the equalized weights gave 2.67-2.78% / 1.7-1.8e-3 for 4x the time, and GPTQ alone 3.45%: not kept.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .aot import hash_state
from .generate import generate
from .model import Transformer

ALPHA = 0.25
CALIBRATION_SEQUENCES = 8
CALIBRATION_TOKENS = 256
VERSION = "1"  # of the calibration recipe; part of the cache key


def calibration_text(model: Transformer, *, sequences: int = CALIBRATION_SEQUENCES,
                     tokens: int = CALIBRATION_TOKENS, seed: int = 0) -> list[list[int]]:
    """Token sequences the model samples itself (temperature 1, top-p 0.95) from random start tokens."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, model.args.vocab_size, (sequences,), generator=g).tolist()
    with torch.inference_mode():
        out = generate(model, [[t] for t in starts], max_new_tokens=tokens - 1, temperature=1.0, top_p=0.95,
                       generator=g)
    return [[s, *o] for s, o in zip(starts, out)]


def input_rms(model: Transformer, sequences: list[list[int]]) -> dict[str, torch.Tensor]:
    """Root mean square of every input channel of each layer's wqkv, wo, w13 and w2 over the sequences."""
    sums: dict[str, torch.Tensor] = {}
    count = 0
    hooks = []
    for i, layer in enumerate(model.layers):
        for name, mod in (("wqkv", layer.attention.wqkv), ("wo", layer.attention.wo),
                          ("w13", layer.feed_forward.w13), ("w2", layer.feed_forward.w2)):
            key = f"layers.{i}.{name}"
            sums[key] = torch.zeros(mod.in_features, dtype=torch.float64)

            def hook(_mod, args, key=key):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                sums[key] += (x * x).sum(0)

            hooks.append(mod.register_forward_pre_hook(hook))
    try:
        with torch.inference_mode():
            for seq in sequences:
                model(torch.tensor([seq]), return_logits=False)
                count += len(seq)
    finally:
        for h in hooks:
            h.remove()
    return {k: (v / count).sqrt().float() for k, v in sums.items()}


def channel_scales(rms: torch.Tensor, alpha: float = ALPHA) -> torch.Tensor:
    """c = rms ** alpha, normalized to a geometric mean of 1 between its extremes (keeps weights in range)."""
    c = rms.clamp(min=1e-6) ** alpha
    return c / (c.max() * c.min()).sqrt()


@torch.no_grad()
def equalize(model: Transformer, rms: dict[str, torch.Tensor], alpha: float = ALPHA) -> None:
    """Fold activation-aware column scales into each layer's float weights, in place; the function is unchanged.
    Call before `quantize(model, "int8")`."""
    a = model.args
    group = a.n_heads // a.n_kv_heads
    for i, layer in enumerate(model.layers):
        att, ff = layer.attention, layer.feed_forward
        # wo's input channel (head h, dim d) comes from v row (h // group, d): one scale per kv channel
        kv = rms[f"layers.{i}.wo"].view(a.n_kv_heads, group, a.head_dim).pow(2).mean(1).sqrt().reshape(-1)
        c = channel_scales(kv, alpha)
        v_rows = slice(a.q_size + a.kv_size, a.q_size + 2 * a.kv_size)
        att.wqkv.weight[v_rows] /= c[:, None]
        if att.wqkv.bias is not None:
            att.wqkv.bias[v_rows] /= c
        att.wo.weight *= c.view(a.n_kv_heads, 1, a.head_dim).expand(-1, group, -1).reshape(1, -1)

        c = channel_scales(rms[f"layers.{i}.w2"], alpha)
        ff.w13.weight[ff.hidden:] /= c[:, None]
        ff.w2.weight *= c[None, :]

        for norm, lin, key in ((layer.attention_norm, att.wqkv, "wqkv"), (layer.ffn_norm, ff.w13, "w13")):
            c = channel_scales(rms[f"layers.{i}.{key}"], alpha)
            norm.weight /= c
            lin.weight *= c[None, :]
    model.equalized_alpha = alpha  # shown by `quant_summary` (sieve info)


def weights_digest(model: Transformer) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{VERSION} {CALIBRATION_SEQUENCES}x{CALIBRATION_TOKENS} {model.args!r}".encode())
    hash_state(h, model)
    return h.hexdigest()


def calibrated_rms(model: Transformer, cache_dir: Path | None = None) -> dict[str, torch.Tensor]:
    """`input_rms` over `calibration_text`, from `cache_dir` when this model's weights were calibrated before."""
    path = cache_dir / f"int8-rms-{weights_digest(model)}.safetensors" if cache_dir is not None else None
    if path is not None and path.exists():
        return load_file(path)
    rms = input_rms(model, calibration_text(model))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in rms.items()}, tmp)
        tmp.replace(path)
    return rms
