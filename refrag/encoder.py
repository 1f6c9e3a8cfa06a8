"""REFRAG's compression side: cut text into blocks of k decoder tokens and embed each block with a chunk encoder.

The chunk encoder is all-MiniLM-L6-v2 by default, frozen: its vectors then do not depend on anything REFRAG trains,
so the vectors the indexing workers store (`BlockEncoder.encode_blocks`) stay valid when a new projector ships. A
model trained with `--tune-encoder` (the paper's recipe: encoder and projector learn together) carries its own
encoder folder; its fingerprint differs, so vectors stored by another encoder are not used with it (the service
encodes those chunks' text instead) and workers store the served model's encoder's vectors. The projector
(projector.py) maps them into the decoder's embedding space at answer time (one small matmul).

Blocks are cut in the *decoder's* tokens (so "expand a block" means feeding exactly those k tokens), per passage:
a passage of n tokens makes ceil(n / k) blocks, the last one shorter when n is not a multiple of k. The encoder
reads each block's decoded text.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from sieve.backbone import Tokenizer

MAX_K = 64


ENCODER_DIR = "encoder"  # a tuned chunk encoder inside a REFRAG model folder (sentence-transformers layout)


class ChunkEncoder(Protocol):
    """Text -> one vector per text. `embed` builds no graph unless the encoder is being trained (`set_trainable`)."""

    name: str
    dim: int

    def embed(self, texts: Sequence[str]) -> torch.Tensor:  # [n, dim] float32 on the CPU
        ...


class SentenceTransformerChunkEncoder:
    """A sentence-transformers folder (all-MiniLM-L6-v2: 384-d, mean-pooled, L2-normalized) as a chunk encoder."""

    def __init__(self, folder: str | Path, *, name: str, device: str = "cpu", batch_size: int = 128):
        from sentence_transformers import SentenceTransformer

        self.name = name
        # a tuned encoder is stored in float16: load it as float32
        self.model = SentenceTransformer(str(folder), device=device, model_kwargs={"dtype": torch.float32}).float()
        dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(dim())
        self.batch_size = batch_size
        self.trainable = False
        self.model.requires_grad_(False)

    def set_trainable(self, on: bool = True) -> None:
        """Training (train.py, --tune-encoder): `embed` then runs with autograd, in one batch, so the loss reaches the
        encoder's weights. Dropout stays off (eval mode), as in inference."""
        self.trainable = on
        self.model.eval().requires_grad_(on)

    def parameters(self):
        return self.model.parameters()

    def save(self, folder: str | Path) -> None:
        """A sentence-transformers folder with float16 weights (half the size; loading casts back to float32)."""
        import copy

        copy.deepcopy(self.model).half().save(str(folder))

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        if not texts:
            return torch.zeros(0, self.dim)
        if self.trainable and torch.is_grad_enabled():
            features = self.model.preprocess(list(texts))
            device = next(self.model.parameters()).device
            features = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in features.items()}
            return self.model(features)["sentence_embedding"].float()
        with torch.no_grad():
            out = self.model.encode(list(texts), batch_size=self.batch_size, convert_to_tensor=True,
                                    show_progress_bar=False)
        return out.float().cpu().clone()  # clone: a normal tensor even if encode ran in inference mode


def load_chunk_encoder(name_or_path: str = "all-minilm-l6-v2", *, device: str = "cpu",
                       name: str | None = None) -> ChunkEncoder:
    """A registered embedder name or a sentence-transformers folder. `name` goes into block fingerprints: the
    registered name, or for a tuned encoder `tuned_encoder_name(folder)`."""
    from sieve.registry import resolve_embedder

    folder = resolve_embedder(name_or_path)
    return SentenceTransformerChunkEncoder(folder, name=name or name_or_path, device=device)


def tuned_encoder_name(folder: Path) -> str:
    """A tuned encoder's fingerprint name: its model folder's name and a digest of its weights, so two models with
    different tuned encoders never share stored vectors."""
    digest = hashlib.sha1()
    for f in sorted(folder.rglob("*.safetensors")):
        digest.update(f.read_bytes())
    return f"{folder.parent.name}/{folder.name}@{digest.hexdigest()[:12]}"


def model_encoder(refrag_folder: Path, encoder: str) -> tuple[str, str | None]:
    """(what to load, fingerprint name) for a REFRAG model folder's chunk encoder: its own tuned `encoder/` folder
    when `encoder` names one inside it, else a registered embedder (name None: the registered name)."""
    own = refrag_folder / encoder
    if encoder == ENCODER_DIR and own.is_dir():
        return str(own), tuned_encoder_name(own)
    return encoder, None


def block_spans(n_tokens: int, k: int) -> list[tuple[int, int]]:
    """[start, end) token spans of the blocks of an n-token passage; the last block holds the remainder."""
    if not 1 <= k <= MAX_K:
        raise ValueError(f"block size k={k} must be between 1 and {MAX_K} (trained: 8, 16, 32)")
    return [(s, min(s + k, n_tokens)) for s in range(0, n_tokens, k)]


