"""Listwise reranking with the backbone: full ranking in one pass, FIRST (first-token logits), sliding window;
constrained decoding that can only emit a valid permutation."""

from .listwise import MODES, RankResult, RankStats, Reranker, sliding_windows
from .model_dir import RerankerConfig, load_reranker, resolve_reranker
from .permutation import IdTokens, PermutationConstraint, UnsupportedTokenizer, parse_permutation
from .prompt import RANKGPT, TEMPLATES, PromptBuilder, PromptTemplate, PromptTooLong

__all__ = [
    "MODES", "RANKGPT", "TEMPLATES", "IdTokens", "PermutationConstraint", "PromptBuilder", "PromptTemplate",
    "PromptTooLong", "RankResult", "RankStats", "Reranker", "RerankerConfig", "UnsupportedTokenizer",
    "load_reranker", "parse_permutation", "resolve_reranker", "sliding_windows",
]
