"""Token-level generation with a static KV cache: prefill, decode_one_token, sample, and a streaming loop.

The engine knows nothing about text: prompts are token id lists. Prompts of different lengths are
left-padded into one batch; the attention mask keeps padding out and gives every row its own positions,
so a prompt decodes the same alone or batched. Each row stops on its own stop tokens; the loop ends when all
rows stopped or `max_new_tokens` is reached.

A logits processor `fn(generated [B, t] long, logits [B, V] float32) -> logits` runs before sampling each
step (`generated` holds the tokens emitted so far, t may be 0); the reranker constrains decoding with it.
A processor that also has `forced_tokens(generated [1, t]) -> list[int]` (the tokens that are now the only
possible continuation, which it takes as emitted) gets jump-forward decoding for a single prompt: those tokens are
yielded without sampling and run through the model in one forward with the token before them, so a constrained
format costs one forward per real choice instead of one per token.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .aot import AotDecodeStep
from .model import Transformer

LogitsProcessor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Step:
    """One decoding step for the whole batch."""

    tokens: torch.Tensor  # [B] long: the token each row emitted this step (rows already finished repeat pad)
    finished: torch.Tensor  # [B] bool: row has stopped (this step's token was a stop token, or earlier)
    active: torch.Tensor  # [B] bool: row emitted a real token this step (it had not stopped before)
    forced: bool = False  # a jump-forward token: not sampled, and run through the model with the tokens around it


def sample(
    logits: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits [B, V] -> token ids [B]. temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """-> input_ids [B, T], attention_mask [B, T] (None when all prompts have the same length)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids, (None if bool(mask.all()) else mask)


def prefill(model: Transformer, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
            mode: str = "causal") -> torch.Tensor:
    """Run the prompt through the model, filling the cache from 0; -> last-position logits [B, V].
    `mode` is the attention mode of this pass (e.g. "sparse" for long prompts); decoding steps stay causal."""
    last = torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, device=input_ids.device)
    out = model(input_ids, attention_mask=attention_mask, input_pos=0, return_hidden=False, logits_at=last,
                mode=mode)
    return out.logits[:, -1]


def decode_one_token(
    model: Transformer, tokens: torch.Tensor, attention_mask: torch.Tensor | None, pos: int
) -> torch.Tensor:
    """tokens [B] at cache slot `pos` -> next logits [B, V] (the general forward; `stream` uses decode_step)."""
    out = model(tokens[:, None], attention_mask=attention_mask, input_pos=pos, return_hidden=False)
    return out.logits[:, -1]


@torch.inference_mode()
def stream(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    stop_tokens: Sequence[int] = (),
    pad_id: int = 0,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    logits_processor: LogitsProcessor | None = None,
    generator: torch.Generator | None = None,
    prefill_mode: str = "causal",
) -> Iterator[Step]:
    """Prefill the prompts, then decode with `model.decode_step` (or its compiled form, see `compile_decode`).

    Every decoding step has the same tensor shapes ([B] tokens, [B, L] key mask over a cache of L slots), so
    the step runs without per-call mask building and a compiled step is reused across steps and calls.
    """
    device = model.tok_embeddings.weight.device
    input_ids, mask = left_pad(prompts, pad_id)
    input_ids = input_ids.to(device)
    b, t = input_ids.shape
    max_new_tokens = min(max_new_tokens, model.args.max_seq_len - t)
    if max_new_tokens <= 0:
        raise ValueError(f"prompt of {t} tokens leaves no room in the model's {model.args.max_seq_len}-token context")
    cursor = DecodeCursor.start(model, mask.to(device) if mask is not None else torch.ones_like(input_ids),
                                t + max_new_tokens)

    stop = torch.tensor(sorted(set(stop_tokens)), dtype=torch.long, device=device)
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    generated = torch.empty((b, 0), dtype=torch.long, device=device)
    forced_tokens = getattr(logits_processor, "forced_tokens", None) if b == 1 else None
    logits = prefill(model, input_ids, mask.to(device) if mask is not None else None, prefill_mode)
    emitted = 0
    while True:
        if logits_processor is not None:
            logits = logits_processor(generated, logits)
        token = sample(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        active = ~finished
        token = torch.where(active, token, torch.full_like(token, pad_id))
        finished = finished | torch.isin(token, stop)
        yield Step(tokens=token, finished=finished.clone(), active=active)
        emitted += 1
        if bool(finished.all()) or emitted == max_new_tokens:
            return
        if logits_processor is not None:
            generated = torch.cat([generated, token[:, None]], dim=1)
        chunk = [token]
        for forced in forced_tokens(generated) if forced_tokens is not None else ():
            token = torch.tensor([forced], dtype=torch.long, device=device)
            finished = torch.isin(token, stop)
            yield Step(tokens=token, finished=finished.clone(), active=torch.ones_like(finished), forced=True)
            emitted += 1
            if bool(finished.all()) or emitted == max_new_tokens:
                return
            generated = torch.cat([generated, token[:, None]], dim=1)
            chunk.append(token)
        logits = cursor.step(token) if len(chunk) == 1 else cursor.extend(torch.stack(chunk, dim=1))


@dataclass
class DecodeCursor:
    """Where decoding stands after a prefill: the next cache slot, each row's next RoPE position, and the cache
    slots each row attends to. `step(tokens)` runs one `decode_step` (compiled when `compile_decode` made one)
    and moves on; every step has the same tensor shapes ([B] tokens, [B, L] key mask over the L-slot cache)."""

    model: Transformer
    step_fn: Callable[..., torch.Tensor]
    key_mask: torch.Tensor  # [B, L] bool
    positions: torch.Tensor  # [B] long
    slot: int

    @classmethod
    def start(cls, model: Transformer, prompt_mask: torch.Tensor, total: int) -> DecodeCursor:
        """Set up the cache for `total` tokens (prompt + new, rounded up) and a cursor after a prompt whose real
        tokens are `prompt_mask` [B, T] (1 = token, 0 = left padding); call before prefilling the prompt."""
        b, t = prompt_mask.shape
        if t >= model.args.max_seq_len:
            raise ValueError(f"prompt of {t} tokens leaves no room in the model's {model.args.max_seq_len}-token "
                             "context")
        length = _round_up(total, 256, model.args.max_seq_len)
        step_fn = decode_step_fn(model)
        model.setup_caches(b, length, exact=getattr(step_fn, "exact_cache", False))
        key_mask = torch.zeros((b, length), dtype=torch.bool, device=prompt_mask.device)
        key_mask[:, :t] = prompt_mask.bool()
        return cls(model, step_fn, key_mask, key_mask.sum(-1), t)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B] -> next logits [B, V]."""
        self.key_mask[:, self.slot] = True
        slot = torch.tensor([self.slot], device=tokens.device)
        logits = self.step_fn(tokens, self.positions, slot, self.key_mask)
        self.positions += 1
        self.slot += 1
        return logits

    def extend(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, m] (every row real) through one eager forward at the next m slots -> the last position's
        next logits [B, V]: what m calls of `step` give, for less (3 tokens at a 2,000-slot cache, float32 on 2
        cores: 113 ms against 3 x 65 ms)."""
        b, m = tokens.shape
        end = self.slot + m
        if end > self.key_mask.shape[1]:
            raise ValueError(f"{m} tokens at slot {self.slot} overflow the {self.key_mask.shape[1]}-slot cache")
        self.key_mask[:, self.slot:end] = True
        positions = self.positions[:, None] + torch.arange(m, device=tokens.device)
        out = self.model(tokens, attention_mask=self.key_mask[:, :end], position_ids=positions, input_pos=self.slot,
                         return_hidden=False, logits_at=torch.full((b,), m - 1, device=tokens.device))
        self.positions += m
        self.slot = end
        return out.logits[:, -1]


