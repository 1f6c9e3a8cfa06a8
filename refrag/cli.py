"""Bodies of the `sieve answer`, `sieve train refrag` and `sieve eval refrag` commands.

Plain typer functions, mounted by sieve/cli.py (this module does not import it, so there is no cycle):

    from sieve.refrag.cli import answer, eval_refrag, train_refrag
    app.command("answer")(answer)
    train_app.command("refrag")(train_refrag)
    eval_app.command("refrag")(eval_refrag)

Until they are mounted, `python -m sieve.refrag.cli {answer,train,eval} ...` runs the same functions.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from sieve.cli_common import cli_settings as _settings
from sieve.cli_common import console, err
from sieve.cli_common import fail as _fail
from sieve.remote import ApiKeyOption, RemoteOption, connect, remote_errors, remote_only

# the consoles, settings + logging setup and the one way to fail that every `sieve` command shares


def _read_passages(items: list[str], files: list[Path]) -> list[str]:
    """Inline passages, plus files: a .jsonl file gives one passage per line ('text', with 'title' if any);
    any other file is one passage."""
    out = list(items)
    for f in files:
        if not f.is_file():
            raise _fail(f"no file {f}")
        text = f.read_text()
        if f.suffix == ".jsonl":
            for line in text.splitlines():
                if line.strip():
                    row = json.loads(line)
                    out.append(f"{row['title']}\n{row['text']}" if row.get("title") else str(row.get("text", "")))
        else:
            out.append(text.strip())
    return out


def answer(
    question: Annotated[str, typer.Argument(help="the question")],
    passages: Annotated[list[str] | None, typer.Argument(help="passages to answer from (or --file)")] = None,
    file: Annotated[list[Path] | None, typer.Option(help="a passage file (repeatable): plain text = one passage, "
                                                        ".jsonl = one passage per line with 'text'/'title'")] = None,
    k: Annotated[int | None, typer.Option(help="block size in decoder tokens (default: the model's; on a server, "
                                               "the served model trained for it answers)")] = None,
    expansion: Annotated[float | None, typer.Option(min=0.0, max=1.0, help=(
        "fraction of blocks fed as full tokens (0: all compressed; default: the model's, 0.25 for shipped "
        "ones)"))] = None,
    policy: Annotated[str | None, typer.Option(help="similarity, recency or learned (default: the model's, "
                                                    "similarity for shipped ones)")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 128,
    model: Annotated[str, typer.Option(help="refrag-k16 or a REFRAG model folder (local; a server uses its "
                                            "own)")] = "refrag-k16",
    stats: Annotated[bool, typer.Option(help="print what was used and what it cost (stderr)")] = True,
    collection: Annotated[str | None, typer.Option(help="retrieve the passages from this collection on the "
                                                        "server (needs --remote)")] = None,
    top_k: Annotated[int | None, typer.Option(min=1, help="passages to retrieve from --collection (default: "
                                                          "the server's)")] = None,
    remote: RemoteOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Answer QUESTION from PASSAGES (or, on a server, from a collection) with REFRAG compressed decoding,
    streaming the answer to the terminal."""
    remote_only(remote, collection=collection, top_k=top_k)
    texts = _read_passages(list(passages or []), list(file or []))
    if remote:
        return _answer_remote(remote, api_key, question, texts, collection, top_k or 0, expansion, policy,
                              max_new_tokens, stats, k or 0)
    from sieve.backbone import BackboneNotFound, WeightsError

    from .answer import Answerer
    from .model_dir import load_refrag

    settings = _settings()
    try:
        with err.status(f"loading {model} ..."):
            refrag = load_refrag(model, home=settings.home / "cache", device=settings.device, dtype=settings.dtype)
    except (BackboneNotFound, WeightsError, FileNotFoundError, ValueError) as e:
        raise _fail(str(e)) from None
    try:
        stream = Answerer(refrag).stream(question, texts, k=k, expansion=expansion, policy=policy,
                                         max_new_tokens=max_new_tokens)
    except ValueError as e:
        raise _fail(str(e)) from None
    try:
        for piece in stream:
            sys.stdout.write(piece)
            sys.stdout.flush()
    except KeyboardInterrupt:
        stream.close()
    sys.stdout.write("\n")
    if stats:
        s = stream.stats
        err.print(f"[dim]passages {stream.passages}; {s.blocks} blocks, {s.expanded} expanded; "
                  f"{s.prompt_positions} decoder positions instead of {s.full_prompt_tokens}; "
                  f"{s.generated_tokens} tokens, first after {1000 * (s.ttft_s or 0):.0f} ms, "
                  f"{s.seconds:.2f} s; stopped: {s.stopped}[/]")


