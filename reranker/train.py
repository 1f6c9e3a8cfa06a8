"""Train the `sieve-rank` LoRA adapter: full-list generation with an importance-aware loss, plus the FIRST objective.

Each example (data.py: SciFact *train* claims, complete labels: positives first, the rest by a teacher) becomes one
sequence, run in one forward:

    prompt (all n passages) | target answer `[a] > [b] > ... <eos>` | the id trie (first.py)

- Importance-aware listwise loss (the paper's): cross-entropy on the *id tokens* of the target answer only (the
  format tokens are forced at inference and carry no loss), each normalized over what constrained decoding allows
  at that step (so training sees the inference distribution), and weighted by the rank of the id it belongs to:
  w(r) = 1 / log2(r + 2), the DCG discount, so the top of the list matters most.
- FIRST objective: the trie gives every id's first-position sequence log-probability (first.py, the inference
  scores); a weighted RankNet loss over all label pairs, weight 1 / (r_a + r_b + 2) (FIRST, Reddy et al. 2024).

- Inline objective (`inline_weight`): the same weighted RankNet over the inline scores (first.py: " yes" minus
  " no" at each passage's last prompt token), read from the same forward. It learns relevance on small lists where
  the FIRST pointer alone stays at chance, and gives FIRST's attention a feature to point with.

loss = lm_weight * importance-aware CE + first_weight * RankNet(FIRST) + inline_weight * RankNet(inline).

Lists are shown in a random order (`shuffle`, the
share of lists shuffled; 1.0 by default, as RankZephyr and FIRST train): in first-stage order the label's tail is
mostly that order, and a model trained on it learns to copy the input (measured: a 200-step BM25-teacher adapter
gave exactly BM25's nDCG@10); shuffled, only the passages' text says where they belong.

The prompt is built exactly as at inference (`PromptBuilder`), with a smaller per-passage cap for training speed.
Resumable from `checkpoint.pt`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sieve.backbone.lora import lora_checkpoint_state, lora_parameters, lora_state

from .data import CandidateLists, MixedLists, RankingExample, source_lists
from .first import MODE, TreeLayout, inline_from_hidden, relevance_tokens, sequence_scores, tree_attention
from .model_dir import ADAPTER, LORA_TARGETS, RerankerConfig
from .permutation import IdTokens, PermutationConstraint
from .prompt import TEMPLATES, PromptBuilder


@dataclass
class TrainConfig:
    out: Path
    data_root: Path
    backbone: str = "smollm2-135m-instruct"
    steps: int = 200
    batch_size: int = 4  # lists per optimizer step (run one at a time, gradients accumulated)
    n_min: int = 20  # passages per list, drawn uniformly in [n_min, n_max]
    n_max: int = 50
    max_passage_tokens: int = 64  # per-passage cap while training (inference derives its own from the context)
    depth: int = 100  # BM25 candidates kept per training claim
    teacher: str = "all-minilm-l6-v2"  # orders the non-positives: an embedder name/folder, or "bm25"
    lm_weight: float = 1.0
    first_weight: float = 1.0
    inline_weight: float = 1.0
    lr: float = 2e-4
    warmup: int = 10
    lora_r: int = 16
    lora_alpha: float = 32.0
    template: str = "rankgpt"
    dtype: str = "bfloat16"  # autocast dtype (float32: off)
    seed: int = 0
    save_every: int = 25
    shuffle: float = 1.0  # share of lists presented in a random order (the label follows the passages)
    teacher_scores: Path | None = None  # JSON of precomputed teacher scores: read if it exists, else written first
    max_minutes: float | None = None  # stop (and save) after the step that passes this much training time
    sources: dict[str, float] = dataclasses.field(default_factory=lambda: {"scifact": 1.0})  # data.py's sources
    distractors: int = 0  # places per list given to other queries' positives, labelled last (data.py)


def shuffled(ex: RankingExample, rng: random.Random) -> RankingExample:
    """The same list in a random order; the label still names the same passages."""
    perm = list(range(len(ex.passages)))
    rng.shuffle(perm)  # new place j holds old passage perm[j]
    place = {old: new for new, old in enumerate(perm)}
    return RankingExample(ex.query, [ex.passages[i] for i in perm], [place[i] for i in ex.order], ex.positives,
                          tuple(place[i] for i in ex.foreign))


def importance_weight(rank: int) -> float:
    """Weight of the id tokens of the passage at 0-based `rank` in the target: the DCG discount."""
    return 1.0 / math.log2(rank + 2)


@dataclass
class Encoded:
    ids: torch.Tensor  # [1, prompt + answer + trie]
    positions: torch.Tensor  # [1, same]
    layout: TreeLayout
    targets: list[tuple[int, list[int], int, float]]  # (position, allowed tokens, index of the target, weight)
    label: list[int]  # 0-based passage order
    root_at: int  # position whose logits score the first digit
    positives: int = 0  # the first `positives` entries of `label` are judged positives
    ends: list[int] = dataclasses.field(default_factory=list)  # each passage's last prompt token (inline scores)
    foreign: tuple[int, ...] = ()  # passages that are other queries' positives (data.py)


def encode_example(ex: RankingExample, builder: PromptBuilder, ids: IdTokens) -> Encoded:
    """The training sequence of one list and where its losses read logits."""
    n = len(ex.passages)
    prompt = builder.build(ex.query, ex.passages)
    answer = ids.output_ids(ex.order)
    p = len(prompt.ids)
    visible = p + len(ids.first_open)
    layout = TreeLayout.build(ids, n, causal_len=p + len(answer), visible=visible)
    constraint = PermutationConstraint(ids, n)
    targets = []
    for j, tok in enumerate(answer):
        allowed = constraint.allowed()
        if len(allowed) > 1:  # a choice: an id token; forced format tokens carry no loss
            rank = len(constraint.emitted)
            targets.append((p - 1 + j, allowed, allowed.index(tok), importance_weight(rank)))
        constraint.advance(tok)
    seq = torch.tensor([prompt.ids + answer + layout.tokens], dtype=torch.long)
    positions = layout.positions(torch.arange(layout.causal_len))
    return Encoded(seq, positions, layout, targets, list(ex.order), visible - 1, ex.positives, prompt.ends,
                   tuple(ex.foreign))


def positive_rank(scores: torch.Tensor, enc: Encoded) -> float | None:
    """Where the FIRST scores put the judged positives: their mean rank over n - 1 (0 = top, 1 = bottom, about 0.5
    for scores that ignore the text). The RankNet loss mixes these pairs with the teacher's; this is the part a
    reranker is for, so training logs it. None for a list without positives."""
    n, k = len(enc.label), enc.positives
    if k == 0 or n < 2:
        return None
    return _mean_rank(scores, enc.label[:k])


def foreign_rank(scores: torch.Tensor, enc: Encoded) -> float | None:
    """Where the scores put other queries' positives: mean rank over n - 1 (1 = bottom, where the label puts them;
    near the judged positives' own rank = the model scores passages without reading the query). None if none."""
    if not enc.foreign or len(enc.label) < 2:
        return None
    return _mean_rank(scores, list(enc.foreign))


