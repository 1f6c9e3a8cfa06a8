"""Train a REFRAG model folder with the paper's curriculum, stage by stage, resumable from `checkpoint.pt`.

Stages (any subset, in this order):

- "recon"  reconstruction. Decoder frozen, chunk encoder frozen; only the projector learns. LM layout
           `<|endoftext|> [v1] ... [vn] x_1 ... x_{nk}`: the decoder must reproduce the n blocks' tokens from their
           vectors. Curriculum: n = 1 block for the first quarter of the steps, then 2, 4, then `recon_max_blocks`.
- "cpt"    continued pre-training: next-paragraph prediction. `cpt_context_tokens` of text compressed into blocks
           (a random fraction up to `expand_max` of them expanded, so mixed inputs are in distribution; with
           `expand_recency` that fraction of examples expands its last blocks, the recency policy's pattern), then the
           next `cpt_target_tokens` as tokens, loss on those. Projector learns; with `cpt_lora` a decoder LoRA too
           (the paper tunes the decoder here; off by default so the decoder stays shared with embed / rank).
- "sft"    task tuning: NQ-open oracle *train* portion, gold + BM25 distractor passages from the train portion's
           own pool, QA layout, loss on the answer + <|im_end|>. Projector + decoder LoRA (`sft_lora_r`).
           `sft_lm_mix` of each batch can be continued-pretraining windows instead (replay against forgetting).
- "policy" the learned expansion policy: for LM windows, the decoder's loss gain from expanding each block alone
           (all others compressed) is the label; `PolicyScorer` fits it with a listwise softmax loss.

The chunk encoder is frozen by default: index-time block vectors (workers) then never go stale when a projector is
retrained, and training skips the encoder's backward. `tune_encoder` trains it with the projector in "recon" and
"cpt", as the paper does; the model folder then carries its own encoder (`encoder/`, its own fingerprint), and
workers that precompute for that model use it. `init` starts from another model folder's projector, policy, decoder
LoRA and (tuned) encoder instead of from scratch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from sieve.backbone.lora import load_lora_state, lora_checkpoint_state, lora_parameters, lora_state

from .model import Refrag
from .model_dir import ADAPTER, LORA_TARGETS, POLICY, PROJECTOR, RefragConfig
from .projector import PolicyScorer, Projector
from .prompt import Layout, Segment, qa_layout

STAGES = ("recon", "cpt", "sft", "policy")


@dataclass
class TrainConfig:
    out: Path
    data_root: Path
    stages: list[str] = field(default_factory=lambda: ["recon", "cpt", "policy"])
    backbone: str = "smollm2-135m-instruct"
    encoder: str = "all-minilm-l6-v2"
    k: int = 16
    projector_hidden: int = 2048
    batch_size: int = 4
    lr: float = 1e-3  # projector and policy
    lora_lr: float = 2e-4
    warmup: int = 10
    recon_steps: int = 120
    recon_max_blocks: int = 8
    cpt_steps: int = 100
    cpt_context_tokens: int = 256
    cpt_target_tokens: int = 64
    cpt_lora: bool = False
    expand_max: float = 0.25
    expand_recency: float = 0.0  # cpt/sft: this fraction of examples expands its last blocks (recency's pattern)
    copy_weight: float = 0.0  # cpt/sft: extra loss weight on target tokens that occur in a compressed block
    tune_encoder: bool = False  # train the chunk encoder too (recon, cpt), at encoder_lr
    encoder_lr: float = 5e-5
    init: Path | None = None  # start from this model folder's weights (same k, shapes)
    sft_steps: int = 100
    sft_docs: int = 5
    sft_lm_mix: float = 0.0  # task tuning: this fraction of each batch is continued-pretraining windows (replay)
    lora_r: int = 8
    lora_alpha: float = 16.0
    policy_examples: int = 24
    policy_epochs: int = 200
    policy_hidden: int = 64
    sources: dict[str, float] = field(default_factory=lambda: {"essays": 0.3, "books": 0.3, "wikitext2-valid": 0.4})
    dtype: str = "float32"  # autocast dtype on top of the float32 weights ("bfloat16" on a GPU)
    seed: int = 0
    save_every: int = 20
    val_windows: int = 8


# ------------------------------------------------------------------------------------------------ loss


def copy_weights(layout: Layout, expand: set[int], n_target: int, copy_weight: float) -> list[float]:
    """Per target token: 1 + copy_weight where the token occurs in a block fed compressed (the decoder can only
    copy it through that block's vector), else 1."""
    compressed = {t for i, b in enumerate(layout.blocks) if i not in expand for t in b.token_ids}
    return [1.0 + copy_weight * (t in compressed) for t in layout.segments[-1].token_ids[-n_target:]]


def lm_loss(refrag: Refrag, batch: list[tuple[Layout, set[int], int]], amp, copy_weight: float = 0.0) -> torch.Tensor:
    """Mean next-token loss over each example's last `n_target` tokens (the last segment of its layout); with
    `copy_weight`, a weighted mean that counts tokens copyable from compressed blocks 1 + copy_weight times."""
    model = refrag.model
    embeds = [refrag.embed(layout, expand)[0] for layout, expand, _ in batch]
    width = max(e.shape[0] for e in embeds)
    dim = embeds[0].shape[1]
    x = torch.zeros(len(batch), width, dim, dtype=embeds[0].dtype, device=embeds[0].device)
    mask = torch.zeros(len(batch), width, dtype=torch.long, device=x.device)
    rows, cols, targets = [], [], []
    for i, (e, (layout, _, n_target)) in enumerate(zip(embeds, batch)):
        t = e.shape[0]
        x[i, :t] = e
        mask[i, :t] = 1
        rows += [i] * n_target
        cols += list(range(t - n_target - 1, t - 1))
        targets += layout.segments[-1].token_ids[-n_target:]
    with amp:
        hidden = model(inputs_embeds=x, attention_mask=None if bool(mask.all()) else mask,
                       return_logits=False).hidden_states
        logits = model.output(hidden[torch.tensor(rows), torch.tensor(cols)]).float()
    targets = torch.tensor(targets, device=logits.device)
    if not copy_weight:
        return F.cross_entropy(logits, targets)
    w = torch.tensor([x for layout, expand, n in batch for x in copy_weights(layout, expand, n, copy_weight)],
                     device=logits.device)
    return (F.cross_entropy(logits, targets, reduction="none") * w).sum() / w.sum()


def random_expansion(n_blocks: int, p_max: float, rng: random.Random) -> set[int]:
    m = math.floor(rng.uniform(0, p_max) * n_blocks + 0.5)
    return set(rng.sample(range(n_blocks), m)) if m else set()


def training_expansion(n_blocks: int, cfg: TrainConfig, rng: random.Random,
                       pattern_rng: random.Random | None = None) -> set[int]:
    """Blocks to expand in one training example: a random fraction up to `expand_max`, at random places; with
    probability `expand_recency` (drawn from `pattern_rng`) the same number of blocks at the end instead, the
    recency policy's pattern, so that serving pattern is in distribution too. `rng` draws the same numbers either
    way, so runs that differ only in `expand_recency` see the same windows and the same expansion counts."""
    chosen = random_expansion(n_blocks, cfg.expand_max, rng)
    if cfg.expand_recency and pattern_rng is not None and pattern_rng.random() < cfg.expand_recency:
        return set(range(n_blocks - len(chosen), n_blocks))
    return chosen


# ------------------------------------------------------------------------------------------------ batches


def recon_example(refrag: Refrag, sampler, n_blocks: int, k: int) -> tuple[Layout, set[int], int]:
    ids = sampler.sample(n_blocks * k)
    ctx = refrag.encode_ids([ids], k)[0]
    layout = refrag.lm_layout(ctx, ids)
    return layout, set(), len(ids)


def cpt_example(refrag: Refrag, sampler, cfg: TrainConfig, rng: random.Random,
                pattern_rng: random.Random | None = None) -> tuple[Layout, set[int], int]:
    ids = sampler.sample(cfg.cpt_context_tokens + cfg.cpt_target_tokens)
    ctx_ids, target = ids[: -cfg.cpt_target_tokens], ids[-cfg.cpt_target_tokens:]
    ctx = refrag.encode_ids([ctx_ids], cfg.k)[0]
    return refrag.lm_layout(ctx, target), training_expansion(ctx.n_blocks, cfg, rng, pattern_rng), len(target)


def sft_example(refrag: Refrag, ex, cfg: TrainConfig, rng: random.Random,
                pattern_rng: random.Random | None = None) -> tuple[Layout, set[int], int]:
    passages = refrag.encode(ex.passages, cfg.k)
    layout = qa_layout(refrag.tokenizer, ex.question, passages)
    answer = refrag.tokenizer.encode(ex.answers[0], add_bos=False) + refrag.tokenizer.eos_ids[:1]
    layout.segments.append(Segment(answer))
    return layout, training_expansion(len(layout.blocks), cfg, rng, pattern_rng), len(answer)


def sft_batch(refrag: Refrag, nq: list, sampler, cfg: TrainConfig, rng: random.Random,
              pattern_rng: random.Random | None = None) -> list:
    """One task-tuning batch: QA examples, each replaced with probability `sft_lm_mix` by a continued-pretraining
    window (replay), so the decoder LoRA keeps its language modelling while it learns the QA layout. At mix 0 no
    random number is drawn for the choice, so earlier task-tuning runs replay exactly with the same seed."""
    return [cpt_example(refrag, sampler, cfg, rng, pattern_rng) if cfg.sft_lm_mix and rng.random() < cfg.sft_lm_mix
            else sft_example(refrag, rng.choice(nq), cfg, rng, pattern_rng) for _ in range(cfg.batch_size)]


def recon_blocks(step: int, steps: int, max_blocks: int) -> int:
    levels = sorted({1, min(2, max_blocks), min(4, max_blocks), max_blocks})
    return levels[min(len(levels) - 1, step * len(levels) // max(steps, 1))]


# ------------------------------------------------------------------------------------------------ training


def train(cfg: TrainConfig, *, home: Path, device: str = "auto", progress: bool = True) -> dict:
    from peft import LoraConfig, inject_adapter_in_model
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    from safetensors.torch import save_file
    from sieve.backbone import load_backbone

    from sieve.registry import resolve_backbone

    from .data import TokenSampler, nq_train, text_sources
    from .encoder import ENCODER_DIR, load_chunk_encoder, model_encoder
    from .model_dir import load_parts, resolve_refrag

    bad = [s for s in cfg.stages if s not in STAGES]
    if bad:
        raise ValueError(f"unknown stage(s) {bad}; known: {', '.join(STAGES)}")
    stages = [s for s in STAGES if s in cfg.stages]
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    cfg.out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    backbone = load_backbone(resolve_backbone(cfg.backbone), home=home, device=device, dtype="float32")
    dev = backbone.device
    init = init_cfg = None
    if cfg.init is not None:
        init = resolve_refrag(str(cfg.init))
        init_cfg = RefragConfig.load(init)
        if (init_cfg.k, init_cfg.backbone, init_cfg.projector_hidden) != (cfg.k, cfg.backbone, cfg.projector_hidden):
            raise ValueError(f"--init {init.name} has k={init_cfg.k}, backbone {init_cfg.backbone}, projector hidden "
                             f"{init_cfg.projector_hidden}; this run asks for k={cfg.k}, {cfg.backbone}, "
                             f"{cfg.projector_hidden}")
        cfg.encoder = init_cfg.encoder
    source, _ = model_encoder(init, cfg.encoder) if init else (cfg.encoder, None)
    encoder = load_chunk_encoder(source, device=str(dev))
    if cfg.tune_encoder:
        encoder.set_trainable(True)
    emb_rms = float(backbone.model.tok_embeddings.weight.float().pow(2).mean().sqrt())
    projector = Projector(encoder.dim, backbone.args.dim, cfg.projector_hidden, emb_rms).to(dev)
    scorer = PolicyScorer(encoder.dim, cfg.policy_hidden).to(dev)
    init_policy = False
    if init is not None:
        init_projector, init_scorer = load_parts(init, init_cfg, dev)
        projector.load_state_dict(init_projector.state_dict())
        if init_scorer is not None and init_cfg.policy_hidden == cfg.policy_hidden:
            scorer.load_state_dict(init_scorer.state_dict())
            init_policy = True
    refrag = Refrag(backbone.model, backbone.tokenizer, encoder, projector, k=cfg.k, scorer=scorer)
    amp = torch.autocast(device_type=dev.type, dtype=getattr(torch, cfg.dtype), enabled=cfg.dtype != "float32")
    sampler = TokenSampler(backbone.tokenizer, text_sources(cfg.data_root), cfg.sources, seed=cfg.seed)
    rng = random.Random(cfg.seed + 1)
    pattern_rng = random.Random(cfg.seed + 3)  # only expand_recency's coin: `rng` stays the same run to run

    uses_lora = "sft" in stages or (cfg.cpt_lora and "cpt" in stages) or bool(init_cfg and init_cfg.lora_r)
    if uses_lora:
        inject_adapter_in_model(LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules=LORA_TARGETS,
                                           lora_dropout=0.0), backbone.model)
        for p in backbone.model.parameters():
            p.requires_grad_(False)
        if init is not None and init_cfg.lora_r:
            _load_lora(backbone.model, init / ADAPTER, init_cfg, cfg)
    lora_params = lora_parameters(backbone.model)
    encoder_params = list(encoder.parameters()) if cfg.tune_encoder else []

    ckpt = cfg.out / "checkpoint.pt"
    state = torch.load(ckpt, weights_only=False) if ckpt.is_file() else None
    history: list[dict] = state["history"] if state else []
    done: list[str] = state["done"] if state else []
    if state:
        projector.load_state_dict(state["projector"])
        scorer.load_state_dict(state["scorer"])
        if lora_params:
            backbone.model.load_state_dict(state["lora"], strict=False)
        if encoder_params and state.get("encoder"):
            encoder.model.load_state_dict(state["encoder"])
        sampler.rng.setstate(state["sampler_rng"])
        rng.setstate(state["rng"])
        if "pattern_rng" in state:
            pattern_rng.setstate(state["pattern_rng"])
        torch.set_rng_state(state["torch_rng"])

    def save(stage: str, step: int, opt, sched=None) -> None:
        torch.save({"done": done, "stage": stage, "step": step, "projector": projector.state_dict(),
                    "scorer": scorer.state_dict(), "optimizer": opt.state_dict() if opt else None,
                    "scheduler": sched.state_dict() if sched else None,
                    "lora": lora_checkpoint_state(backbone.model),
                    "encoder": encoder.model.state_dict() if encoder_params else None,
                    "history": history, "sampler_rng": sampler.rng.getstate(), "rng": rng.getstate(),
                    "pattern_rng": pattern_rng.getstate(), "torch_rng": torch.get_rng_state()},
                   ckpt.with_suffix(".tmp"))
        ckpt.with_suffix(".tmp").replace(ckpt)

    columns = [TextColumn("{task.description:<8}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
               TextColumn("loss {task.fields[loss]:.3f}")]
    nq = nq_train(cfg.data_root, cfg.sft_docs, cfg.seed) if "sft" in stages and "sft" not in done else None
    with Progress(*columns, disable=not progress) as bar:
        for stage in stages:
            if stage in done:
                continue
            if stage == "policy":
                _train_policy(refrag, sampler, cfg, bar, history)
                done.append(stage)
                save(stage, 0, None)
                continue
            steps = {"recon": cfg.recon_steps, "cpt": cfg.cpt_steps, "sft": cfg.sft_steps}[stage]
            groups = [{"params": list(projector.parameters()), "lr": cfg.lr}]
            if encoder_params and stage in ("recon", "cpt"):  # the paper tunes the encoder in both
                groups.append({"params": encoder_params, "lr": cfg.encoder_lr})
            if stage == "sft" or (stage == "cpt" and cfg.cpt_lora):
                for p in lora_params:
                    p.requires_grad_(True)
                groups.append({"params": lora_params, "lr": cfg.lora_lr})
            else:
                for p in lora_params:
                    p.requires_grad_(False)
            params = [p for g in groups for p in g["params"]]
            opt = torch.optim.AdamW(groups, weight_decay=0.0)
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda s, n=max(steps, 1): min(1.0, (s + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * s / n)))
            start = 0
            if state and state["stage"] == stage and state["optimizer"] is not None:
                opt.load_state_dict(state["optimizer"])
                sched.load_state_dict(state["scheduler"])
                start = state["step"]
            task = bar.add_task(stage, total=steps, completed=start, loss=float("nan"))
            for step in range(start, steps):
                if stage == "recon":
                    n = recon_blocks(step, steps, cfg.recon_max_blocks)
                    batch = [recon_example(refrag, sampler, n, cfg.k) for _ in range(cfg.batch_size)]
                elif stage == "cpt":
                    batch = [cpt_example(refrag, sampler, cfg, rng, pattern_rng) for _ in range(cfg.batch_size)]
                else:
                    batch = sft_batch(refrag, nq, sampler, cfg, rng, pattern_rng)
                loss = lm_loss(refrag, batch, amp, cfg.copy_weight if stage != "recon" else 0.0)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                sched.step()
                entry = {"stage": stage, "step": step + 1, "loss": round(loss.item(), 4)}
                if stage == "recon":
                    entry["blocks"] = n
                history.append(entry)
                bar.update(task, advance=1, loss=loss.item())
                if (step + 1) % cfg.save_every == 0 and step + 1 < steps:
                    save(stage, step + 1, opt, sched)
            done.append(stage)
            save(stage, steps, None)

    projector.eval().requires_grad_(False)
    for p in lora_params:
        p.requires_grad_(False)
    own_encoder = bool(encoder_params) or (init is not None and init_cfg.encoder == ENCODER_DIR)
    if encoder_params:
        encoder.set_trainable(False)
    if own_encoder:
        encoder.save(cfg.out / ENCODER_DIR)
    val = validate(refrag, cfg) if cfg.val_windows else {}
    # -- the model folder
    save_file({k: v.float().contiguous().cpu() for k, v in projector.state_dict().items()}, str(cfg.out / PROJECTOR))
    has_policy = "policy" in done or init_policy
    if has_policy:
        save_file({k: v.float().contiguous().cpu() for k, v in scorer.state_dict().items()}, str(cfg.out / POLICY))
    if lora_params:
        save_file(lora_state(backbone.model), str(cfg.out / ADAPTER))
    RefragConfig(backbone=cfg.backbone, encoder=ENCODER_DIR if own_encoder else cfg.encoder, k=cfg.k,
                 encoder_dim=encoder.dim, dim=backbone.args.dim,
                 projector_hidden=cfg.projector_hidden, policy_hidden=cfg.policy_hidden if has_policy else 0,
                 lora_r=cfg.lora_r if lora_params else 0,
                 lora_alpha=cfg.lora_alpha if lora_params else 0.0).save(cfg.out)
    summary = {"command": " ".join(sys.argv), "stages": done,
               "seconds_this_run": round(time.perf_counter() - t_start, 1), "device": _device(dev),
               "tokens_per_source": sampler.tokens, "validation": val, "losses": _loss_summary(history),
               "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()}}
    (cfg.out / "train_log.json").write_text(json.dumps({"summary": summary, "history": history}, indent=1))
    return summary


def _load_lora(model: torch.nn.Module, path: Path, init_cfg, cfg: TrainConfig) -> None:
    """The --init folder's adapter into this run's peft-injected LoRA (same r and alpha, or a clear error)."""
    from safetensors.torch import load_file

    if (init_cfg.lora_r, init_cfg.lora_alpha) != (cfg.lora_r, cfg.lora_alpha):
        raise ValueError(f"--init has LoRA r={init_cfg.lora_r}, alpha={init_cfg.lora_alpha}; this run asks for "
                         f"r={cfg.lora_r}, alpha={cfg.lora_alpha}")
    load_lora_state(model, load_file(str(path)))


def _device(dev: torch.device) -> str:
    if dev.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(dev)}"
    return f"cpu: {torch.get_num_threads()} thread(s), {platform.processor() or platform.machine()}"


def _loss_summary(history: list[dict]) -> dict:
    out = {}
    for stage in STAGES:
        h = [e["loss"] for e in history if e.get("stage") == stage and "loss" in e]
        if h:
            m = min(10, len(h))
            out[stage] = {"steps": len(h), "first10": round(sum(h[:m]) / m, 4), "last10": round(sum(h[-m:]) / m, 4)}
        if stage == "policy":
            out.update({e["stage"]: e for e in history if e.get("stage") == "policy-eval"})
    return out


# ------------------------------------------------------------------------------------------------ policy


def _top_mean(gains: torch.Tensor, p: float = 0.25) -> float:
    return float(torch.topk(gains, max(1, math.floor(p * len(gains) + 0.5))).values.mean())


@torch.no_grad()
def expansion_gains(refrag: Refrag, layout: Layout, n_target: int) -> tuple[float, torch.Tensor]:
    """The decoder's loss with every block compressed, and its drop when each block alone is expanded [n]."""
    base = lm_loss(refrag, [(layout, set(), n_target)], torch.autocast("cpu", enabled=False)).item()
    gains = [base - lm_loss(refrag, [(layout, {i}, n_target)], torch.autocast("cpu", enabled=False)).item()
             for i in range(len(layout.blocks))]
    return base, torch.tensor(gains)


def _train_policy(refrag: Refrag, sampler, cfg: TrainConfig, bar, history: list[dict]) -> None:
    from .policy import block_positions, score_blocks

    task = bar.add_task("policy", total=cfg.policy_examples + cfg.policy_epochs, loss=float("nan"))
    rng = random.Random(cfg.seed + 2)
    data = []
    for _ in range(cfg.policy_examples):
        layout, _, n_target = cpt_example(refrag, sampler, cfg, rng)
        _, gains = expansion_gains(refrag, layout, n_target)
        vectors = torch.stack([b.vector for b in layout.blocks]).detach()  # the encoder may be training
        data.append((vectors[-1], vectors, gains))
        bar.update(task, advance=1)
    n_val = max(1, len(data) // 4)
    train_set, val_set = data[n_val:], data[:n_val]
    scorer = refrag.scorer
    dev = next(scorer.parameters()).device
    opt = torch.optim.AdamW(scorer.parameters(), lr=cfg.lr, weight_decay=1e-2)
    scorer.train()
    for epoch in range(cfg.policy_epochs):
        total = 0.0
        for q, b, g in train_set:
            target = F.softmax(g / (g.std() + 1e-6), dim=0).to(dev)
            scores = scorer(q.to(dev), b.to(dev), block_positions(len(b)).to(dev))
            loss = -(target * F.log_softmax(scores, dim=0)).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item()
        history.append({"stage": "policy", "step": epoch + 1, "loss": round(total / max(len(train_set), 1), 4)})
        bar.update(task, advance=1, loss=total / max(len(train_set), 1))
    scorer.eval()

    def mean_gain_of_top(policy: str, p: float = 0.25) -> float:
        got = []
        for q, b, g in val_set:
            m = max(1, math.floor(p * len(b) + 0.5))
            top = torch.topk(score_blocks(policy, q, b, scorer), m).indices
            got.append(float(g[top].mean()))
        return round(sum(got) / len(got), 4)

    history.append({"stage": "policy-eval", "held_out_examples": len(val_set),
                    "mean_gain_top25_learned": mean_gain_of_top("learned"),
                    "mean_gain_top25_similarity": mean_gain_of_top("similarity"),
                    "mean_gain_top25_recency": mean_gain_of_top("recency"),
                    "mean_gain_top25_oracle": round(sum(_top_mean(g) for _, _, g in val_set) / len(val_set), 4),
                    "mean_gain_any_block": round(sum(float(g.mean()) for _, _, g in val_set) / len(val_set), 4)})


# ------------------------------------------------------------------------------------------------ validation


@torch.no_grad()
def validate(refrag: Refrag, cfg: TrainConfig) -> dict:
    """Next-`cpt_target_tokens` loss on held-out windows of the *training* sources (another seed): no context,
    compressed, full context. A sanity check, not the evaluation (eval.py reads WikiText-2 test)."""
    from .data import TokenSampler, text_sources

    sampler = TokenSampler(refrag.tokenizer, text_sources(cfg.data_root), cfg.sources, seed=cfg.seed + 1000)
    off = torch.autocast("cpu", enabled=False)
    sums = {"no_context": 0.0, "compressed": 0.0, "full_context": 0.0}
    for _ in range(cfg.val_windows):
        ids = sampler.sample(cfg.cpt_context_tokens + cfg.cpt_target_tokens)
        ctx_ids, target = ids[: -cfg.cpt_target_tokens], ids[-cfg.cpt_target_tokens:]
        ctx = refrag.encode_ids([ctx_ids], cfg.k)[0]
        layout = refrag.lm_layout(ctx, target)
        empty = Layout([layout.segments[0], layout.segments[-1]])
        sums["no_context"] += lm_loss(refrag, [(empty, set(), len(target))], off).item()
        sums["compressed"] += lm_loss(refrag, [(layout, set(), len(target))], off).item()
        sums["full_context"] += lm_loss(refrag, [(layout, set(range(ctx.n_blocks)), len(target))], off).item()
    return {f"{k}_loss": round(v / cfg.val_windows, 4) for k, v in sums.items()} | {"windows": cfg.val_windows}