def _answer_remote(remote: str, api_key: str | None, question: str, texts: list[str], collection: str | None,
                   top_k: int, expansion: float | None, policy: str | None, max_new_tokens: int, stats: bool,
                   block_size: int = 0) -> None:
    with remote_errors(), connect(remote, api_key) as client:
        stream = client.answer(question, collection=collection, passages=texts, k=top_k, expansion=expansion,
                               policy=policy or "", max_new_tokens=max_new_tokens, block_size=block_size)
        try:
            for piece in stream:
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            stream.cancel()
    sys.stdout.write("\n")
    if stats:
        u = stream.usage
        sources = ", ".join(f"{c.document_id}#{c.chunk_id}" if c.document_id else str(c.index)
                            for c in stream.citations)
        line = f"[dim]passages {sources or '-'}"
        if u is not None:
            line += (f"; {u.model} (k={u.block_size}), {u.blocks} blocks, {u.expanded_blocks} expanded, "
                     f"{u.precomputed_passages} precomputed; "
                     f"{u.prompt_positions} decoder positions instead of {u.full_prompt_tokens}; "
                     f"{u.generated_tokens} tokens, first after {1000 * u.time_to_first_token_s:.0f} ms")
        err.print(line + f"; stopped: {stream.finish_reason or 'cancelled'} ({remote})[/]")


def train_refrag(
    out: Annotated[Path, typer.Option(help="model folder to write (resumes from OUT/checkpoint.pt)")] = Path(
        "refrag/models/refrag-k16"),
    data: Annotated[Path | None, typer.Option(help="the shared data folder (default: SIEVE_DATA_DIR)")] = None,
    stage: Annotated[list[str] | None, typer.Option(
        help="recon, cpt, sft, policy (repeatable; default recon + cpt + policy)")] = None,
    k: Annotated[int, typer.Option(help="block size in decoder tokens (8, 16, 32)")] = 16,
    batch_size: Annotated[int, typer.Option(min=1)] = 4,
    recon_steps: int = 120,
    recon_max_blocks: int = 8,
    cpt_steps: int = 100,
    cpt_context_tokens: int = 256,
    cpt_target_tokens: int = 64,
    cpt_lora: Annotated[bool, typer.Option(help="also tune a decoder LoRA in continued pre-training")] = False,
    sft_steps: int = 100,
    sft_docs: Annotated[int, typer.Option(help="passages per NQ training question (gold + BM25 distractors)")] = 5,
    sft_lm_mix: Annotated[float, typer.Option(min=0.0, max=1.0, help=(
        "sft: this fraction of each batch is continued-pretraining windows (replay, keeps language modelling)"))] = 0.0,
    expand_max: Annotated[float, typer.Option(help="cpt/sft: up to this fraction of blocks expanded at random")] = 0.25,
    expand_recency: Annotated[float, typer.Option(min=0.0, max=1.0, help=(
        "cpt/sft: this fraction of examples expands its last blocks instead (the recency policy's pattern)"))] = 0.0,
    copy_weight: Annotated[float, typer.Option(min=0.0, help=(
        "cpt/sft: count target tokens that occur in a compressed block 1 + this many times in the loss"))] = 0.0,
    policy_examples: int = 24,
    policy_epochs: int = 200,
    lr: float = 1e-3,
    lora_lr: float = 2e-4,
    lora_r: int = 8,
    tune_encoder: Annotated[bool, typer.Option(
        help="train the chunk encoder too (recon, cpt), as the paper; the folder then ships its own encoder")] = False,
    encoder_lr: float = 5e-5,
    init: Annotated[str | None, typer.Option(
        help="start from this model's weights (a shipped name or folder; same k) instead of from scratch")] = None,
    dtype: Annotated[str, typer.Option(help="autocast dtype: float32, or bfloat16 on a GPU")] = "float32",
    seed: int = 0,
) -> None:
    """Train a REFRAG projector (+ policy, + decoder LoRA in task tuning) with the paper's curriculum."""
    from .train import TrainConfig, train

    settings = _settings()
    cfg = TrainConfig(out=out, data_root=data or settings.data_path(), stages=list(stage or ["recon", "cpt", "policy"]),
                      k=k, batch_size=batch_size, recon_steps=recon_steps, recon_max_blocks=recon_max_blocks,
                      cpt_steps=cpt_steps, cpt_context_tokens=cpt_context_tokens, cpt_target_tokens=cpt_target_tokens,
                      cpt_lora=cpt_lora, sft_steps=sft_steps, sft_docs=sft_docs, sft_lm_mix=sft_lm_mix,
                      expand_max=expand_max, expand_recency=expand_recency, copy_weight=copy_weight,
                      policy_examples=policy_examples,
                      policy_epochs=policy_epochs, lr=lr,
                      lora_lr=lora_lr, lora_r=lora_r, lora_alpha=2.0 * lora_r, dtype=dtype, seed=seed,
                      tune_encoder=tune_encoder, encoder_lr=encoder_lr, init=Path(init) if init else None)
    try:
        summary = train(cfg, home=settings.home / "cache", device=settings.device)
    except ValueError as e:
        raise _fail(str(e)) from None
    console.print_json(json.dumps({k: v for k, v in summary.items() if k != "config"}))