def _mean_rank(scores: torch.Tensor, passages: list[int]) -> float:
    """Mean rank of `passages` under `scores` (best first), over n - 1."""
    n = scores.shape[0]
    rank = torch.empty(n, dtype=torch.long)
    rank[scores.detach().float().cpu().argsort(descending=True)] = torch.arange(n)
    return rank[torch.tensor(passages)].float().mean().item() / (n - 1)


def target_tensors(targets: list[tuple[int, list[int], int, float]]) -> tuple[torch.Tensor, ...]:
    """The id-token targets as padded tensors, so one gather and one log-softmax score them all (no per-target
    launches or host-to-device copies): allowed tokens [k, A] (padded with the first), valid [k, A], the target's
    index in its allowed list [k], weight [k]."""
    width = max(len(a) for _, a, _, _ in targets)
    allowed = torch.tensor([a + [a[0]] * (width - len(a)) for _, a, _, _ in targets], dtype=torch.long)
    valid = torch.arange(width)[None, :] < torch.tensor([len(a) for _, a, _, _ in targets])[:, None]
    target = torch.tensor([t for _, _, t, _ in targets], dtype=torch.long)
    weight = torch.tensor([w for *_, w in targets], dtype=torch.float32)
    return allowed, valid, target, weight


def id_token_loss(logits: torch.Tensor, targets: list[tuple[int, list[int], int, float]]) -> torch.Tensor:
    """Importance-aware CE: logits [k, V] at the k target positions; each target's log-probability normalized over
    the tokens constrained decoding allows there, weighted by rank."""
    allowed, valid, target, weight = (t.to(logits.device) for t in target_tensors(targets))
    chosen = logits.gather(1, allowed).masked_fill(~valid, float("-inf"))  # [k, widest choice]
    logp = torch.log_softmax(chosen, -1).gather(1, target[:, None]).squeeze(1)
    return -(logp * weight).sum() / weight.sum()


