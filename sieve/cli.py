"""The `sieve` command line: thin commands over the library, output through rich."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from sieve import cli_index, cli_service
from sieve.cli_common import cli_settings, console, err, fail, load_backbone_or_exit
from sieve.refrag.cli import answer, eval_refrag, train_refrag
from sieve.remote import ApiKeyOption, RemoteOption, connect, remote_errors
from sieve.reranker.cli import eval_reranker, rerank, train_reranker
from sieve.settings import Settings

app = typer.Typer(help="Sieve: embeddings, full ranking and compressed RAG answers from one small LLM backbone.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
train_app = typer.Typer(help="Train Sieve's models.", no_args_is_help=True)
eval_app = typer.Typer(help="Evaluate Sieve's models on ../shared/data.", no_args_is_help=True)
db_app = typer.Typer(help="The SQL store: migrations.", no_args_is_help=True)
app.add_typer(train_app, name="train")
app.add_typer(eval_app, name="eval")
app.add_typer(db_app, name="db")
def _apply_runtime_options(bb, settings: Settings, quant: str | None, attention: str = "causal",
                           compile_decode: bool = False, sparse_min_length: int | None = None):
    """--quant swaps the linears for weight-only int8/int4 ones; --attention sparse registers the sparse modes
    (returns the causal one, whose stats count sparse and dense calls); --compile compiles the decode step."""
    from sieve.backbone.runtime import apply_speed_options
    from sieve.kernels import SparseConfig, register_sparse_attention

    config = SparseConfig() if sparse_min_length is None else SparseConfig(min_length=sparse_min_length)
    sparse_fn, _ = register_sparse_attention(config)
    if attention not in ("causal", "sparse"):
        raise fail(f"--attention {attention!r}: choose causal or sparse")
    if quant is not None and quant not in ("int8", "int4"):
        raise fail(f"--quant {quant!r}: choose int8 or int4")
    with err.status(f"quantizing weights to {quant} ..." if quant else "preparing the decoder ..."):
        apply_speed_options(bb.model, quant=quant, compile=compile_decode,
                            cache_dir=settings.home / "cache" / "aot",
                            calibration_dir=settings.home / "cache" / "calibration",
                            on_compile=lambda msg: err.print(f"[dim]{msg}[/dim]"))
    return sparse_fn


@app.command()
def info(
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    quant: Annotated[str | None, typer.Option(help="show the backbone quantized: int8 or int4")] = None,
    compile_decode: Annotated[bool, typer.Option("--compile", help="show the decode step compiled")] = False,
) -> None:
    """Show the backbone in use: size, device, dtype, cache, and how long loading took."""
    import torch

    from sieve.backbone import ATTENTION_MODES
    from sieve.backbone.quant import quant_summary
    from sieve.backbone.runtime import decode_path
    from sieve.kernels import SparseConfig

    settings = cli_settings()
    bb = load_backbone_or_exit(settings)
    _apply_runtime_options(bb, settings, quant, compile_decode=compile_decode)
    a = bb.args
    sparse = SparseConfig()
    facts = {
        "backbone": settings.backbone,
        "source": str(bb.source),
        "architecture": f"{a.arch}: {a.n_layers} layers, d_model {a.dim}, {a.n_heads} q / {a.n_kv_heads} kv heads, "
                        f"vocab {a.vocab_size}, context {a.max_seq_len}, rope theta {a.rope_theta:g}",
        "parameters": bb.model.num_parameters(),
        "device": str(bb.device),
        "dtype": str(bb.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "cache": str(bb.cache_dir) if bb.cache_dir else "none (weights read in place)",
        "first_start_convert_s": bb.convert_seconds,
        "this_load_s": round(bb.load_seconds, 3),
        "loaded_from": "source (converted now)" if bb.converted_now else ("cache" if bb.cache_dir else "source"),
        "attention_modes": sorted(ATTENTION_MODES),
        "sparse_attention": f"block {sparse.block_size}, gamma {sparse.gamma}, dense below {sparse.min_length} keys; "
                            f"{'triton' if bb.device.type == 'cuda' else 'torch reference (cpu)'}",
        "quantization": quant_summary(bb.model),
        "decode": decode_path(bb.model),
        "torch": torch.__version__,
    }
    if bb.cache_rebuilt_reason:
        facts["cache_rebuilt_because"] = bb.cache_rebuilt_reason
    if as_json:
        console.print_json(json.dumps(facts))
        return
    table = Table(show_header=False, box=None)
    for k, v in facts.items():
        if k == "parameters":
            v = f"{v:,} ({v / 1e6:.1f} M)"
        elif k == "first_start_convert_s":
            k, v = "first start (GGUF conversion)", "n/a" if v is None else f"{v:.2f} s"
        elif k == "this_load_s":
            k, v = "this start", f"{v:.2f} s"
        elif isinstance(v, list):
            v = ", ".join(v)
        elif isinstance(v, dict):
            v = ", ".join(f"{a}: {b}" for a, b in v.items())
        table.add_row(f"[bold]{k}[/]", str(v))
    console.print(table)


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="the prompt; '-' reads it from stdin")],
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 256,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 is greedy")] = 0.0,
    top_k: Annotated[int | None, typer.Option(min=1)] = None,
    top_p: Annotated[float | None, typer.Option(min=0.0, max=1.0)] = None,
    seed: Annotated[int | None, typer.Option(help="seed for sampling")] = None,
    chat: Annotated[bool, typer.Option(help="wrap the prompt in the model's chat template")] = True,
    system: Annotated[str | None, typer.Option(help="system message (chat mode)")] = None,
    quant: Annotated[str | None, typer.Option(help="weight-only quantization: int8 or int4")] = None,
    attention: Annotated[str, typer.Option(help="prompt attention: causal or sparse (block-sparse)")] = "causal",
    sparse_min_length: Annotated[int | None, typer.Option(
        min=0, help="with --attention sparse: prompts with fewer keys run dense (default 65,536, the crossover "
        "measured on an H200; SmolLM2's 8K context stays dense unless this is lower)")] = None,
    compile_decode: Annotated[bool, typer.Option(
        "--compile", help="compile the decode step (AOTInductor on CPU: faster tokens after a one-time compile per "
        "batch and cache length, 35-120 s on 2 cores, kept in SIEVE_HOME/cache/aot)")
    ] = False,
) -> None:
    """Stream the backbone's answer to PROMPT, token by token."""
    import torch

    settings = cli_settings()
    if prompt == "-":
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise fail("the prompt is empty")
    bb = load_backbone_or_exit(settings)
    sparse_fn = _apply_runtime_options(bb, settings, quant, attention, compile_decode, sparse_min_length)
    generator = torch.Generator(device=bb.device).manual_seed(seed) if seed is not None else None
    ids = bb.encode_prompt(prompt, chat=chat, system=system)
    n, t0 = 0, time.perf_counter()
    try:
        tokens = bb.stream_ids(ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                               top_p=top_p, generator=generator, prefill_mode=attention)

        def counted():
            nonlocal n
            for tok in tokens:
                n += 1
                yield tok

        for piece in bb.tokenizer.stream_decode(counted()):
            sys.stdout.write(piece)
            sys.stdout.flush()
    except ValueError as e:
        raise fail(str(e)) from None
    seconds = time.perf_counter() - t0
    sys.stdout.write("\n")
    err.print(f"[dim]{len(ids)} prompt tokens, {n} generated in {seconds:.2f} s "
              f"({n / seconds if seconds else 0:.1f} tokens/s incl. prefill) on {bb.device}[/]")
    if attention == "sparse":
        st = sparse_fn.stats
        err.print(f"[dim]sparse prefill: {st.sparse_calls} of {st.sparse_calls + st.dense_calls} attention calls "
                  f"sparse, {st.density:.0%} of causal blocks computed[/]")