def eval_refrag(
    task: Annotated[list[str] | None, typer.Option(help="wikitext, nq (repeatable; default both)")] = None,
    model: Annotated[str, typer.Option(help="refrag-k16 or a REFRAG model folder")] = "refrag-k16",
    k: Annotated[list[int] | None, typer.Option(help="block sizes to evaluate (repeatable; default 8 16 32)")] = None,
    expansion: Annotated[list[float] | None, typer.Option(help="expansion fractions (default 0 and 0.25)")] = None,
    context: Annotated[list[int] | None, typer.Option(help="WikiText context lengths (default 512 1024 2048)")] = None,
    limit: Annotated[int, typer.Option(min=1, help="examples per setting (WikiText windows / NQ questions)")] = 50,
    n_docs: Annotated[int, typer.Option(help="NQ passages per question")] = 20,
    policy: Annotated[list[str] | None, typer.Option(
        help="expansion policies: similarity, recency, learned (repeatable; default similarity)")] = None,
    data: Annotated[Path | None, typer.Option(help="the shared data folder (default: SIEVE_DATA_DIR)")] = None,
    name: Annotated[str, typer.Option(help="results file bench/results/NAME.json")] = "refrag-eval",
) -> None:
    """Perplexity of the next 128 WikiText-2 test tokens and NQ-open 20-doc EM/accuracy: compressed vs full vs none."""
    from .eval import EvalConfig, run_eval

    settings = _settings()
    cfg = EvalConfig(tasks=list(task or ["wikitext", "nq"]), model=model, ks=list(k or [8, 16, 32]),
                     expansions=list(expansion if expansion is not None else [0.0, 0.25]),
                     contexts=list(context or [512, 1024, 2048]), limit=limit, n_docs=n_docs,
                     policies=list(policy or ["similarity"]),
                     data_root=data or settings.data_path(), name=name)
    try:
        out = run_eval(cfg, home=settings.home / "cache", device=settings.device, dtype=settings.dtype, console=err)
    except (ValueError, FileNotFoundError) as e:
        raise _fail(str(e)) from None
    console.print(f"wrote {out}")


def main() -> None:
    app = typer.Typer(no_args_is_help=True, help="REFRAG commands (mounted in `sieve` as answer / train refrag / "
                                                 "eval refrag)")
    app.command("answer")(answer)
    app.command("train")(train_refrag)
    app.command("eval")(eval_refrag)
    app()


if __name__ == "__main__":
    main()
