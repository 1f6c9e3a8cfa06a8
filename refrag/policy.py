"""Selective expansion: which blocks to feed as full tokens instead of one vector ("compress anywhere").

A policy scores every context block against the query; the top `round(p * n_blocks)` are expanded, wherever they
sit in the context. Three policies:

- "similarity" (heuristic): cosine between the chunk encoder's query vector and each block vector. Free: both
  vectors exist already (the block vectors are precomputed at index time).
- "recency" (heuristic): the blocks nearest the end of the context, i.e. nearest the continuation (language
  modelling) or the question (QA). Free, and needs no query.
- "learned": `PolicyScorer` (projector.py), an MLP over (query, block, position) features, trained on the
  decoder's perplexity gain from expanding each block alone (train.py, stage "policy"); the paper uses RL with
  the same reward, this is its supervised approximation.

For language modelling (no question) the query is the last context block: the text nearest the continuation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .projector import PolicyScorer

POLICIES = ("similarity", "recency", "learned")
# What an answer expands when the caller does not say (a model folder's refrag.json may set its own): a quarter of
# the blocks, picked by similarity. Measured on NQ-open (100 questions, 20 documents each, refrag-k16): exact match
# 0.13 against 0.05 fully compressed and 0.11 on the full-context prompt, with 36% of its decoder positions.
DEFAULT_EXPANSION = 0.25
DEFAULT_POLICY = "similarity"


def check_policy(policy: str) -> str:
    """`policy` if it names a policy, else ValueError naming the known ones."""
    if policy not in POLICIES:
        raise ValueError(f"unknown expansion policy {policy!r}; known: {', '.join(POLICIES)}")
    return policy


def n_expanded(n_blocks: int, p: float) -> int:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"expansion must be a fraction between 0 and 1, got {p}")
    return min(n_blocks, math.floor(p * n_blocks + 0.5))


def block_positions(n: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.float32) / max(n - 1, 1)


def score_blocks(policy: str, query: torch.Tensor, blocks: torch.Tensor,
                 scorer: PolicyScorer | None = None) -> torch.Tensor:
    """query [dim], blocks [n, dim] (chunk-encoder vectors) -> scores [n]; higher: expand first."""
    check_policy(policy)
    if policy == "similarity":
        return F.cosine_similarity(query[None].float(), blocks.float(), dim=-1)
    if policy == "recency":
        return block_positions(len(blocks))
    if scorer is None:  # "learned"
        raise ValueError("this model has no learned policy (policy.safetensors); use policy='similarity'")
    p = next(scorer.parameters())
    with torch.no_grad():
        return scorer(query.to(p), blocks.to(p), block_positions(len(blocks)).to(p)).float().cpu()


def select(scores: torch.Tensor, p: float) -> set[int]:
    """Indices of the top round(p * n) blocks."""
    m = n_expanded(len(scores), p)
    if m == 0:
        return set()
    return set(torch.topk(scores, m).indices.tolist())