@app.command()
def embed(
    texts: Annotated[list[str], typer.Argument(help="texts to embed")],
    model: Annotated[str | None, typer.Option(help="sieve-embed, all-minilm-l6-v2, or a model folder (default: "
                                                   "sieve-embed; with --remote, the server's default)")] = None,
    query: Annotated[bool, typer.Option("--query", help="use the model's query instruction")] = False,
    instruction: Annotated[str | None, typer.Option(help="a custom instruction (overrides --query)")] = None,
    pooling: Annotated[str | None, typer.Option(help="mean, last, weighted_mean (default: the model's)")] = None,
    dim: Annotated[int | None, typer.Option(help="Matryoshka size")] = None,
    precision: Annotated[str, typer.Option(help="float32, int8, binary")] = "float32",
    no_truncate: Annotated[bool, typer.Option("--no-truncate", help="refuse texts over the limit")] = False,
    remote: RemoteOption = None,
    api_key: ApiKeyOption = None,
) -> None:
    """Embed TEXTS and print one JSON object: the vectors, their shape and dtype."""
    if remote:
        with remote_errors(), connect(remote, api_key) as client:
            res = client.embed(texts, model=model, query=query, instruction=instruction, pooling=pooling, dim=dim,
                               precision=precision, truncate=not no_truncate)
        vecs = res.to_numpy()
        console.print_json(json.dumps({"model": res.model, "shape": list(vecs.shape), "dtype": str(vecs.dtype),
                                       "vectors": vecs.tolist()}))
        return
    from sieve.embedder import InputTooLong, load_embedder
    from sieve.registry import resolve_embedder

    settings = cli_settings()
    try:
        emb = load_embedder(resolve_embedder(model or "sieve-embed"), home=settings.home / "cache",
                            device=settings.device, dtype=settings.dtype)
        instr = instruction if instruction is not None else (emb.query_instruction if query else None)
        vecs = emb.encode(texts, instruction=instr, pooling=pooling, dim=dim, precision=precision,
                          truncate=not no_truncate)
    except (FileNotFoundError, InputTooLong, ValueError) as e:
        raise fail(str(e)) from None
    console.print_json(json.dumps({"model": emb.name, "shape": list(vecs.shape), "dtype": str(vecs.dtype),
                                   "vectors": vecs.tolist()}))


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Run Alembic migrations up to the newest on SIEVE_DATABASE_URL (default: SQLite under SIEVE_HOME)."""
    from sieve.store.migrate import current, upgrade

    url = cli_settings().resolved_database_url()
    upgrade(url)
    console.print(f"database {url} at revision {current(url)}")


@db_app.command("current")
def db_current() -> None:
    """Print the database's migration revision."""
    from sieve.store.migrate import current

    url = cli_settings().resolved_database_url()
    console.print(f"database {url} at revision {current(url) or 'none (run sieve db upgrade)'}")


