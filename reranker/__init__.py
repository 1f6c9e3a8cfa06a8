"""Listwise reranking with the backbone: full ranking in one pass, FIRST (first-token logits), sliding window;
constrained decoding that can only emit a valid permutation."""

# Names load on first use (sieve/lazy.py): importing this package, as the CLI does, does not import torch.

from __future__ import annotations

from typing import TYPE_CHECKING

from sieve.lazy import lazy_exports

if TYPE_CHECKING:
    from .listwise import MODES, RankResult, RankStats, Reranker, sliding_windows
    from .model_dir import RerankerConfig, load_reranker, resolve_reranker
    from .permutation import IdTokens, PermutationConstraint, UnsupportedTokenizer, parse_permutation
    from .prompt import RANKGPT, TEMPLATES, PromptBuilder, PromptTemplate, PromptTooLong

_WHERE = {
    "MODES": ".listwise",
    "RankResult": ".listwise",
    "RankStats": ".listwise",
    "Reranker": ".listwise",
    "sliding_windows": ".listwise",
    "RerankerConfig": ".model_dir",
    "load_reranker": ".model_dir",
    "resolve_reranker": ".model_dir",
    "IdTokens": ".permutation",
    "PermutationConstraint": ".permutation",
    "UnsupportedTokenizer": ".permutation",
    "parse_permutation": ".permutation",
    "RANKGPT": ".prompt",
    "TEMPLATES": ".prompt",
    "PromptBuilder": ".prompt",
    "PromptTemplate": ".prompt",
    "PromptTooLong": ".prompt",
}

__all__ = [
    "MODES", "RANKGPT", "TEMPLATES", "IdTokens", "PermutationConstraint", "PromptBuilder", "PromptTemplate",
    "PromptTooLong", "RankResult", "RankStats", "Reranker", "RerankerConfig", "UnsupportedTokenizer",
    "load_reranker", "parse_permutation", "resolve_reranker", "sliding_windows",
]


__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
