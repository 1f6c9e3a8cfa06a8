"""`Refrag`: the parts composed, none of them owned — the backbone's decoder (through `inputs_embeds`), its tokenizer,
a frozen chunk encoder, the projector and the optional learned policy. It turns questions, passages and text into
layouts, picks blocks to expand, and builds decoder inputs. Generation lives in answer.py; training in train.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from sieve.backbone import Tokenizer, Transformer

from .encoder import BlockEncoder, ChunkEncoder, EncodedPassage
from .policy import DEFAULT_EXPANSION, DEFAULT_POLICY, check_policy, n_expanded, score_blocks, select
from .projector import PolicyScorer, Projector
from .prompt import Layout, embed_layout, lm_layout, qa_layout


class Refrag:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, encoder: ChunkEncoder, projector: Projector,
                 *, k: int = 16, scorer: PolicyScorer | None = None, name: str = "refrag",
                 expansion: float = DEFAULT_EXPANSION, policy: str = DEFAULT_POLICY):
        n_expanded(1, expansion)  # validates the fraction
        if check_policy(policy) == "learned" and scorer is None:
            raise ValueError("the default policy is 'learned' but this model has no learned policy "
                             "(policy.safetensors)")
        self.model = model
        self.tokenizer = tokenizer
        self.blocks = BlockEncoder(tokenizer, encoder)
        self.projector = projector
        self.scorer = scorer
        self.k = k  # the block size the projector was trained with
        self.name = name
        self.expansion = expansion  # what an answer expands when its caller does not say (refrag.json)
        self.policy = policy

    @property
    def device(self) -> torch.device:
        return self.model.tok_embeddings.weight.device

    # ------------------------------------------------------------------------------------------------ layouts

    def encode(self, texts: Sequence[str], k: int | None = None) -> list[EncodedPassage]:
        return self.blocks.encode_blocks(texts, self.k if k is None else k)

    def encode_ids(self, ids: Sequence[Sequence[int]], k: int | None = None) -> list[EncodedPassage]:
        return self.blocks.encode_ids(ids, self.k if k is None else k)

    def qa_layout(self, question: str, passages: Sequence[EncodedPassage]) -> Layout:
        return qa_layout(self.tokenizer, question, passages)

    def lm_layout(self, context: EncodedPassage, target_ids: Sequence[int] = ()) -> Layout:
        return lm_layout(self.tokenizer, context, target_ids)

    # ---------------------------------------------------------------------------------------------- expansion

    def choose_expansion(self, layout: Layout, p: float, *, query: torch.Tensor | None = None,
                         policy: str = "similarity") -> set[int]:
        """Block indices (into layout.blocks) to feed as tokens. query: the chunk encoder's vector of the question;
        None: the last block (language modelling)."""
        blocks = layout.blocks
        if p > 0:  # an unknown name is an error at p = 1 too, where no scores are read (p = 0: nothing is chosen)
            check_policy(policy)
        if p <= 0 or not blocks:
            return select(torch.zeros(len(blocks)), p)  # validates p
        if p >= 1:
            return set(range(len(blocks)))
        vectors = torch.stack([b.vector for b in blocks])
        q = vectors[-1] if query is None else query
        return select(score_blocks(policy, q, vectors, self.scorer), p)

    # ------------------------------------------------------------------------------------------------- inputs

    def embed(self, layout: Layout, expand=()) -> torch.Tensor:
        """-> inputs_embeds [1, T, dim] in the decoder's dtype."""
        return embed_layout(self.model.tok_embeddings, self.projector, layout, expand)[None]