def ranknet(scores: torch.Tensor, label: list[int]) -> torch.Tensor:
    """FIRST's weighted RankNet: scores [n] by passage, label = passages best first; pair (a above b) weighs
    1 / (r_a + r_b + 2)."""
    ranked = scores[torch.tensor(label, device=scores.device)]  # scores in label order
    n = ranked.shape[0]
    r = torch.arange(n, device=scores.device, dtype=torch.float32)
    upper = torch.triu(torch.ones(n, n, dtype=torch.bool, device=scores.device), diagonal=1)  # a ranked above b
    w = (1.0 / (r[:, None] + r[None, :] + 2)).masked_fill(~upper, 0.0)
    return (w * F.softplus(ranked[None, :] - ranked[:, None])).sum() / w.sum().clamp(min=1e-9)


@dataclass
class ListLosses:
    lm: torch.Tensor  # importance-aware CE over the answer's id tokens
    first: torch.Tensor  # weighted RankNet over the FIRST scores
    inline: torch.Tensor  # weighted RankNet over the inline scores
    first_scores: torch.Tensor  # [n] by passage
    inline_scores: torch.Tensor  # [n] by passage


def losses(model, enc: Encoded, ids: IdTokens, device, relevance: tuple[int, int] | None = None) -> ListLosses:
    """The three losses of one list and the scores they read, all from one forward (`relevance`: the " yes" / " no"
    token ids of the inline scores; None: no inline loss, zero)."""
    seq, pos = enc.ids.to(device), enc.positions.to(device)
    with tree_attention(enc.layout, device):
        hidden = model(seq, position_ids=pos, mode=MODE, return_hidden=True, return_logits=False).hidden_states[0]
    c, m = enc.layout.causal_len, len(enc.layout.tokens)
    at = torch.tensor([t[0] for t in enc.targets] + [enc.root_at] + list(range(c, c + m)), device=device)
    logits = model.output(hidden[at]).float()
    k = len(enc.targets)
    lm = id_token_loss(logits[:k], enc.targets)
    scores = sequence_scores(logits[k], logits[k + 1:], enc.layout, ids.close)  # [n], by id
    if relevance is None or not enc.ends:
        inline_scores, inline = torch.zeros_like(scores), scores.new_zeros(())
    else:
        inline_scores = inline_from_hidden(model, hidden[torch.tensor(enc.ends, device=device)], relevance)
        inline = ranknet(inline_scores, enc.label)
    return ListLosses(lm, ranknet(scores, enc.label), inline, scores, inline_scores)


def train(cfg: TrainConfig, *, home: Path, device: str = "auto", progress: bool = True,
          lists: CandidateLists | MixedLists | None = None) -> dict:
    """Train (or resume) into `cfg.out`; `lists`: a prebuilt example source (tests pass a small one)."""
    from peft import LoraConfig, inject_adapter_in_model
    from safetensors.torch import save_file
    from sieve.backbone import load_backbone

    from sieve.registry import resolve_backbone

    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    cfg.out.mkdir(parents=True, exist_ok=True)
    backbone = load_backbone(resolve_backbone(cfg.backbone), home=home, device=device, dtype="float32")
    if lists is None:
        lists = training_lists(cfg, home)
        if cfg.teacher_scores and cfg.teacher_scores.is_file():
            lists.load_teacher_scores(cfg.teacher_scores)
        elif cfg.teacher_scores:
            lists.save_teacher_scores(cfg.teacher_scores)
    return train_on(backbone, cfg, lists, progress=progress,
                    save=lambda model: save_file(lora_state(model), str(cfg.out / ADAPTER)),
                    inject=lambda m: inject_adapter_in_model(
                        LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules=LORA_TARGETS,
                                   lora_dropout=0.0), m))


def training_lists(cfg: TrainConfig, home: Path) -> CandidateLists | MixedLists:
    """The configured sources: one alone, or several mixed by weight."""
    made = {name: (source_lists(name, cfg.data_root, depth=cfg.depth, teacher=cfg.teacher, home=home), weight)
            for name, weight in cfg.sources.items()}
    return made[next(iter(made))][0] if len(made) == 1 else MixedLists(made)


