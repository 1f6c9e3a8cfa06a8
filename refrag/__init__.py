"""REFRAG compressed RAG decoding: each k-token block of retrieved context enters the decoder as one projected vector,
a policy expands the few blocks that matter back to tokens, and answers stream token by token.

Composes parts it does not own (the backbone through `inputs_embeds`, a frozen chunk encoder) with the parts it does:
compression (encoder.py, prompt.py), the projector (projector.py), expansion (policy.py), the answer loop
(answer.py). Training is train.py, evaluation eval.py; neither is imported by inference.
"""

# Names load on first use (sieve/lazy.py): importing this package, as the CLI does, does not import torch.

from __future__ import annotations

from typing import TYPE_CHECKING

from sieve.lazy import lazy_exports

if TYPE_CHECKING:
    from .answer import Answerer, AnswerStats, AnswerStream
    from .batched import BatchedDecoder, Busy
    from .encoder import BlockEncoder, EncodedPassage, block_spans, encode_blocks, load_block_encoder
    from .model import Refrag
    from .model_dir import RefragConfig, load_refrag, resolve_refrag
    from .policy import POLICIES
    from .projector import PolicyScorer, Projector
    from .prompt import Layout, Segment, lm_layout, qa_layout

_WHERE = {
    "Answerer": ".answer",
    "BatchedDecoder": ".batched",
    "Busy": ".batched",
    "AnswerStats": ".answer",
    "AnswerStream": ".answer",
    "BlockEncoder": ".encoder",
    "EncodedPassage": ".encoder",
    "block_spans": ".encoder",
    "encode_blocks": ".encoder",
    "load_block_encoder": ".encoder",
    "Refrag": ".model",
    "RefragConfig": ".model_dir",
    "load_refrag": ".model_dir",
    "resolve_refrag": ".model_dir",
    "POLICIES": ".policy",
    "PolicyScorer": ".projector",
    "Projector": ".projector",
    "Layout": ".prompt",
    "Segment": ".prompt",
    "lm_layout": ".prompt",
    "qa_layout": ".prompt",
}

__all__ = [
    "POLICIES", "AnswerStats", "AnswerStream", "Answerer", "BatchedDecoder", "BlockEncoder", "Busy", "EncodedPassage",
    "Layout", "PolicyScorer", "Projector", "Refrag", "RefragConfig", "Segment", "block_spans", "encode_blocks",
    "lm_layout", "load_block_encoder", "load_refrag", "qa_layout", "resolve_refrag",
]


__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
