"""Listwise reranking with the backbone: full ranking in one pass, FIRST (first-token logits), sliding window;
constrained decoding that can only emit a valid permutation."""

# Names load on first use (PEP 562), so `import sieve.<package>` and the CLI that imports its commands do
# not import torch: a `sieve ... --remote` call starts in a fraction of a second.

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

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


def __getattr__(name: str):
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(where, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
