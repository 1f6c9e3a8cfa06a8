"""The llama-family decoder (SmolLM2, Llama, Qwen2), all of it in this file.

RMSNorm, RoPE (model's theta and scaling), grouped-query attention, SwiGLU, optionally tied embeddings.
Weights use HF's q/k layout (`rotate_half` RoPE); loaders convert other layouts (GGUF) into it.
Attention is chosen per call by mode name (see attention.py). `setup_caches()` attaches a static KV cache,
separate from construction, as in gpt-fast. Module names match the cached checkpoint's keys.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import AttentionContext, get_attention_mode
from .config import ModelArgs
from .rope import apply_rope, inv_frequencies, rope_cos_sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch's fused kernel (one pass, no float32 temporaries) computes in float32 for half inputs too
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class KVCache(nn.Module):
    """Static per-layer cache: [B, Hkv, L, D] buffers, written in place at a position offset."""

    def __init__(self, max_batch: int, max_len: int, n_kv_heads: int, head_dim: int, dtype, device=None):
        super().__init__()
        shape = (max_batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # k, v: [B, Hkv, T, D] -> views of the filled prefix [B, Hkv, start + T, D]
        b, _, t, _ = k.shape
        end = start + t
        if end > self.k.shape[2] or b > self.k.shape[0]:
            raise ValueError(f"KV cache holds {self.k.shape[0]}x{self.k.shape[2]}, asked for {b}x{end}")
        self.k[:b, :, start:end] = k
        self.v[:b, :, start:end] = v
        return self.k[:b, :, :end], self.v[:b, :, :end]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wqkv = nn.Linear(args.dim, args.q_size + 2 * args.kv_size, bias=args.attention_bias)
        self.wo = nn.Linear(args.q_size, args.dim, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x, cos, sin, ctx: AttentionContext, attn_fn) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.wqkv(x).split([self.n_heads * self.head_dim, *[self.n_kv_heads * self.head_dim] * 2], -1)
        q = q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        k = k.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        v = v.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if ctx.use_cache:
            k, v = self.kv_cache.update(ctx.q_offset, k, v)
        y = attn_fn(q, k, v, ctx)  # [B, H, T, D]
        return self.wo(y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))

    def decode(self, x, cos, sin, slot: torch.Tensor, key_mask: torch.Tensor,
               kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """One token per row with static shapes: x [B, 1, dim]; K/V go to slot `slot` ([1] long) of the cache
        tensors `kv` ([Bc, Hkv, Lc, D] each) and the query attends to the first L = key_mask.shape[1] slots where
        key_mask [B, L] is True."""
        b = x.shape[0]
        q, k, v = self.wqkv(x).split([self.n_heads * self.head_dim, *[self.n_kv_heads * self.head_dim] * 2], -1)
        q = apply_rope(q.view(b, 1, self.n_heads, self.head_dim).transpose(1, 2), cos, sin)
        k = apply_rope(k.view(b, 1, self.n_kv_heads, self.head_dim).transpose(1, 2), cos, sin)
        v = v.view(b, 1, self.n_kv_heads, self.head_dim).transpose(1, 2)
        cache_k, cache_v = kv
        cache_k[:b, :, slot] = k
        cache_v[:b, :, slot] = v
        length = key_mask.shape[1]
        keys, values = cache_k[:b, :, :length], cache_v[:b, :, :length]  # [B, Hkv, L, D]
        # query head h reads kv head h // group (as SDPA's GQA); not SDPA: its CPU kernel costs ~50 us a call for
        # one query row. Compiled (torch.compile, AOTInductor), broadcast products and sums, which the compiler fuses
        # into two loops (7.4 vs 7.5 ms a step with matmuls, int4, 256 slots, 2 cores); eager, matmuls, which do
        # not materialise [B, Hkv, group, L, D] products (18.9 vs 66.5 ms of attention a step at 8,192 slots)
        q = q.reshape(b, self.n_kv_heads, -1, self.head_dim)  # [B, Hkv, group, D]
        fused = torch.compiler.is_compiling()
        scores = (q[:, :, :, None] * keys[:, :, None]).sum(-1) if fused else q @ keys.transpose(-1, -2)
        scores = scores.float().masked_fill(~key_mask[:, None, None, :], float("-inf")) * self.head_dim ** -0.5
        probs = scores.softmax(-1)  # [B, Hkv, group, L]
        y = (probs[..., None] * values[:, :, None]).sum(-2) if fused else probs @ values.to(probs.dtype)
        y = y.to(x.dtype).reshape(b, 1, self.n_heads * self.head_dim)
        return self.wo(y)


class FeedForward(nn.Module):
    """SwiGLU with gate and up projections fused into one matmul (`w13`)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.hidden = args.intermediate_size
        self.w13 = nn.Linear(args.dim, 2 * args.intermediate_size, bias=False)
        self.w2 = nn.Linear(args.intermediate_size, args.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).split(self.hidden, -1)
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args)

    def forward(self, x, cos, sin, ctx, attn_fn) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, ctx, attn_fn)
        return h + self.feed_forward(self.ffn_norm(h))

    def decode(self, x, cos, sin, slot, key_mask, kv) -> torch.Tensor:
        h = x + self.attention.decode(self.attention_norm(x), cos, sin, slot, key_mask, kv)
        return h + self.feed_forward(self.ffn_norm(h))


