"""Train the `sieve-embed` LoRA adapter: contrastive InfoNCE over in-batch and BM25-mined hard negatives,
optionally distilling a teacher embedder's score distribution, on the backbone in bidirectional mode.

Data (training portions only; never a reported test split): SciFact *train* claims -> abstracts, with hard
negatives mined by BM25 (bm25s) from the SciFact corpus (positives excluded); MedQuAD question -> answer pairs.
Each batch comes from one source, so in-batch negatives are in-domain. Tokenization, instructions and pooling are
exactly the inference path's (`LLMEncoder.prepare`, `pool`). Resumable from `checkpoint.pt` in the output folder.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sieve.backbone.lora import load_lora_state, lora_checkpoint_state, lora_parameters, lora_state

from .batching import collate
from .data import Pair, medquad_pairs, scifact_train_pairs
from .encoders import LLMEncoder
from .model_dir import ADAPTER, LORA_TARGETS, EmbedderConfig, save_calibration
from .pooling import pool

QUERY_INSTRUCTION = "Given a question or claim, retrieve passages that answer or support it.\nQuery: "


@dataclass
class TrainConfig:
    out: Path
    data_root: Path
    backbone: str = "smollm2-135m-instruct"
    steps: int = 200
    batch_size: int = 16
    hard_negatives: int = 1  # per query (SciFact batches)
    lr: float = 2e-4
    warmup: int = 10
    lora_r: int = 16
    lora_alpha: float = 32.0
    temperature: float = 0.05
    max_query_len: int = 64
    max_doc_len: int = 160
    sources: dict[str, float] = field(default_factory=lambda: {"scifact-train": 0.6, "medquad": 0.4})
    distill_weight: float = 0.0  # KL to the teacher's in-batch score distribution; 0: off
    teacher: str = "all-minilm-l6-v2"
    pooling: str = "mean"
    query_instruction: str = QUERY_INSTRUCTION
    dtype: str = "bfloat16"  # autocast dtype for the frozen backbone on CPU/GPU
    seed: int = 0
    save_every: int = 25
    max_length: int = 512  # recorded in the shipped config for inference
    init_adapter: Path | None = None  # start from this adapter.safetensors (e.g. a shipped run) instead of zeros


def mine_hard_negatives(pairs: list[Pair], corpus: dict[str, str], k: int = 30, seed: int = 0) -> list[Pair]:
    """Attach BM25 top-k documents that are not a positive of the same query as candidate hard negatives."""
    import bm25s

    ids = list(corpus)
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize([corpus[i] for i in ids], stopwords="en", show_progress=False),
                    show_progress=False)
    positives: dict[str, set[str]] = {}
    for p in pairs:
        positives.setdefault(p.query, set()).add(p.positive)
    queries = sorted(positives)
    hits, _ = retriever.retrieve(bm25s.tokenize(queries, stopwords="en", show_progress=False), k=k,
                                 show_progress=False)
    negs = {q: tuple(corpus[ids[j]] for j in row if corpus[ids[j]] not in positives[q]) for q, row in
            zip(queries, hits.tolist())}
    # the top 2 non-positives are skipped: often relevant but unjudged
    return [dataclasses.replace(p, negatives=negs[p.query][2:]) for p in pairs]


def train(cfg: TrainConfig, *, home: Path, device: str = "auto", progress: bool = True) -> dict:
    from peft import LoraConfig, inject_adapter_in_model
    from safetensors.torch import load_file, save_file
    from sieve.backbone import load_backbone

    from sieve.registry import resolve_backbone

    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    cfg.out.mkdir(parents=True, exist_ok=True)
    backbone = load_backbone(resolve_backbone(cfg.backbone), home=home, device=device, dtype="float32")
    model = inject_adapter_in_model(
        LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules=LORA_TARGETS, lora_dropout=0.0),
        backbone.model)
    params = lora_parameters(model)
    for p in params:
        p.requires_grad_(True)
    encoder = LLMEncoder(backbone, name="sieve-embed", max_length=cfg.max_length, default_pooling=cfg.pooling)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * max(0.0, 1 - s / max(cfg.steps, 1)) ** 0.5)

    data = _load_sources(cfg)
    teacher = _load_teacher(cfg, home) if cfg.distill_weight > 0 else None
    start, history = 0, []
    ckpt = cfg.out / "checkpoint.pt"
    if ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["lora"], strict=False)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start, history = state["step"], state["history"]
        random.setstate(state["py_rng"])
        torch.set_rng_state(state["torch_rng"])
    elif cfg.init_adapter is not None:  # a fresh run that starts from an earlier adapter (a resume ignores it)
        load_lora_state(model, load_file(str(cfg.init_adapter)))

    amp = torch.autocast(device_type=backbone.device.type, dtype=getattr(torch, cfg.dtype),
                         enabled=cfg.dtype != "float32")
    t0 = time.perf_counter()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = [TextColumn("training sieve-embed"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
               TextColumn("loss {task.fields[loss]:.4f}")]
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task("train", total=cfg.steps, completed=start, loss=float("nan"))
        model.train()
        for step in range(start, cfg.steps):
            source = random.choices(list(data), weights=[cfg.sources[s] for s in data])[0]
            batch = random.sample(data[source], min(cfg.batch_size, len(data[source])))
            with amp:
                q = _embed(encoder, [p.query for p in batch], cfg.query_instruction, cfg.max_query_len, cfg.pooling)
                docs = [p.positive for p in batch]
                for p in batch:
                    docs += random.sample(p.negatives, min(cfg.hard_negatives, len(p.negatives)))
                d = _embed(encoder, docs, "", cfg.max_doc_len, cfg.pooling)
            scores = F.normalize(q.float(), dim=-1) @ F.normalize(d.float(), dim=-1).T / cfg.temperature
            labels = torch.arange(len(batch), device=scores.device)
            loss = F.cross_entropy(scores, labels)
            if teacher is not None:
                with torch.no_grad():
                    tq = torch.from_numpy(teacher.encode([p.query for p in batch])).to(scores.device)
                    td = torch.from_numpy(teacher.encode(docs)).to(scores.device)
                    target = F.softmax(tq @ td.T / cfg.temperature, dim=-1)
                loss = loss + cfg.distill_weight * F.kl_div(F.log_softmax(scores, -1), target, reduction="batchmean")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            history.append({"step": step + 1, "loss": round(loss.item(), 5), "source": source})
            bar.update(task, advance=1, loss=loss.item())
            if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
                torch.save({"step": step + 1, "lora": lora_checkpoint_state(model), "optimizer": opt.state_dict(),
                            "scheduler": sched.state_dict(), "history": history, "py_rng": random.getstate(),
                            "torch_rng": torch.get_rng_state()}, ckpt.with_suffix(".tmp"))
                ckpt.with_suffix(".tmp").replace(ckpt)

    model.eval()
    save_file(lora_state(model), str(cfg.out / ADAPTER))
    EmbedderConfig(backbone=cfg.backbone, pooling=cfg.pooling, max_length=cfg.max_length,
                   query_instruction=cfg.query_instruction, document_instruction="", lora_r=cfg.lora_r,
                   lora_alpha=cfg.lora_alpha).save(cfg.out)
    summary = {"steps": cfg.steps, "seconds_this_run": round(time.perf_counter() - t0, 1),
               "final_loss_avg10": round(float(np.mean([h["loss"] for h in history[-10:]])), 4),
               "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()},
               "device": str(backbone.device)}
    (cfg.out / "train_log.json").write_text(json.dumps({"summary": summary, "history": history}, indent=1))
    return summary


def calibrate_and_save(folder: Path, data_root: Path, *, home: Path, n: int = 256, seed: int = 0) -> None:
    """Raw embeddings of `n` training documents, saved for int8 ranges (uses the merged, shipped adapter)."""
    from .model_dir import load_embedder

    pairs, _ = scifact_train_pairs(data_root)
    rng = random.Random(seed)
    texts = [p.positive for p in rng.sample(pairs, min(n, len(pairs)))]
    emb = load_embedder(folder, home=home, device="cpu", dtype="float32")
    emb.calibrate(texts)
    save_calibration(folder, emb.calibration)


def _embed(encoder: LLMEncoder, texts: list[str], instruction: str, max_len: int, pooling: str) -> torch.Tensor:
    items = [encoder.prepare(t, instruction, truncate=True) for t in texts]
    items = [(ids[: max_len - 1] + ids[-1:], flags[: max_len - 1] + flags[-1:]) if len(ids) > max_len else
             (ids, flags) for ids, flags in items]  # keep the end token when cutting for training speed
    ids, mask, pmask = collate(items, encoder.pad_id)
    dev = encoder.device
    hidden = encoder.forward(ids.to(dev), mask.to(dev))
    return pool(hidden.float(), pmask.to(dev), pooling)


def _load_sources(cfg: TrainConfig) -> dict[str, list[Pair]]:
    data: dict[str, list[Pair]] = {}
    if cfg.sources.get("scifact-train"):
        pairs, ds = scifact_train_pairs(cfg.data_root)
        data["scifact-train"] = mine_hard_negatives(pairs, ds.corpus, seed=cfg.seed)
    if cfg.sources.get("medquad"):
        data["medquad"] = medquad_pairs(cfg.data_root)
    if not data:
        raise ValueError("no training source selected")
    return data


def _load_teacher(cfg: TrainConfig, home: Path):
    from sieve.registry import resolve_embedder

    from .model_dir import load_embedder

    return load_embedder(resolve_embedder(cfg.teacher), home=home, device="cpu", dtype="float32")
