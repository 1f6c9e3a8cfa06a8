"""One typed `Settings` object, read from `SIEVE_*` environment variables once and passed down.

Library code never reads the environment itself: it takes the values it needs as arguments.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SIEVE_", extra="ignore")

    home: Path = Field(Path("~/.cache/sieve"), description="where converted weights, databases and indexes live")
    backbone: str = Field(
        "smollm2-135m-instruct",
        description="a registered backbone name, or a path to a .gguf file or a HF llama/qwen2 safetensors folder",
    )
    device: str = Field("auto", description="auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 on CUDA, float32 on CPU"
    )
    threads: int | None = Field(None, ge=1, description="torch intra-op threads; unset: torch's default")
    log_level: str = Field("INFO", description="logging level of the sieve loggers")
    data_dir: Path | None = Field(
        None, description="the shared evaluation/training data; unset: ../shared/data beside the checkout, "
        "else /work/shared/data")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL of the store, e.g. postgresql+psycopg://user@host:5432/sieve; "
        "unset: the SQLite file <home>/sieve.db")
    index_dir: Path | None = Field(None, description="where FAISS index snapshots live; unset: <home>/indexes")
    # -- indexing (sieve.workers) --
    broker_url: str | None = Field(
        None, description="Celery broker: redis://127.0.0.1:6379/0 or amqp://guest:guest@127.0.0.1:5672//; "
        "unset: an SQLite file under <home> through Celery's SQLAlchemy transport (no server)")
    embedder: str = Field("sieve-embed", description="embedder of new collections and of `sieve embed`")
    chunk_tokens: int = Field(256, ge=8, description="chunk length in the embedder's tokens")
    chunk_overlap: int = Field(32, ge=0, description="tokens shared by consecutive chunks of a document")
    batch_documents: int = Field(32, ge=1, description="documents per unit of work a worker claims")
    job_lease_s: float = Field(
        300.0, gt=0, description="seconds a worker holds a claimed batch before another may take it over "
        "(a worker that dies on this host is noticed at once; on another host after the lease)")
    refrag_blocks: Annotated[tuple[int, ...], NoDecode] = Field(
        (16,), description="block sizes k of the REFRAG block encodings workers precompute for every chunk: one "
        "(16) or several (8,16,32: Answer calls at each block_size then read them); 0: off")
    worker_fanout: int = Field(8, ge=1, description="task messages sent per job (how many workers can share it)")
    # -- serving (sieve.service) --
    grpc_host: str = Field("127.0.0.1", description="address the gRPC server binds; 0.0.0.0 to serve other hosts")
    grpc_port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0: any free port")
    metrics_port: int = Field(
        9464, ge=-1, le=65535, description="Prometheus /metrics HTTP port (on grpc_host); 0: any free port; "
        "-1: no metrics endpoint")
    admin_key: SecretStr | None = Field(
        None, description="a bootstrap API key with every scope. Auth is off only while this is unset and no key "
        "was ever created (`sieve keys create`): the local embedded default")
    tls_cert: Path | None = Field(None, description="PEM certificate chain; with tls_key, the server speaks TLS only")
    tls_key: Path | None = Field(None, description="PEM private key of tls_cert")
    max_batch_tokens: int | None = Field(
        None, ge=64, description="token budget of one model forward (batch size x longest input, padding "
        "included); unset: 2048 on the CPU (measured fastest), 8192 on a GPU")
    max_queued_texts: int = Field(
        4096, ge=1, description="texts waiting for the model before unary calls get RESOURCE_EXHAUSTED")
    max_texts_per_request: int = Field(1024, ge=1, description="texts in one Embed / Tokenize call")
    max_message_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="largest gRPC message, either way")
    max_k: int = Field(1000, ge=1, description="largest `k` of Search")
    max_documents_per_upsert: int = Field(10_000, ge=1, description="documents in one Upsert call")
    auth_cache_s: float = Field(
        5.0, ge=0, description="seconds an API key lookup (and whether auth is on) is cached; a revoked key stops "
        "working within this time")
    shutdown_grace_s: float = Field(10.0, ge=0, description="on SIGTERM/SIGINT, seconds in-flight calls get to finish")
    job_poll_s: float = Field(0.25, gt=0, description="how often WatchJob re-reads a job's progress")
    # -- rerank and answer (sieve.service over sieve.reranker / sieve.refrag) --
    reranker: str = Field("sieve-rank", description="reranker of Rerank and Search(rerank): a shipped name or a folder")
    refrag: str = Field("refrag-k16", description="REFRAG model of Answer: a shipped name or a folder")
    refrag_block_models: str = Field(
        "refrag-k8,refrag-k32", description="more REFRAG models for Answer calls whose block_size is another k: "
        "comma-separated shipped names or folders, each serving the block size it was trained for (loaded on the "
        "first such call, with its own copy of the decoder); empty: only the default model")
    worker_preload: bool = Field(
        True, description="a `sieve worker` loads the embedders of existing collections (SIEVE_EMBEDDER when there "
        "are none) and the REFRAG block encoder before it says ready, instead of in its first batch")
    preload_models: bool = Field(
        False, description="load the reranker and REFRAG model at start (their health is NOT_SERVING until then) "
        "instead of on the first call that needs them")
    max_rerank_passages: int = Field(100, ge=1, le=100, description="passages in one Rerank call")
    rerank_depth: int = Field(
        20, ge=1, le=100, description="candidates Search(rerank) reranks: max(k, this), at most max_rerank_passages")
    answer_k: int = Field(5, ge=1, description="passages Answer retrieves from a collection when the call says 0")
    max_answer_passages: int = Field(50, ge=1, le=200, description="passages in one Answer call (sent or retrieved)")
    answer_max_new_tokens: int = Field(256, ge=1, description="max_new_tokens of Answer when the call says 0")
    max_new_tokens: int = Field(2048, ge=1, description="largest max_new_tokens an Answer call may ask for")
    decode_quant: Literal["none", "int8", "int4"] = Field(
        "none", description="weight-only quantization of the reranker's and REFRAG model's decoder (int4: the "
        "fastest CPU decode; see README, Backbone speed)")
    compile_decode: bool = Field(
        False, description="compile the decode step of the reranker's and REFRAG model's decoder (AOTInductor on "
        "CPU): faster tokens; the first call at each new batch size / cache length compiles (35-120 s on 2 CPU "
        "cores), and the library is kept in SIEVE_HOME/cache/aot for later starts")
    answer_batch: int = Field(
        8, ge=1, description="Answer streams of one REFRAG model that decode together (continuous batching: a call "
        "joins the running batch at the next step); 1: one stream at a time on the model's own KV cache, the only "
        "case the compiled decode step (SIEVE_COMPILE_DECODE) serves")
    max_waiting_generations: int = Field(
        8, ge=0, description="Rerank calls waiting for a busy decoder, and Answer calls waiting for a row of its "
        "batch (SIEVE_ANSWER_BATCH), before more get RESOURCE_EXHAUSTED")

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.home / 'sieve.db'}"

    def resolved_broker_url(self) -> str:
        if self.broker_url:
            return self.broker_url
        return f"sqla+sqlite:///{self.home / 'broker.db'}"

    def index_path(self) -> Path:
        return self.index_dir.expanduser() if self.index_dir is not None else self.home / "indexes"

    def data_path(self) -> Path:
        if self.data_dir is not None:
            return self.data_dir.expanduser()
        beside = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
        return beside if beside.is_dir() else Path("/work/shared/data")

    @field_validator("refrag_blocks", mode="before")
    @classmethod
    def _block_sizes(cls, v):
        """"16", "8,16,32", 16 or [8, 16] -> sorted distinct sizes; 0 is off (none)."""
        parts = v.replace(" ", "").split(",") if isinstance(v, str) else [v] if isinstance(v, int) else list(v)
        try:
            sizes = {int(p) for p in parts if p != ""} - {0}
        except ValueError:
            raise ValueError(f"block sizes are whole numbers separated by commas, got {v!r}") from None
        bad = sorted(k for k in sizes if not 1 <= k <= 64)
        if bad:
            raise ValueError(f"block sizes must be between 1 and 64 (0: off), got {bad}")
        return tuple(sorted(sizes))

    @field_validator("home")
    @classmethod
    def _expand(cls, v: Path) -> Path:
        return v.expanduser()

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in ("auto", "cpu", "cuda") and not v.startswith("cuda:"):
            raise ValueError(f"device {v!r} is not auto, cpu, cuda or cuda:N")
        return v