@dataclass
class ModelOutput:
    hidden_states: torch.Tensor | None  # [B, T, dim], after the final norm
    logits: torch.Tensor | None  # [B, T or len(logits_at), vocab], float32


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.register_buffer(
            "inv_freq", inv_frequencies(args.head_dim, args.rope_theta, args.rope_scaling), persistent=False
        )
        self.tie_weights()
        self.cache_shape: tuple[int, int] | None = None
        self.rope_tables: tuple[torch.Tensor, torch.Tensor] | None = None  # made with the KV cache
        self.decode_output: nn.Module | None = None  # a decode-only LM head (see quant.quantize); None: `output`
        self.exact_topk = 0  # rescore this many best candidates of a low-bit head exactly (see `head`)

    def tie_weights(self) -> None:
        if self.args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def reset_rope(self) -> None:
        """(Re)compute the RoPE frequencies in float32 on the weights' device (after meta init or a dtype cast)."""
        a = self.args
        self.inv_freq = inv_frequencies(a.head_dim, a.rope_theta, a.rope_scaling).to(self.tok_embeddings.weight.device)
        self.clear_caches()  # their RoPE tables came from the old frequencies

    def setup_caches(self, max_batch_size: int, max_seq_length: int, *, exact: bool = False) -> None:
        """Allocate (or reuse, if big enough) a static KV cache; forward calls with `input_pos` use it.
        exact: reuse only a cache of exactly this shape (an ahead-of-time compiled decode step, see aot.py, is
        built for one cache shape)."""
        if self.cache_shape and (self.cache_shape == (max_batch_size, max_seq_length) or not exact and (
                self.cache_shape[0] >= max_batch_size and self.cache_shape[1] >= max_seq_length)):
            return
        if max_seq_length > self.args.max_seq_len:
            raise ValueError(f"{max_seq_length} tokens exceed the model's context of {self.args.max_seq_len}")
        ref = self.tok_embeddings.weight
        with torch.inference_mode(False):  # plain tensors: usable in and out of inference mode
            for layer in self.layers:
                layer.attention.kv_cache = KVCache(
                    max_batch_size, max_seq_length, self.args.n_kv_heads, self.args.head_dim, ref.dtype, ref.device
                )
            # cos/sin of every cache position (decode_step reads its rows)
            cos, sin = rope_cos_sin(torch.arange(max_seq_length, device=ref.device)[None], self.inv_freq, torch.float32)
            self.rope_tables = (cos[0, 0], sin[0, 0])  # [L, D] each
        self.cache_shape = (max_batch_size, max_seq_length)

    def cache_tensors(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The attached KV cache as per-layer (k, v) tensors [B, Hkv, L, D] (see setup_caches)."""
        if self.cache_shape is None:
            raise ValueError("no KV cache: call setup_caches() first")
        return [(layer.attention.kv_cache.k, layer.attention.kv_cache.v) for layer in self.layers]

    def clear_caches(self) -> None:
        for layer in self.layers:
            layer.attention.kv_cache = None
        self.cache_shape = None
        self.rope_tables = None

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        mode: str = "causal",
        input_pos: int | None = None,
        return_hidden: bool = True,
        return_logits: bool = True,
        logits_at: torch.Tensor | None = None,
    ) -> ModelOutput:
        """One forward pass.

        input_ids [B, T] or inputs_embeds [B, T, dim] (exactly one).
        attention_mask [B, K] with 1 for real tokens; K = T, or input_pos + T when a cache is used
            (the mask of everything the cache holds, then this call's tokens). None: no padding.
        position_ids [B, T]: default counts real tokens only (cumsum of the mask), so left or right padding
            gives a sequence the same positions it has alone.
        mode: an attention mode name ("causal", "bidirectional", or one registered by kernels).
        input_pos: write K/V into the cache from this offset and attend to everything before it
            (needs setup_caches); None: no cache.
        logits_at [B] positions whose logits to return ([B, 1, vocab]); None: every position.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        x = self.tok_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        b, t, _ = x.shape
        if input_pos is not None and self.cache_shape is None:
            raise ValueError("input_pos given but no KV cache: call setup_caches() first")
        offset = input_pos or 0
        attention = get_attention_mode(mode)

        key_padding = None
        if attention_mask is not None:
            if attention_mask.shape != (b, offset + t):
                raise ValueError(f"attention_mask is {tuple(attention_mask.shape)}, expected {(b, offset + t)}")
            key_padding = attention_mask.bool()
            if bool(key_padding.all()):
                key_padding = None
        if position_ids is None:
            if attention_mask is None:
                position_ids = torch.arange(offset, offset + t, device=x.device).expand(b, t)
            else:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, offset:]
        cos, sin = rope_cos_sin(position_ids, self.inv_freq, x.dtype)
        ctx = AttentionContext(
            causal=attention.causal, q_len=t, q_offset=offset, key_padding=key_padding,
            use_cache=input_pos is not None, device=x.device,
        )

        for layer in self.layers:
            x = layer(x, cos, sin, ctx, attention.fn)
        x = self.norm(x)

        logits = None
        if return_logits:
            h = x if logits_at is None else x[torch.arange(b, device=x.device), logits_at][:, None]
            logits = self.head(h)
        return ModelOutput(hidden_states=x if return_hidden else None, logits=logits)

    def decode_step(self, tokens: torch.Tensor, positions: torch.Tensor, slot: torch.Tensor,
                    key_mask: torch.Tensor, caches: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None
                    ) -> torch.Tensor:
        """One decoding step whose shapes depend only on (B, L), so it can be compiled once and replayed.

        tokens [B] long, written to KV-cache slot `slot` ([1] long tensor); positions [B] their RoPE positions
        (rows of a left-padded batch differ); key_mask [B, L] bool, the cache slots each row attends to (its own
        real tokens up to and including `slot`); caches: per layer (k, v) cache tensors, by default the ones
        `setup_caches` attached (an exported step takes them as inputs, see aot.py).
        -> next-token logits [B, vocab] float32.
        Same numbers as `forward(tokens[:, None], input_pos=slot, ...)`, without building masks and contexts
        per call (see generate.stream).
        """
        if caches is None:
            caches = self.cache_tensors()
        x = self.tok_embeddings(tokens)[:, None]  # [B, 1, dim]
        # RoPE rows looked up, not computed: in a compiled step cos/sin computed here get fused into the attention
        # loop and re-evaluated for every cache slot (16% of an int4 step at 256 slots)
        cos, sin = (t[positions].to(x.dtype)[:, None, None] for t in self.rope_tables)  # [B, 1, 1, D]
        for layer, kv in zip(self.layers, caches, strict=True):
            x = layer.decode(x, cos, sin, slot, key_mask, kv)
        return self.head(self.norm(x), decode=True)[:, 0]

    def head(self, h: torch.Tensor, *, decode: bool = False) -> torch.Tensor:
        """LM head -> float32 logits (`decode`: the decode-only head when there is one). With a low-bit head
        (`quantize`), the `exact_topk` best candidates are rescored against the float embedding table, so greedy
        picks between near-ties are made as fp32 makes them, for the cost of k dot products."""
        out = self.decode_output if decode and self.decode_output is not None else self.output
        logits = out(h).float()
        k = self.exact_topk
        if k:
            top = logits.topk(k, dim=-1).indices  # [..., k]
            exact = (self.tok_embeddings.weight[top] * h[..., None, :]).sum(-1).float()
            logits = logits.scatter(-1, top, exact)
        return logits

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # shared (tied) tensors count once
