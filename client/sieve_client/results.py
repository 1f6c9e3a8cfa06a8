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
class ServerInfo:
    version: str
    default_model: str
    models: list[ModelInfo]
    limits: dict[str, int]
    auth_enabled: bool


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
    chunk_id: int
    document_id: str
    text: str
    score: float
    metadata: dict[str, Any]
    ordinal: int


@dataclass
class Rank:
    index: int
    score: float
    text: str | None = None
