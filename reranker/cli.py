"""Bodies of the `sieve rerank`, `sieve train reranker` and `sieve eval reranker` commands.

Plain typer functions, mounted by sieve/cli.py (this module does not import it, so there is no cycle):

    from sieve.reranker.cli import eval_reranker, rerank, train_reranker
    app.command("rerank")(rerank)
    train_app.command("reranker")(train_reranker)
    eval_app.command("reranker")(eval_reranker)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from sieve.cli_common import cli_settings as _settings
from sieve.cli_common import console, err
from sieve.cli_common import fail as _fail
from sieve.remote import ApiKeyOption, RemoteOption, connect, remote_errors
from sieve.settings import Settings

# the consoles, settings + logging setup and the one way to fail that every `sieve` command shares


def _load(model: str, settings: Settings, dtype: str | None = None):
    from sieve.backbone import BackboneNotFound, WeightsError

    from .model_dir import load_reranker

    try:
        with err.status(f"loading reranker {model} ..."):
            return load_reranker(model, home=settings.home / "cache", device=settings.device,
                                 dtype=dtype or settings.dtype)
    except (BackboneNotFound, WeightsError, FileNotFoundError, ValueError) as e:
        raise _fail(str(e)) from None


def rerank(
    query: Annotated[str, typer.Argument(help="the search query")],
    passages: Annotated[list[str] | None, typer.Argument(help="passages to rank (or --file / stdin '-')")] = None,
    file: Annotated[Path | None, typer.Option(help="read passages from a file: one per line, or JSON lines "
                                                   "with a 'text' field")] = None,
    mode: Annotated[str | None, typer.Option(help="full (one pass), first (first-token logits), inline (scores at "
                                                  "each passage's end, one pass), likelihood (log p(query | passage), "
                                                  "zero-shot), sliding (window 20, stride 10); "
                                                  "default: the reranker's own")] = None,
    top_k: Annotated[int | None, typer.Option(min=1, help="return (and decode) only the top k")] = None,
    fuse: Annotated[bool | None, typer.Option("--fuse/--no-fuse", help="fuse the order with the order given (RRF: "
                                              "give the passages best first); default: the reranker's own")] = None,
    model: Annotated[str, typer.Option(help="sieve-rank or a reranker folder (local; a server uses its own)")] = (
        "sieve-rank"),
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    remote: RemoteOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Rank PASSAGES by relevance to QUERY with the backbone (or on a server with --remote); print the order,
    scores and what it cost."""
    texts = list(passages or [])
    if texts == ["-"]:
        texts = _read_lines(sys.stdin.read().splitlines())
    if file is not None:
        if not file.is_file():
            raise _fail(f"no file {file}")
        texts += _read_lines(file.read_text().splitlines())
    if not query.strip():
        raise _fail("the query is empty")
    if not texts:
        raise _fail("no passages: pass them as arguments, with --file, or '-' for stdin")
    if remote:
        with remote_errors(), connect(remote, api_key) as client:
            got = client.rerank(query, texts, mode=mode, top_k=top_k, fuse=fuse)
        out = {"model": got.model, "mode": got.mode, "fused": got.fused,
               "ranking": [{"index": r.index, "score": round(r.score, 4), "text": texts[r.index][:200]} for r in got],
               "stats": {"tokens": got.tokens, "passage_cap": got.passage_cap, "truncated": got.truncated,
                         "seconds": round(got.seconds, 3), "server": remote}}
        footer = (f"[dim]{got.tokens} tokens on {remote}, {got.passage_cap} tokens per passage ({got.truncated} cut), "
                  f"{got.seconds:.2f} s[/]")
    else:
        out, footer = _rank_locally(query, texts, mode, top_k, model, fuse)
    if as_json:
        console.print_json(json.dumps(out))
        return
    table = Table(title=f"{out['model']} ({out['mode']}{', fused with the order given' if out['fused'] else ''})")
    for col in ("rank", "index", "score", "passage"):
        table.add_column(col)
    for r, item in enumerate(out["ranking"], start=1):
        table.add_row(str(r), str(item["index"]), f"{item['score']:.3f}", item["text"][:80])
    console.print(table)
    err.print(footer)


