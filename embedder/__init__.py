"""Embeddings from the backbone with bidirectional attention (or any sentence-transformers model), one API."""

from .embedder import Embedder
from .encoders import InputTooLong, LLMEncoder, SentenceTransformerEncoder
from .model_dir import EmbedderConfig, load_embedder
from .pooling import POOLING_MODES, pool
from .precision import PRECISIONS, Int8Ranges, from_binary, hamming_search, rescore, to_binary

__all__ = [
    "POOLING_MODES", "PRECISIONS", "Embedder", "EmbedderConfig", "InputTooLong", "Int8Ranges", "LLMEncoder",
    "SentenceTransformerEncoder", "from_binary", "hamming_search", "load_embedder", "pool", "rescore", "to_binary",
]
