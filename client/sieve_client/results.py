"""Plain results of the SDK's calls (dataclasses; no protobuf types leak out of the client)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

POOLINGS = {"mean": 1, "last": 2, "weighted_mean": 3}
PRECISIONS = {"float32": 1, "int8": 2, "binary": 3}
METRICS = {"ip": 1, "l2": 2}
INDEX_KINDS = {"flat": 1, "hnsw": 2, "ivf-pq": 3}
JOB_STATUSES = {0: "unspecified", 1: "pending", 2: "running", 3: "done", 4: "failed"}


@dataclass
class EmbedResult:
    """vectors: float32 -> list of lists of floats; int8 -> lists of ints in [-128, 127]; binary -> bytes of packed
    sign bits per text (ceil(dim / 8) each)."""

    vectors: list
    model: str
    dim: int
    precision: str
    tokens: int = 0
    request_ids: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.vectors)

    def to_numpy(self):
        """[n, dim] float32 / int8, or [n, ceil(dim / 8)] uint8 for binary. Needs numpy."""
        import numpy as np

        if self.precision == "binary":
            return np.frombuffer(b"".join(self.vectors), dtype=np.uint8).reshape(len(self.vectors), -1)
        dtype = np.int8 if self.precision == "int8" else np.float32
        return np.asarray(self.vectors, dtype=dtype).reshape(len(self.vectors), self.dim)


@dataclass
class Tokens:
    ids: list[int]
    pieces: list[str]
    instruction_tokens: int


@dataclass
class ModelInfo:
    name: str
    dim: int
    max_length: int
    default_pooling: str
    query_instruction: str
    document_instruction: str
    loaded: bool
    int8_calibrated: bool


@dataclass
class GenerationModel:
    """The reranker or a REFRAG model of a server: its name, whether a call has loaded it yet, and (REFRAG) the
    block size it serves (Answer's `block_size`) and what Answer does when a call leaves `expansion` / `policy`
    unset (None / "" when the server does not say)."""

    name: str
    loaded: bool
    block_size: int = 0
    default_expansion: float | None = None
    default_policy: str = ""


@dataclass
class ServerInfo:
    version: str
    default_model: str
    models: list[ModelInfo]
    limits: dict[str, int]
    auth_enabled: bool
    reranker: GenerationModel | None = None
    answerer: GenerationModel | None = None  # the default REFRAG model
    answerers: list[GenerationModel] = field(default_factory=list)  # every REFRAG model, the default first


@dataclass
class Collection:
    name: str
    embedder: str
    dim: int
    metric: str
    index_kind: str
    documents: int
    chunks: int
    documents_by_status: dict[str, int]
    created_at: datetime | None


@dataclass
class Document:
    id: str
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class JobError:
    document_id: str | None
    line: int | None
    reason: str


@dataclass
class Job:
    id: int
    kind: str
    status: str  # pending | running | done | failed
    collection: str
    total: int
    done: int
    failed: int
    errors: list[JobError]
    created_at: datetime | None
    finished_at: datetime | None

    @property
    def finished(self) -> bool:
        return self.status in ("done", "failed")


@dataclass
class Hit:
    """score: what the hits are ordered by (the reranker's score with rerank=True); vector_score: the index's
    similarity."""

    chunk_id: int
    document_id: str
    text: str
    score: float
    metadata: dict[str, Any]
    ordinal: int
    vector_score: float | None = None


@dataclass
class Rank:
    """A passage's place in a ranking: `index` into the passages sent, its score (higher is better)."""

    index: int
    score: float
    text: str | None = None


@dataclass
class RerankResult:
    """The ranking, best first (iterate it, index it, or take `order`), and what the server did."""

    ranks: list[Rank]
    model: str
    mode: str  # full | first | sliding | inline | likelihood
    passage_cap: int = 0  # tokens each passage was allowed
    truncated: int = 0  # passages cut to passage_cap
    tokens: int = 0  # tokens the model processed
    seconds: float = 0.0  # model time
    request_id: str = ""
    fused: bool = False  # the mode's order fused with the request order (RRF scores)

    @property
    def order(self) -> list[int]:
        return [r.index for r in self.ranks]

    def __iter__(self):
        return iter(self.ranks)

    def __len__(self) -> int:
        return len(self.ranks)

    def __getitem__(self, i):
        return self.ranks[i]


@dataclass
class Citation:
    """A passage an answer draws on: `index` into the passages sent (or the retrieved list); for retrieved
    chunks also their chunk id, document id, retrieval score and text."""

    index: int
    chunk_id: int = 0
    document_id: str = ""
    score: float = 0.0
    text: str = ""


@dataclass
class AnswerUsage:
    prompt_positions: int  # decoder positions of the compressed prompt
    full_prompt_tokens: int  # the same prompt uncompressed
    blocks: int
    expanded_blocks: int
    generated_tokens: int
    precomputed_passages: int
    time_to_first_token_s: float
    model: str = ""  # the REFRAG model that answered
    block_size: int = 0  # its decoder tokens per compressed block
