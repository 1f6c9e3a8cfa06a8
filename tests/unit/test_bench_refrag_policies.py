"""bench/refrag_policies.py's overlap policies on a tiny random REFRAG: content tokens, the overlap choice (tail kept,
most-shared blocks added), and the decoder's draft (greedy, the same as step-by-step argmax)."""

# ruff: noqa: F811  (the fixtures imported from test_refrag are this file's test arguments)

import pytest
import torch
from sieve.refrag import EncodedPassage

from .test_refrag import backbone, refrag, text  # noqa: F401  (backbone and refrag are fixtures)


@pytest.fixture
def rp(bench_module):
    return bench_module("refrag_policies")


def ids_of(r, s):
    return r.tokenizer.encode(s, add_bos=False)


class Words:
    """A word-level stand-in tokenizer: id i is WORDS[i]."""

    words = ["the", " cell", ",", " of", " protein", " Paris", " gene", " 1998", " river", " heart"]

    def decode(self, ids):
        return "".join(self.words[i] for i in ids)


class WordRefrag:
    tokenizer = Words()


def passage(blocks):
    ids = [t for b in blocks for t in b]
    spans, s = [], 0
    for b in blocks:
        spans.append((s, s + len(b)))
        s += len(b)
    return EncodedPassage(ids, spans, torch.zeros(len(blocks), 4), 3, "test")


def test_content_tokens_drop_stopwords_short_tokens_and_punctuation(rp):
    assert rp.content_tokens(WordRefrag(), [0, 1, 2, 3, 4, 7, 1]) == {1, 4, 7}


def test_overlap_choice_keeps_the_tail_and_adds_the_blocks_that_share_most(rp):
    blocks = [[5, 0, 2], [1, 4, 6], [0, 3, 2], [8, 9, 0], [5, 8, 3], [0, 0, 0], [2, 2, 2], [3, 3, 3], [9, 1, 0]]
    ctx = passage(blocks)
    target = [0, 1, 4, 6, 3, 8, 2]  # shares 3 content tokens with block 1, 1 with blocks 3 and 4 (8), none with 0
    assert rp.TAIL == 4
    assert rp.overlap_choice(WordRefrag(), ctx, target, 5) == {5, 6, 7, 8, 1}
    # a tie (blocks 3 and 4 share one token each) goes to the later block
    assert rp.overlap_choice(WordRefrag(), ctx, target, 6) == {5, 6, 7, 8, 1, 4}
    assert rp.overlap_choice(WordRefrag(), ctx, target, 3) == {6, 7, 8}  # fewer than the tail: the last m
    assert rp.overlap_choice(WordRefrag(), ctx, [], 5) == {5, 6, 7, 8, 4}  # nothing shared: the latest


def test_draft_is_greedy_decoding_of_the_compressed_context(rp, refrag):
    ctx = refrag.encode_ids([ids_of(refrag, text(40, 4))], 4)[0]
    got = rp.draft(refrag, ctx, 5)
    embeds = refrag.embed(refrag.lm_layout(ctx))
    want = []
    with torch.no_grad():
        for _ in range(5):  # no KV cache: the whole prompt each step
            logits = refrag.model(inputs_embeds=embeds, input_pos=0, return_hidden=False).logits[0, -1]
            t = int(logits.argmax())
            want.append(t)
            embeds = torch.cat([embeds, refrag.model.tok_embeddings(torch.tensor([[t]]))], dim=1)
    assert got == want


def test_window_losses_runs_only_the_policies_asked_for(rp, refrag):
    ids = ids_of(refrag, text(200, 5))
    losses = rp.window_losses(refrag, ids[:64], ids[64:80], 4, 0.25,
                              policies=("recency", "target-overlap", "draft-overlap"), draft_tokens=4)
    assert set(losses) == {"full", "compressed", "recency", "target-overlap", "draft-overlap"}
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