def train_on(backbone, cfg: TrainConfig, lists, *, progress: bool, save, inject) -> dict:
    """The loop, on an already loaded backbone (which gets LoRA layers injected)."""
    cfg.out.mkdir(parents=True, exist_ok=True)
    model = inject(backbone.model)
    params = lora_parameters(model)
    for p in params:
        p.requires_grad_(True)
    ids = IdTokens.from_tokenizer(backbone.tokenizer, max_id=cfg.n_max)
    builder = PromptBuilder(backbone.tokenizer, TEMPLATES[cfg.template], context=backbone.args.max_seq_len, ids=ids,
                            max_passage_tokens=cfg.max_passage_tokens)
    relevance = relevance_tokens(backbone.tokenizer) if cfg.inline_weight else None
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * max(0.0, 1 - s / max(cfg.steps, 1)) ** 0.5)
    rng = random.Random(cfg.seed)
    start, history = 0, []
    ckpt = cfg.out / "checkpoint.pt"
    if ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["lora"], strict=False)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start, history = state["step"], state["history"]
        rng.setstate(state["rng"])
        torch.set_rng_state(state["torch_rng"])

    dev = backbone.device
    amp = torch.autocast(device_type=dev.type, dtype=getattr(torch, cfg.dtype), enabled=cfg.dtype != "float32")
    t0 = time.perf_counter()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = [TextColumn("training sieve-rank"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
               TextColumn("lm {task.fields[lm]:.3f} first {task.fields[first]:.3f} "
                          "positives' rank: first {task.fields[pos]:.2f} inline {task.fields[inline_pos]:.2f} "
                          "foreign {task.fields[foreign]:.2f}")]
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task("train", total=cfg.steps, completed=start, lm=float("nan"), first=float("nan"),
                            pos=float("nan"), inline_pos=float("nan"), foreign=float("nan"))
        model.train()
        for step in range(start, cfg.steps):
            opt.zero_grad(set_to_none=True)
            lm_sum = first_sum = inline_sum = 0.0
            sizes, ranks, inline_ranks, foreign_ranks = [], [], [], []
            for _ in range(cfg.batch_size):
                qid = lists.pick(rng)
                n = rng.randint(cfg.n_min, cfg.n_max)
                ex = lists.example(qid, n, rng, cfg.distractors)
                if cfg.shuffle and rng.random() < cfg.shuffle:
                    ex = shuffled(ex, rng)
                enc = encode_example(ex, builder, ids)
                sizes.append(len(enc.label))
                with amp:
                    out = losses(model, enc, ids, dev, relevance)
                ranks.append(positive_rank(out.first_scores, enc))
                inline_ranks.append(positive_rank(out.inline_scores, enc) if relevance else None)
                foreign_ranks.append(foreign_rank(out.inline_scores if relevance else out.first_scores, enc))
                loss = (cfg.lm_weight * out.lm + cfg.first_weight * out.first
                        + cfg.inline_weight * out.inline) / cfg.batch_size
                loss.backward()
                lm_sum, first_sum = lm_sum + out.lm.item(), first_sum + out.first.item()
                inline_sum += out.inline.item()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            lm_avg, first_avg = lm_sum / cfg.batch_size, first_sum / cfg.batch_size
            pos_rank, inline_pos = _mean_last(ranks, len(ranks)), _mean_last(inline_ranks, len(inline_ranks))
            history.append({"step": step + 1, "lm": round(lm_avg, 5), "first": round(first_avg, 5),
                            "inline": round(inline_sum / cfg.batch_size, 5), "pos_rank": pos_rank,
                            "inline_pos_rank": inline_pos,
                            "foreign_rank": _mean_last(foreign_ranks, len(foreign_ranks)), "passages": sizes})
            bar.update(task, advance=1, lm=lm_avg, first=first_avg, pos=_nan(pos_rank), inline_pos=_nan(inline_pos),
                       foreign=_nan(history[-1]["foreign_rank"]))
            out_of_time = cfg.max_minutes is not None and time.perf_counter() - t0 > cfg.max_minutes * 60
            if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps or out_of_time:
                torch.save({"step": step + 1, "lora": lora_checkpoint_state(model),
                            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "history": history,
                            "rng": rng.getstate(), "torch_rng": torch.get_rng_state()}, ckpt.with_suffix(".tmp"))
                ckpt.with_suffix(".tmp").replace(ckpt)
            if out_of_time:
                break

    model.eval()
    save(model)
    mode = default_mode(cfg)
    RerankerConfig(backbone=cfg.backbone, template=cfg.template, max_passage_tokens=cfg.max_passage_tokens,
                   lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha, mode=mode,
                   # inline scores were learned on lists of up to n_max passages: score longer ones in such groups
                   inline_window=cfg.n_max if mode == "inline" else None).save(cfg.out)
    summary = {"steps": len(history), "seconds_this_run": round(time.perf_counter() - t0, 1),
               "final_lm_avg10": _mean_last([h["lm"] for h in history], 10),
               "final_first_avg10": _mean_last([h["first"] for h in history], 10),
               "final_positive_rank_avg10": _mean_last([h.get("pos_rank") for h in history], 10),
               "final_inline_avg10": _mean_last([h.get("inline") for h in history], 10),
               "final_inline_positive_rank_avg10": _mean_last([h.get("inline_pos_rank") for h in history], 10),
               "final_foreign_rank_avg10": _mean_last([h.get("foreign_rank") for h in history], 10),
               "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()},
               "device": str(backbone.device)}
    (cfg.out / "train_log.json").write_text(json.dumps({"summary": summary, "history": history}, indent=1))
    write_model_card(cfg, summary)
    return summary


SOURCE_CARD = {
    "scifact": "SciFact **train** claims over the SciFact corpus (`retrieval/scifact/qrels/train.tsv`, CC BY-NC)",
    "nq": "NQ-open oracle **train** questions over their gold Wikipedia passages "
          "(`qa/nq-open/nq-open-oracle.train.rag.jsonl.gz`, CC BY-SA)",
    "medquad": "MedQuAD questions over its answers (`train/medquad_pairs.jsonl.gz`, CC BY 4.0)",
}


def default_mode(cfg: TrainConfig) -> str:
    """Trained on inline scores alone, generation and FIRST were not trained: inline is the model's mode."""
    return "inline" if cfg.inline_weight and not (cfg.lm_weight or cfg.first_weight) else "full"


def _nan(value: float | None) -> float:
    return float("nan") if value is None else value


def _mean_last(values: list[float | None], k: int) -> float | None:
    kept = [v for v in values[-k:] if v is not None]
    return round(float(np.mean(kept)), 4) if kept else None


def write_model_card(cfg: TrainConfig, summary: dict) -> None:
    from sieve.results import command_line, git_commit

    c = summary["config"]
    total = sum(cfg.sources.values())
    (cfg.out / "README.md").write_text(f"""# {cfg.out.name}

LoRA adapter (r={cfg.lora_r}, alpha={cfg.lora_alpha}, on {", ".join(LORA_TARGETS)}) for {cfg.backbone}: listwise
reranking of a whole candidate list in one pass (`full`), first-token scoring (`first`), inline scores (`inline`)
and the sliding-window baseline, all from `sieve.reranker`. Default mode (`reranker.json`): `{default_mode(cfg)}`.

- Made by: `{command_line()}` at git {git_commit()}, {summary["steps"]} steps, {summary["seconds_this_run"]} s
  (this run) on {summary["device"]}.
- Data (share of lists): {", ".join(f"{SOURCE_CARD[k]} ({w / total:.0%})" for k, w in cfg.sources.items())};
  candidates are the BM25 (bm25s) top-{c["depth"]} of each source's corpus; labels are complete rankings:
  judged positives first, then the rest ordered by the teacher `{cfg.teacher}`. No test or evaluated split was used.
- Lists of {cfg.n_min}-{cfg.n_max} passages, each cut to {cfg.max_passage_tokens} tokens, template `{cfg.template}`;
  {cfg.shuffle:.0%} of lists shown in a random order (not first-stage order), so the model cannot learn to copy it;
  {cfg.distractors} place(s) per list held by other queries' judged positives, labelled last.
- Loss: {cfg.lm_weight} x importance-aware cross-entropy on id tokens (DCG-discounted by rank, normalized over
  the constrained choices) + {cfg.first_weight} x weighted RankNet on first-position id scores (FIRST)
  + {cfg.inline_weight} x the same RankNet on inline scores (" yes" - " no" at each passage's last token).
- Final loss (mean of the last 10 steps): lm {summary["final_lm_avg10"]}, first {summary["final_first_avg10"]};
  judged positives' mean rank by FIRST {summary["final_positive_rank_avg10"]}, by inline scores
  {summary["final_inline_positive_rank_avg10"]} (0 = top, about 0.5 = the text ignored).
  Full history in `train_log.json`.
""")