def _rank_locally(query: str, texts: list[str], mode: str | None, top_k: int | None, model: str,
                  fuse: bool | None = None) -> tuple[dict, str]:
    from .prompt import PromptTooLong

    settings = _settings()
    reranker = _load(model, settings)
    try:
        res = reranker.rank(query, texts, mode=mode, top_k=top_k, fuse=fuse)
    except (PromptTooLong, ValueError) as e:
        raise _fail(str(e)) from None
    s = res.stats
    out = {"model": reranker.name, "mode": res.mode, "fused": res.fused,
           "ranking": [{"index": i, "score": round(sc, 4), "text": texts[i][:200]} for i, sc in
                       zip(res.order, res.scores)],
           "stats": {"prompt_tokens": s.prompt_tokens, "generated_tokens": s.generated_tokens,
                     "decode_forwards": s.decode_forwards, "forward_passes": s.forward_passes,
                     "passage_cap": s.passage_cap, "truncated": s.truncated,
                     "seconds": round(s.seconds, 3)}}
    footer = (f"[dim]{s.prompt_tokens} prompt + {s.generated_tokens} generated tokens in {s.forward_passes} "
              f"pass(es), {s.passage_cap} tokens per passage ({s.truncated} cut), {s.seconds:.2f} s[/]")
    return out, footer


def _items(values: list[str] | None) -> list[str]:
    """A repeatable option's values, each also split at commas (`--first-stage bm25,sieve-embed`)."""
    return [item.strip() for value in values or [] for item in value.split(",") if item.strip()]


def _read_lines(lines: list[str]) -> list[str]:
    out = []
    for line in lines:
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                out.append(str(json.loads(line).get("text", "")))
                continue
            except json.JSONDecodeError:
                pass
        out.append(line)
    return out


def train_reranker(
    out: Annotated[Path, typer.Option(help="model folder to write (adapter, config, log, card, checkpoint)")] = Path(
        "reranker/models/sieve-rank"),
    data: Annotated[Path | None, typer.Option(help="the shared data folder (default: SIEVE_DATA_DIR)")] = None,
    steps: Annotated[int, typer.Option(min=1)] = 200,
    batch_size: Annotated[int, typer.Option(min=1, help="lists per optimizer step")] = 4,
    n_min: Annotated[int, typer.Option(min=2, help="fewest passages per training list")] = 20,
    n_max: Annotated[int, typer.Option(min=2, help="most passages per training list")] = 50,
    max_passage_tokens: Annotated[int, typer.Option(min=8, help="per-passage cap while training")] = 64,
    teacher: Annotated[str, typer.Option(help="orders non-positives: all-minilm-l6-v2, sieve-embed, bm25")] = (
        "all-minilm-l6-v2"),
    lm_weight: float = 1.0,
    first_weight: float = 1.0,
    inline_weight: Annotated[float, typer.Option(help="weight of the RankNet loss on inline scores")] = 1.0,
    lr: float = 2e-4,
    lora_r: int = 16,
    lora_alpha: float = 32.0,
    dtype: Annotated[str, typer.Option(help="autocast dtype: bfloat16 or float32")] = "bfloat16",
    seed: int = 0,
    shuffle: Annotated[float, typer.Option(min=0.0, max=1.0, help="share of lists shown in a random order instead "
                                                                  "of first-stage order")] = 1.0,
    teacher_scores: Annotated[Path | None, typer.Option(
        help="JSON of the teacher's scores for every training candidate: read if it exists, else computed and "
             "written first (a machine without the teacher trains from it)")] = None,
    max_minutes: Annotated[float | None, typer.Option(min=0.0, help="stop and save after this much training")] = None,
    template: Annotated[str, typer.Option(help="prompt template: rankgpt, or rankgpt-echo (each passage's label "
                                               "repeated after it)")] = "rankgpt",
    distractors: Annotated[int, typer.Option(
        min=0, help="places per list given to other queries' judged positives, labelled last (against a passage "
                    "prior)")] = 0,
    source: Annotated[list[str] | None, typer.Option(
        help="training lists from NAME or NAME=WEIGHT: scifact (train claims), nq (NQ-open oracle train), medquad "
             "(repeatable or comma-separated; default scifact)")] = None,
) -> None:
    """Train the sieve-rank LoRA adapter on training lists (SciFact train claims by default; resumes from
    OUT/checkpoint.pt)."""
    from .data import SOURCES
    from .prompt import TEMPLATES
    from .train import TrainConfig, train

    settings = _settings()
    if n_min > n_max:
        raise _fail("--n-min is larger than --n-max")
    if template not in TEMPLATES:
        raise _fail(f"unknown template {template!r}; choose from {', '.join(TEMPLATES)}")
    sources: dict[str, float] = {}
    for item in _items(source) or ["scifact"]:
        name, _, weight = item.partition("=")
        if name not in SOURCES:
            raise _fail(f"unknown source {name!r}; choose from {', '.join(SOURCES)}")
        try:
            sources[name] = float(weight or 1.0)
        except ValueError:
            raise _fail(f"--source {item!r}: the weight after '=' must be a number") from None
        if sources[name] <= 0:
            raise _fail(f"--source {item!r}: the weight must be positive")
    cfg = TrainConfig(out=out, data_root=data or settings.data_path(), steps=steps, batch_size=batch_size,
                      n_min=n_min, n_max=n_max, max_passage_tokens=max_passage_tokens, teacher=teacher,
                      lm_weight=lm_weight, first_weight=first_weight, inline_weight=inline_weight, lr=lr,
                      lora_r=lora_r, lora_alpha=lora_alpha,
                      dtype=dtype, seed=seed, shuffle=shuffle, teacher_scores=teacher_scores,
                      max_minutes=max_minutes, sources=sources, distractors=distractors,
                      template=template)
    summary = train(cfg, home=settings.home / "cache", device=settings.device)
    console.print_json(json.dumps({k: v for k, v in summary.items() if k != "config"}))