@train_app.command("embedder")
def train_embedder(
    out: Annotated[Path, typer.Option(help="model folder to write (adapter, config, log, checkpoint)")] = Path(
        "embedder/models/sieve-embed"),
    data: Annotated[Path | None, typer.Option(help="the shared data folder (default: SIEVE_DATA_DIR)")] = None,
    steps: Annotated[int, typer.Option(min=1)] = 90,
    batch_size: Annotated[int, typer.Option(min=2)] = 16,
    hard_negatives: Annotated[int, typer.Option(min=0)] = 1,
    lr: float = 2e-4,
    lora_r: int = 16,
    lora_alpha: float = 32.0,
    temperature: float = 0.05,
    max_doc_len: int = 160,
    distill_weight: Annotated[float, typer.Option(help="KL to all-MiniLM-L6-v2's in-batch scores; 0: off")] = 0.0,
    scifact_weight: Annotated[float, typer.Option(help="share of batches from SciFact train")] = 0.6,
    medquad_weight: Annotated[float, typer.Option(help="share of batches from MedQuAD")] = 0.4,
    seed: int = 0,
    init_adapter: Annotated[Path | None, typer.Option(
        help="start from this adapter.safetensors (same r) instead of a fresh LoRA")] = None,
) -> None:
    """Train the sieve-embed LoRA adapter (resumes from OUT/checkpoint.pt), then calibrate int8 ranges."""
    from sieve.embedder.train import TrainConfig, calibrate_and_save, train

    settings = cli_settings()
    data = data or settings.data_path()
    cfg = TrainConfig(out=out, data_root=data, steps=steps, batch_size=batch_size, hard_negatives=hard_negatives,
                      lr=lr, lora_r=lora_r, lora_alpha=lora_alpha, temperature=temperature, max_doc_len=max_doc_len,
                      distill_weight=distill_weight, seed=seed, init_adapter=init_adapter,
                      sources={k: v for k, v in {"scifact-train": scifact_weight, "medquad": medquad_weight}.items()
                               if v > 0})
    summary = train(cfg, home=settings.home / "cache", device=settings.device)
    calibrate_and_save(out, data, home=settings.home / "cache")
    console.print_json(json.dumps({k: v for k, v in summary.items() if k != "config"}))


@eval_app.command("embedder")
def eval_embedder(
    dataset: Annotated[list[str], typer.Option(help="scifact, trec-dl-2019, cranfield, cisi, ... (repeatable)")],
    systems: Annotated[list[str] | None, typer.Option(
        "--system", help="sieve-embed, all-minilm-l6-v2, bm25, or a path (repeatable; default: all three)")] = None,
    data: Annotated[Path | None, typer.Option(help="the shared data folder (default: SIEVE_DATA_DIR)")] = None,
    split: str = "test",
    max_doc_tokens: Annotated[int, typer.Option(help="document truncation for embedders")] = 512,
    dtype: Annotated[str | None, typer.Option(help="dtype of LLM embedders (default SIEVE_DTYPE); "
                                              "sentence-transformers baselines run in float32")] = None,
    name: Annotated[str, typer.Option(help="results file bench/results/NAME.json")] = "embedder-eval",
) -> None:
    """nDCG@10 / recall@100 / MRR@10 (ranx) of embedders and BM25 on BEIR-style sets; JSON to bench/results/."""
    from sieve.embedder.eval import evaluate, write_eval

    settings = cli_settings()
    systems = systems or ["sieve-embed", "all-minilm-l6-v2", "bm25"]
    rows = []
    for row in evaluate(systems, dataset, data_root=data or settings.data_path(), split=split,
                        home=settings.home / "cache", device=settings.device, dtype=dtype or settings.dtype,
                        max_doc_tokens=max_doc_tokens, console=err):
        rows.append(row)
        out = write_eval(name, rows)  # after every row: a long run never loses what it measured
    table = Table(title="retrieval quality")
    for col in ("system", "dataset", "ndcg@10", "recall@100", "mrr@10", "seconds"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["system"], r["dataset"], f"{r['ndcg@10']:.4f}", f"{r['recall@100']:.4f}",
                      f"{r['mrr@10']:.4f}", f"{r['seconds']:.0f}")
    console.print(table)
    console.print(f"wrote {out}")


cli_index.register(app)
cli_service.register(app)  # sieve serve, sieve keys create|list|revoke
app.command("rerank")(rerank)
train_app.command("reranker")(train_reranker)
eval_app.command("reranker")(eval_reranker)
app.command("answer")(answer)
train_app.command("refrag")(train_refrag)
eval_app.command("refrag")(eval_refrag)

if __name__ == "__main__":
    app()
