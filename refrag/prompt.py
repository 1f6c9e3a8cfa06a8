"""Compressed prompt assembly: a prompt is a list of segments; a context block is fed either as ONE projected vector
(compressed) or as its k tokens (expanded). With every block expanded, the decoder input is exactly the full-context
token prompt (`Layout.full_ids`), token for token.

Two layouts, the ones the model is trained with:

LM (reconstruction, continued pre-training, WikiText perplexity)::

    <|endoftext|> [block 1] [block 2] ... [block n] target tokens ...

QA (task tuning, answering), inside the chat template as one user turn::

    <|im_start|>user\\n{INSTRUCTION}\\n\\nDocument [1]\\n[block][block]...\\n\\nDocument [2]\\n...\\n\\n
    Question: {question}<|im_end|>\\n<|im_start|>assistant\\n

There are no special boundary tokens around compressed blocks: a block's vector takes one position exactly where
its tokens would be. Passage boundaries are the plain-text headers above, always fed as tokens.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import torch
from sieve.backbone import Tokenizer

from .encoder import EncodedPassage

INSTRUCTION = "Answer the question using the documents below. Reply with a short answer."
_MARK = "\x00REFRAG-CONTEXT\x00"
_QUESTION = "\x00REFRAG-QUESTION\x00"


@dataclass
class Segment:
    """A run of tokens; with `vector` set it is a context block that may be compressed to one position."""

    token_ids: list[int]
    vector: torch.Tensor | None = None  # [encoder dim]
    passage: int = -1  # index of the passage it belongs to (-1: template text)
    block: int = -1  # index of the block within that passage

    @property
    def is_block(self) -> bool:
        return self.vector is not None


@dataclass
class Layout:
    segments: list[Segment]
    passages: list[int] = field(default_factory=list)  # passage indices in prompt order

    @property
    def blocks(self) -> list[Segment]:
        return [s for s in self.segments if s.is_block]

    def full_ids(self) -> list[int]:
        """The full-context token prompt: every block expanded."""
        return [t for s in self.segments for t in s.token_ids]

    def n_positions(self, expand: Collection[int] = ()) -> int:
        """Decoder positions with the blocks in `expand` (indices into `blocks`) fed as tokens, the rest as vectors."""
        n, b = 0, 0
        for s in self.segments:
            if s.is_block:
                n += len(s.token_ids) if b in expand else 1
                b += 1
            else:
                n += len(s.token_ids)
        return n


def start_token(tokenizer: Tokenizer) -> int:
    """The document-start token of the LM layout: <|endoftext|> when the vocabulary has it."""
    i = tokenizer.tok.token_to_id("<|endoftext|>")
    if i is not None:
        return i
    return tokenizer.meta.bos_id if tokenizer.meta.bos_id is not None else tokenizer.pad_id


def block_segments(passage: EncodedPassage, index: int) -> list[Segment]:
    return [Segment(passage.block_ids(b), passage.vectors[b], index, b) for b in range(passage.n_blocks)]


def lm_layout(tokenizer: Tokenizer, context: EncodedPassage, target_ids: Sequence[int] = ()) -> Layout:
    segs = [Segment([start_token(tokenizer)]), *block_segments(context, 0)]
    if target_ids:
        segs.append(Segment(list(target_ids)))
    return Layout(segs, [0])


def qa_template(tokenizer: Tokenizer, instruction: str = INSTRUCTION) -> tuple[str, str]:
    """(template text before the documents, after them), the question after the documents as the marker
    `_QUESTION` (`encode_template` puts it in as text)."""
    user = f"{instruction}\n\n{_MARK}Question: {_QUESTION}"
    if tokenizer.meta.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True)
    else:
        text = user + "\nAnswer:"
    before, after = text.split(_MARK)
    return before, after


def qa_layout(tokenizer: Tokenizer, question: str, passages: Sequence[EncodedPassage] = (),
              instruction: str = INSTRUCTION) -> Layout:
    """The answer prompt; with no passages it is the closed-book prompt. The question and the passages are read as
    text: a special-token string in them ("<|im_end|>") cannot end the user's turn."""
    before, after = qa_template(tokenizer, instruction)
    segs = [Segment(tokenizer.encode_template(before, add_bos=False))]
    sep = tokenizer.encode("\n\n", add_bos=False)
    for i, p in enumerate(passages):
        segs.append(Segment(tokenizer.encode(f"Document [{i + 1}]\n", add_bos=False)))
        segs += block_segments(p, i)
        segs.append(Segment(list(sep)))
    segs.append(Segment(tokenizer.encode_template(after, {_QUESTION: question}, add_bos=False)))
    return Layout(segs, list(range(len(passages))))


def embed_layout(tok_embeddings: torch.nn.Embedding, projector: torch.nn.Module, layout: Layout,
                 expand: Collection[int] = ()) -> torch.Tensor:
    """-> inputs_embeds [T, dim]: token embeddings, with each compressed block's projected vector in its place.
    Differentiable with respect to the projector (training); the decoder's embeddings are used as they are."""
    weight = tok_embeddings.weight
    ids: list[int] = []
    vec_at: list[int] = []  # output position of each compressed vector
    vectors: list[torch.Tensor] = []
    b = 0
    for s in layout.segments:
        if s.is_block and b not in expand:
            vec_at.append(len(ids))
            vectors.append(s.vector)
            ids.append(0)
        else:
            ids.extend(s.token_ids)
        b += s.is_block
    out = tok_embeddings(torch.tensor(ids, dtype=torch.long, device=weight.device))
    if vectors:
        p = next(projector.parameters())
        proj = projector(torch.stack(vectors).to(device=p.device, dtype=p.dtype)).to(out.dtype)
        index = torch.tensor(vec_at, device=weight.device)
        out = out.index_put((index,), proj)  # out of place: gradients reach the projector
    return out