def eval_reranker(
    dataset: Annotated[list[str] | None, typer.Option(
        help="scifact, trec-dl-2019, trec-dl-2021 (repeatable or comma-separated; default: scifact and "
             "trec-dl-2019)")] = None,
    first_stage: Annotated[list[str] | None, typer.Option(
        help="bm25, sieve-embed, all-minilm-l6-v2 (repeatable or comma-separated; default bm25)")] = None,
    mode: Annotated[list[str] | None, typer.Option(
        help="sliding, full, first, inline, likelihood (repeatable or comma-separated; default: all but "
             "likelihood)")] = None,
    model: Annotated[str, typer.Option(help="sieve-rank or a reranker folder")] = "sieve-rank",
    fusion: Annotated[bool, typer.Option(help="also report each mode fused with the first stage (RRF, k=60)")] = (
        False),
    prior_check: Annotated[bool, typer.Option(
        help="score modes also report prior_correlation: their scores' Spearman correlation with the same "
             "candidates scored under another query (near 1: a passage prior)")] = False,
    depth: Annotated[int, typer.Option(min=1, help="first-stage candidates reranked per query")] = 100,
    queries: Annotated[int | None, typer.Option(min=1, help="only the first N judged queries (sorted ids)")] = None,
    unconstrained: Annotated[bool, typer.Option(help="also decode full rankings without the constraint")] = False,
    top_k: Annotated[int | None, typer.Option(
        min=1, help="full and sliding decode only the top k (the rest keep first-stage order); k=10 gives the "
                    "complete rankings' nDCG@10")] = None,
    data: Annotated[Path | None, typer.Option(help="the shared data folder (default: SIEVE_DATA_DIR)")] = None,
    dtype: Annotated[str | None, typer.Option(help="backbone dtype (default SIEVE_DTYPE)")] = None,
    name: Annotated[str, typer.Option(help="results file bench/results/NAME.json")] = "reranker-eval",
) -> None:
    """nDCG@10 of first stage / sliding / full / first reranking, format-fault rates and cost per query."""
    from .eval import MODES, evaluate, write_eval
    from .listwise import MODES as RANK_MODES

    settings = _settings()
    modes = tuple(_items(mode) or MODES)
    if bad := [m for m in modes if m not in RANK_MODES]:
        raise _fail(f"unknown mode(s) {', '.join(bad)}; choose from {', '.join(RANK_MODES)}")
    reranker = _load(model, settings, dtype)
    rows, out = [], None
    datasets, stages = _items(dataset) or ["scifact", "trec-dl-2019"], tuple(_items(first_stage) or ["bm25"])
    for row in evaluate(reranker, datasets, data_root=data or settings.data_path(),
                        home=settings.home / "cache", device=settings.device, dtype=dtype or settings.dtype,
                        first_stages=stages, modes=modes, depth=depth, queries=queries,
                        unconstrained=unconstrained, top_k=top_k, fusion=fusion, prior_check=prior_check,
                        console=err):
        rows.append(row)
        out = write_eval(name, rows)  # after every row: a long run never loses what it measured
    table = Table(title="reranking quality")
    for col in ("dataset", "system", "mode", "ndcg@10", "s/query", "tokens/query", "wrong fmt", "repeat", "missing"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["dataset"], r["system"], r["mode"], f"{r['ndcg@10']:.4f}", f"{r['seconds_per_query']:.2f}",
                      str(r.get("tokens_per_query", "")), *(str(r.get(k, "")) for k in
                                                          ("wrong_format_rate", "repetition_rate", "missing_rate")))
    console.print(table)
    console.print(f"wrote {out}")