def decode_step_fn(model: Transformer) -> Callable[..., torch.Tensor]:
    """The model's compiled decode step when `compile_decode` made one, else the eager `model.decode_step`."""
    return getattr(model, "compiled_decode_step", None) or model.decode_step


def compile_decode(model: Transformer, *, backend: str = "auto", cache_dir: Path | None = None,
                   cpp_wrapper: bool = True, on_compile: Callable[[str], None] | None = None
                   ) -> Callable[..., torch.Tensor]:
    """Compile `model.decode_step` and attach it as `model.compiled_decode_step`; `stream` then uses it.

    backend "aot": AOTInductor, one library per (batch, cache length), compiled on the first call at a new shape
        (35-120 s on 2 cores, by host) and kept in `cache_dir` for later processes (see aot.py); no Python guards per
        step, so it is the faster on CPU (140.6 vs 120.3 tokens/s, int4, 2 cores). "inductor": torch.compile
        (recompiles at each new shape in each process; `cpp_wrapper` uses inductor's C++ wrapper).
        "auto": "aot" on CPU, "inductor" on CUDA.
    Quantized layers prepare their CPU-kernel layouts first, so no lazy initialisation happens inside the graph.
    """
    cpu = model.tok_embeddings.weight.device.type == "cpu"
    if backend == "auto":
        backend = "aot" if cpu else "inductor"
    if backend not in ("aot", "inductor"):
        raise ValueError(f"unknown decode compile backend {backend!r}: aot, inductor or auto")
    if cpu:
        for module in model.modules():
            prepare = getattr(module, "prepare_cpu", None)
            if callable(prepare):
                prepare()
    if backend == "aot":
        model.compiled_decode_step = AotDecodeStep(model, cache_dir, on_compile=on_compile)
    else:
        options = {"cpp_wrapper": True} if cpp_wrapper else None
        model.compiled_decode_step = torch.compile(model.decode_step, fullgraph=True, options=options)
    model.decode_backend = backend
    return model.compiled_decode_step


def generate(model: Transformer, prompts: Sequence[Sequence[int]], **kwargs) -> list[list[int]]:
    """Collect `stream`: per prompt, the generated ids up to and excluding its stop token."""
    stop = set(kwargs.get("stop_tokens", ()))
    out: list[list[int]] = [[] for _ in prompts]
    for step in stream(model, prompts, **kwargs):
        for row, (tok, active) in enumerate(zip(step.tokens.tolist(), step.active.tolist())):
            if active and tok not in stop:
                out[row].append(tok)
    return out


def _round_up(n: int, multiple: int, cap: int) -> int:
    return min(cap, -(-n // multiple) * multiple)