@dataclass
class EncodedPassage:
    """One passage as REFRAG sees it: its decoder tokens, cut into blocks of k, and one encoder vector per block."""

    token_ids: list[int]
    spans: list[tuple[int, int]]
    vectors: torch.Tensor  # [n_blocks, encoder dim] float32
    k: int
    encoder: str  # BlockEncoder.fingerprint: which encoder and decoder tokenizer made it

    @property
    def n_blocks(self) -> int:
        return len(self.spans)

    def block_ids(self, i: int) -> list[int]:
        s, e = self.spans[i]
        return self.token_ids[s:e]

    # ----------------------------------------------------------------------------------- storage (index time)

    def to_record(self) -> dict:
        """What to store per chunk: the spans are implied by (n_tokens, k); vectors as float16 bytes."""
        return {"encoder": self.encoder, "k": self.k, "n_tokens": len(self.token_ids), "dim": self.vectors.shape[1],
                "vectors": self.vectors.to(torch.float16).numpy().tobytes()}

    @classmethod
    def from_record(cls, record: dict, text: str, tokenizer: Tokenizer) -> EncodedPassage:
        """Rebuild from a stored record and the chunk's text (re-tokenized: cheap and deterministic)."""
        ids = tokenizer.encode(text, add_bos=False)
        if len(ids) != record["n_tokens"]:
            raise ValueError(f"stored encoding has {record['n_tokens']} tokens, the text has {len(ids)}: "
                             "it was made with another tokenizer; re-encode the chunk")
        vec = np.frombuffer(record["vectors"], dtype=np.float16).reshape(-1, record["dim"])
        spans = block_spans(len(ids), record["k"])
        if len(spans) != vec.shape[0]:
            raise ValueError(f"stored encoding has {vec.shape[0]} vectors for {len(spans)} blocks")
        return cls(ids, spans, torch.from_numpy(vec.astype(np.float32)), record["k"], record["encoder"])


class BlockEncoder:
    """The decoder's tokenizer + the chunk encoder: what indexing needs (no decoder weights)."""

    def __init__(self, tokenizer: Tokenizer, encoder: ChunkEncoder):
        self.tokenizer = tokenizer
        self.encoder = encoder
        vocab = json.dumps(sorted(tokenizer.tok.get_vocab(with_added_tokens=True).items()))
        self.fingerprint = f"{encoder.name}|tok-{hashlib.sha1(vocab.encode()).hexdigest()[:12]}"

    def encode_blocks(self, texts: Sequence[str], k: int = 16) -> list[EncodedPassage]:
        """Each text -> its k-token block spans and one encoder vector per block (all texts in one encoder call)."""
        return self.encode_ids(self.tokenizer.encode_batch(list(texts), add_bos=False) if texts else [], k)

    def encode_ids(self, ids: Sequence[Sequence[int]], k: int = 16) -> list[EncodedPassage]:
        """`encode_blocks` for text already in the decoder's tokens (language-model data)."""
        spans = [block_spans(len(t), k) for t in ids]
        block_texts = [self.tokenizer.decode(t[s:e], skip_special=False) for t, sp in zip(ids, spans) for s, e in sp]
        vectors = self.encoder.embed(block_texts)
        out, i = [], 0
        for t, sp in zip(ids, spans):
            out.append(EncodedPassage(list(t), sp, vectors[i:i + len(sp)], k, self.fingerprint))
            i += len(sp)
        return out

    def encode_query(self, text: str) -> torch.Tensor:
        return self.encoder.embed([text])[0]


def encode_blocks(texts: Sequence[str], k: int = 16, *, encoder: BlockEncoder) -> tuple[
        list[list[tuple[int, int]]], list[torch.Tensor]]:
    """The index-time precompute: per text, its block token spans and its block vectors [n_blocks, dim]."""
    encoded = encoder.encode_blocks(texts, k)
    return [e.spans for e in encoded], [e.vectors for e in encoded]


def load_block_encoder(*, home: str | Path, backbone: str = "smollm2-135m-instruct",
                       encoder: str = "all-minilm-l6-v2", device: str = "cpu",
                       refrag_model: str | None = None) -> BlockEncoder:
    """A BlockEncoder without loading decoder weights: the tokenizer comes from the backbone cache (or the source).
    `refrag_model` (a shipped name or folder): use that model's backbone and chunk encoder (its own tuned one if it
    has it), so stored vectors match what the model answers with."""
    from sieve.backbone.config import ModelArgs
    from sieve.backbone.loader import cache_dir_for
    from sieve.backbone.tokenizer import tokenizer_from_gguf, tokenizer_from_hf_folder

    from sieve.registry import resolve_backbone

    name = None
    if refrag_model is not None:
        from .model_dir import RefragConfig, resolve_refrag

        folder = resolve_refrag(refrag_model)
        cfg = RefragConfig.load(folder)
        backbone = cfg.backbone
        encoder, name = model_encoder(folder, cfg.encoder)
    source = resolve_backbone(backbone)
    if source.is_dir():
        args = ModelArgs.from_hf_config(json.loads((source / "config.json").read_text()))
        tokenizer = tokenizer_from_hf_folder(source, args.eos_token_ids)
    else:
        cached = cache_dir_for(source, Path(home).expanduser())
        tokenizer = Tokenizer.load(cached) if (cached / "manifest.json").is_file() else tokenizer_from_gguf(source)
    return BlockEncoder(tokenizer, load_chunk_encoder(encoder, device=device, name=name))
