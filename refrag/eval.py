"""REFRAG quality, in one results file (bench/results/NAME.json):

- WikiText-2 raw *test*: perplexity of the next 128 tokens given L context tokens (L in 512 / 1024 / 2048), windows
  spread evenly over the test text. Systems: no context, full context (tokens), compressed at k = 8 / 16 / 32 with
  and without expansion, one row per expansion policy (the similarity policy's query is the last context block).
  LM layout as in training.
- NQ-open 20-document set (eval portion, built by data.nq_eval): exact match and accuracy (an answer string in
  the prediction) of greedy answers (first line, up to 32 tokens). Systems: closed book, full context (every block
  expanded: exactly the token prompt), compressed at each k with and without expansion.

A k without its own shipped projector (refrag-k8, refrag-k32) runs the given model's projector at that k: the
rows say which projector ran (`model`), so out-of-distribution k is visible.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .data import exact_match, has_answer, nq_eval
from .model import Refrag


@dataclass
class EvalConfig:
    data_root: Path
    tasks: list[str] = field(default_factory=lambda: ["wikitext", "nq"])
    model: str = "refrag-k16"
    ks: list[int] = field(default_factory=lambda: [8, 16, 32])
    expansions: list[float] = field(default_factory=lambda: [0.0, 0.25])
    contexts: list[int] = field(default_factory=lambda: [512, 1024, 2048])
    target_tokens: int = 128
    limit: int = 50
    n_docs: int = 20
    policies: list[str] = field(default_factory=lambda: ["similarity"])
    max_new_tokens: int = 32
    name: str = "refrag-eval"


def _refrag_for_k(base: Refrag, k: int, home: Path, backbone) -> Refrag:
    """The shipped refrag-k{k} if there is one (sharing the loaded decoder and encoder), else `base` run at k."""
    from .model_dir import load_refrag, shipped

    if k == base.k:
        return base
    if f"refrag-k{k}" in shipped():
        return load_refrag(f"refrag-k{k}", home=home, backbone=backbone, encoder=base.blocks.encoder)
    return base


def decoders(r: Refrag, plain: Refrag | None) -> list[tuple[str, Refrag]]:
    """The baselines' decoders: the REFRAG model's own and, when it has a tuned copy (a LoRA), the plain backbone."""
    return [("own", r)] + ([("base", plain)] if plain is not None else [])


def _which(key: tuple, cfg: EvalConfig) -> dict:
    """A row's identity fields: a baseline's mode and decoder ("own": the REFRAG model's decoder, "base": the untuned
    backbone), or a compressed system's k / expansion / policy ("none" when nothing is expanded) / projector."""
    if key[0] != "compressed":
        return {"system": key[0], "mode": key[0], "decoder": key[1]}
    return {"system": f"refrag-k{key[1]}", "mode": key[0], "k": key[1], "expansion": key[2], "policy": key[4],
            "model": key[3]}


def _settings(cfg: EvalConfig) -> list[tuple[float, str]]:
    """(expansion, policy) pairs of the compressed systems: every policy where something is expanded, one row
    (policy "none") where nothing is."""
    return [(p, policy) for p in cfg.expansions for policy in (cfg.policies if p > 0 else ["none"])]


def _progress(console):
    """A transient rich progress bar on the eval's console (stderr); none without a console (tests)."""
    from rich.progress import Progress

    return Progress(console=console, transient=True, disable=console is None)


def _score_window(refrag_at, cfg: EvalConfig, plain: Refrag | None, ctx_ids: list[int], target: list[int],
                  nll: dict[tuple, float], positions: dict[tuple, int]) -> None:
    """Add one window's target loss and decoder positions for every system to the running sums."""
    from .prompt import Layout
    from .train import lm_loss

    off = torch.autocast("cpu", enabled=False)
    for k in cfg.ks:
        r = refrag_at(k)
        ctx = r.encode_ids([ctx_ids], k)[0]
        layout = r.lm_layout(ctx, target)
        runs = []
        if k == cfg.ks[0]:
            every = set(range(ctx.n_blocks))
            empty = Layout([layout.segments[0], layout.segments[-1]])
            for decoder, owner in decoders(r, plain):
                runs += [(("no-context", decoder), owner, empty, set()),
                         (("full-context", decoder), owner, layout, every)]
        for p, policy in _settings(cfg):
            runs.append((("compressed", k, p, r.name, policy), r, layout,
                         r.choose_expansion(layout, p, policy=policy)))
        for key, owner, lay, expand in runs:
            nll[key] = nll.get(key, 0.0) + lm_loss(owner, [(lay, expand, len(target))], off).item()
            positions[key] = positions.get(key, 0) + lay.n_positions(expand)


def wikitext_test_ids(tokenizer, data_root: Path) -> list[int]:
    """WikiText-2 raw test, tokenized as one stream."""
    return tokenizer.encode((data_root / "text/wikitext-2-raw/test.txt").read_text(), add_bos=False)


