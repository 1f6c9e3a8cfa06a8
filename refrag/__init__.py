"""REFRAG compressed RAG decoding: each k-token block of retrieved context enters the decoder as one projected vector,
a policy expands the few blocks that matter back to tokens, and answers stream token by token.

Composes parts it does not own (the backbone through `inputs_embeds`, a frozen chunk encoder) with the parts it does:
compression (encoder.py, prompt.py), the projector (projector.py), expansion (policy.py), the answer loop
(answer.py). Training is train.py, evaluation eval.py; neither is imported by inference.
"""

from .answer import Answerer, AnswerStats, AnswerStream
from .encoder import BlockEncoder, EncodedPassage, block_spans, encode_blocks, load_block_encoder
from .model import Refrag
from .model_dir import RefragConfig, load_refrag, resolve_refrag
from .policy import POLICIES
from .projector import PolicyScorer, Projector
from .prompt import Layout, Segment, lm_layout, qa_layout

__all__ = [
    "POLICIES", "AnswerStats", "AnswerStream", "Answerer", "BlockEncoder", "EncodedPassage", "Layout", "PolicyScorer",
    "Projector", "Refrag", "RefragConfig", "Segment", "block_spans", "encode_blocks", "lm_layout", "load_block_encoder",
    "load_refrag", "qa_layout", "resolve_refrag",
]
