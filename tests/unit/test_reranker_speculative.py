"""Speculative decoding of ranking answers (reranker/speculative.py): drafts in prompt order, checked in one forward.

- On a tiny random backbone it answers exactly as token-by-token constrained decoding (orders and text), for full
  and sliding rankings, complete and top-k.
- On a scripted model (its greedy answer is a given permutation) it gives that answer whatever the draft; a model
  that keeps the prompt order needs a handful of forwards for 40 ids, one that reverses it about one per id.
- `draft_tokens` continues the id under way, follows the preference order, stops after the asked ids, ends with
  the end token, and leaves the constraint as it was.
"""

from types import SimpleNamespace

import pytest
import torch
from sieve.reranker import IdTokens, PermutationConstraint, Reranker
from sieve.reranker.speculative import draft_tokens, speculative_decode

from .test_reranker import passages
from .tiny_files import load_tiny_backbone


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    return load_tiny_backbone(tmp_path_factory, max_seq_len=4096)


@pytest.fixture(scope="module")
def ids(backbone):
    return IdTokens.from_tokenizer(backbone.tokenizer, max_id=100)


@pytest.mark.parametrize("mode,top_k,n", [("full", None, 30), ("full", 5, 30), ("sliding", None, 45),
                                          ("sliding", 10, 45), ("full", None, 1), ("full", None, 2)])
def test_speculative_answers_as_token_by_token_decoding(backbone, mode, top_k, n):
    texts = passages(n, words=16, seed=5)
    plain, spec = (Reranker(backbone, max_passage_tokens=64, speculative=s).rank("aspirin heart", texts, mode=mode,
                                                                                 top_k=top_k) for s in (False, True))
    assert spec.order == plain.order
    assert spec.answers == plain.answers
    assert spec.stats.generated_tokens == plain.stats.generated_tokens
    assert spec.stats.prompt_tokens == plain.stats.prompt_tokens
    assert spec.stats.accepted <= spec.stats.drafted


class ScriptedModel(torch.nn.Module):
    """A stand-in for the backbone whose greedy next token at answer position j is `script[j]`: the hidden state
    is a one-hot of the sequence position, and the head reads the scripted token for it."""

    def __init__(self, prompt_len: int, script: list[int], vocab: int):
        super().__init__()
        self.p, self.script, self.vocab = prompt_len, script, vocab
        self.args = SimpleNamespace(max_seq_len=4096)
        self.tok_embeddings = torch.nn.Embedding(1, 1)
        self.forwards: list[int] = []  # tokens per call

    def setup_caches(self, batch: int, length: int) -> None:
        self.cache_len = length

    def forward(self, x, *, input_pos, return_logits, mode="causal"):
        t = x.shape[1]
        assert input_pos + t <= self.cache_len
        self.forwards.append(t)
        return SimpleNamespace(hidden_states=torch.arange(input_pos, input_pos + t, dtype=torch.float32)[None, :, None])

    def head(self, h):
        logits = torch.zeros(*h.shape[:-1], self.vocab)
        for index in torch.cartesian_prod(*(torch.arange(s) for s in h.shape[:-1])).reshape(-1, h.dim() - 1):
            j = int(h[tuple(index)][0]) + 1 - self.p  # the answer position this one predicts
            if 0 <= j < len(self.script):
                logits[tuple(index)][self.script[j]] = 10.0
        return logits


def scripted_run(ids: IdTokens, order: list[int], k: int | None = None):
    n = len(order)
    script = ids.output_ids(order[: k or n])
    model = ScriptedModel(prompt_len=7, script=script, vocab=max(script) + 100)
    constraint = PermutationConstraint(ids, n, k)
    tokens, stats = speculative_decode(model, list(range(7)), constraint)
    return tokens, stats, model, constraint, script


def test_a_model_that_keeps_the_prompt_order_needs_a_few_forwards(ids):
    tokens, stats, model, constraint, script = scripted_run(ids, list(range(40)))
    assert tokens == script and constraint.order() == list(range(40))
    assert stats.accepted == stats.drafted  # every draft taken whole
    assert stats.forwards <= 5  # drafts of 4, 8, 16, 32 ids (then the rest): not one per digit (71 digits)
    assert model.forwards[0] == 7  # the prefill, then verify forwards of several tokens each
    assert all(t > 1 for t in model.forwards[1:])


def test_a_model_that_reverses_the_order_gets_its_own_answer(ids):
    order = list(range(39, -1, -1))
    tokens, stats, _, constraint, script = scripted_run(ids, order)
    assert tokens == script and constraint.order() == order
    assert stats.forwards <= 2 * 40  # about one per id: the draft misses at every id's first digit
    assert stats.accepted < stats.drafted


@pytest.mark.parametrize("k", [1, 3, 12])
def test_top_k_stops_after_k_ids(ids, k):
    order = [5, 0, 1, 2, 9, 3, 4, 6, 7, 8, 10, 11, 12, 13, 14]
    tokens, _, _, constraint, script = scripted_run(ids, order, k=k)
    assert tokens == script and constraint.order() == order[:k] and tokens[-1] == ids.eos


def test_draft_tokens_follow_the_preference_order_and_leave_the_constraint_alone(ids):
    c = PermutationConstraint(ids, 12)
    out = draft_tokens(c, [3, 1, 2], max_ids=2)
    assert out == [*ids.output_ids([2, 0])[:-1], *ids.separator]  # `[3] > [1] > [`: forced tokens ride along
    assert c.emitted == [] and c.allowed() == [ids.first_open[0]]
    full = draft_tokens(c, list(range(12, 0, -1)), max_ids=100)
    assert full == ids.output_ids(list(range(11, -1, -1)))  # the whole answer, end token included


def test_draft_tokens_finish_the_id_under_way(ids):
    c = PermutationConstraint(ids, 12)
    for tok in ids.first_open:
        c.advance(tok)
    c.advance(ids.digit_tokens["1"][0])  # `[1` so far: 1, 10, 11 or 12
    out = draft_tokens(c, [2, 11, 1], max_ids=1)
    # 2 does not start with 1: 11 does; then one more id, 2 (its `]` and the separator are forced)
    assert out == [*ids.digit_tokens["11"][1:], ids.close, *ids.separator, *ids.digit_tokens["2"], ids.close,
                   *ids.separator]
    assert c.emitted == []


def test_sparse_prefill_ranks_through_the_block_sparse_path(backbone):
    from sieve.kernels import SparseConfig, register_sparse_attention

    sparse, _ = register_sparse_attention(SparseConfig(block_size=16, min_length=256))
    texts = passages(30, words=16, seed=7)
    dense = Reranker(backbone, max_passage_tokens=64).rank("aspirin heart", texts, mode="full")
    for speculative in (True, False):
        before = sparse.stats.sparse_calls
        res = Reranker(backbone, max_passage_tokens=64, speculative=speculative, prefill_mode="sparse").rank(
            "aspirin heart", texts, mode="full")
        assert sorted(res.order) == list(range(30))  # still a permutation of all of them
        assert res.stats.prompt_tokens == dense.stats.prompt_tokens > 256
        assert sparse.stats.sparse_calls - before == backbone.args.n_layers  # the prompt's forward ran sparse
    assert 0.0 < sparse.stats.density < 1.0