def wikitext_windows(ids: list[int], length: int, target_tokens: int, limit: int) -> list[tuple[list[int], list[int]]]:
    """The `limit` evenly spaced (context of `length`, next `target_tokens`) windows the WikiText eval scores."""
    span = length + target_tokens
    starts = [i * (len(ids) - span) // max(limit, 1) for i in range(limit)]
    return [(ids[s:s + length], ids[s + length:s + span]) for s in starts]


@torch.no_grad()
def wikitext_rows(refrag_at, cfg: EvalConfig, console=None, plain: Refrag | None = None) -> list[dict]:
    ids = wikitext_test_ids(refrag_at(cfg.ks[0]).tokenizer, cfg.data_root)
    rows = []
    for length in cfg.contexts:
        windows = wikitext_windows(ids, length, cfg.target_tokens, cfg.limit)
        nll: dict[tuple, float] = {}
        positions: dict[tuple, int] = {}
        t0 = time.perf_counter()
        with _progress(console) as bar:
            task = bar.add_task(f"wikitext L={length}", total=len(windows))
            for ctx_ids, target in windows:
                _score_window(refrag_at, cfg, plain, ctx_ids, target, nll, positions)
                bar.advance(task)
        full_ppl = math.exp(nll[("full-context", "own")] / len(windows))
        for key, total in nll.items():
            ppl = math.exp(total / len(windows))
            rows.append(_which(key, cfg) | {
                "dataset": "wikitext-2-raw", "split": "test", "context_tokens": length,
                "target_tokens": cfg.target_tokens, "windows": len(windows), "perplexity": round(ppl, 3),
                "ppl_vs_full": round(ppl / full_ppl, 4), "decoder_positions": round(positions[key] / len(windows), 1)})
        if console is not None:
            console.print(f"wikitext L={length}: {len(windows)} windows in {time.perf_counter() - t0:.0f} s, "
                          f"full ppl {full_ppl:.2f}")
    return rows


def _answer_all(refrag_at, cfg: EvalConfig, plain: Refrag | None, base: Refrag, ex, add) -> None:
    """Answer one NQ question with every system; `add(key, prediction, ex, positions)` records each."""
    from sieve.backbone import generate

    from .answer import Answerer
    from .prompt import qa_layout

    layout = qa_layout(base.tokenizer, ex.question)
    for decoder, owner in decoders(base, plain):
        out = generate(owner.model, [layout.full_ids()], max_new_tokens=cfg.max_new_tokens,
                       stop_tokens=base.tokenizer.eos_ids)[0]
        add(("closed-book", decoder), base.tokenizer.decode(out), ex, len(layout.full_ids()))
        s = Answerer(owner).stream(ex.question, ex.passages, expansion=1.0, max_new_tokens=cfg.max_new_tokens)
        add(("full-context", decoder), "".join(s), ex, s.stats.prompt_positions)
    for k in cfg.ks:
        r = refrag_at(k)
        encoded = r.encode(ex.passages, k)
        for p, policy in _settings(cfg):
            s = Answerer(r).stream(ex.question, encoded, k=k, expansion=p, policy=policy,
                                   max_new_tokens=cfg.max_new_tokens)
            add(("compressed", k, p, r.name, policy), "".join(s), ex, s.stats.prompt_positions)


def nq_rows(refrag_at, cfg: EvalConfig, console=None, plain: Refrag | None = None) -> list[dict]:
    examples = nq_eval(cfg.data_root, n_docs=cfg.n_docs, limit=cfg.limit)
    base: Refrag = refrag_at(cfg.ks[0])
    scores: dict[tuple, list] = {}

    def add(key, pred: str, ex, positions: int) -> None:
        pred = pred.strip().split("\n")[0].strip()
        scores.setdefault(key, []).append((exact_match(pred, ex.answers), has_answer(pred, ex.answers), positions))

    t0 = time.perf_counter()
    with _progress(console) as bar:
        task = bar.add_task(f"nq-open {cfg.n_docs} docs", total=len(examples))
        for ex in examples:
            _answer_all(refrag_at, cfg, plain, base, ex, add)
            bar.advance(task)
    rows = []
    full_acc = sum(a for _, a, _ in scores[("full-context", "own")]) / len(examples)
    for key, got in scores.items():
        em = sum(e for e, _, _ in got) / len(got)
        acc = sum(a for _, a, _ in got) / len(got)
        rows.append(_which(key, cfg) | {
            "dataset": f"nq-open-{cfg.n_docs}doc", "split": "eval", "questions": len(got),
            "exact_match": round(em, 4), "accuracy": round(acc, 4), "accuracy_minus_full": round(acc - full_acc, 4),
            "decoder_positions": round(sum(p for _, _, p in got) / len(got), 1)})
    if console is not None:
        console.print(f"nq: {len(examples)} questions in {time.perf_counter() - t0:.0f} s")
    return rows


def run_eval(cfg: EvalConfig, *, home: Path, device: str = "auto", dtype: str = "auto", console=None) -> Path:
    from sieve.backbone import load_backbone

    from sieve.registry import resolve_backbone
    from sieve.results import device_name, write_results

    from .model_dir import RefragConfig, load_refrag, resolve_refrag

    unknown = [t for t in cfg.tasks if t not in ("wikitext", "nq")]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known: wikitext, nq")
    from .policy import check_policy

    for policy in cfg.policies:
        check_policy(policy)
    folder = resolve_refrag(cfg.model)
    backbone = load_backbone(resolve_backbone(RefragConfig.load(folder).backbone), home=home, device=device,
                             dtype=dtype)
    base = load_refrag(folder, home=home, backbone=backbone)
    plain = None if base.model is backbone.model else Refrag(  # a tuned decoder copy: also run the plain backbone
        backbone.model, base.tokenizer, base.blocks.encoder, base.projector, k=base.k, name="base-decoder")
    cache: dict[int, Refrag] = {}

    def refrag_at(k: int) -> Refrag:
        if k not in cache:
            cache[k] = _refrag_for_k(base, k, home, backbone)
        return cache[k]

    rows: list[dict] = []
    out = None
    dev = device_name(str(backbone.device))
    if "wikitext" in cfg.tasks:
        rows += wikitext_rows(refrag_at, cfg, console, plain)
        out = write_results(cfg.name, rows, dev)
    if "nq" in cfg.tasks:
        rows += nq_rows(refrag_at, cfg, console, plain)
        out = write_results(cfg.name, rows, dev)
    return out
