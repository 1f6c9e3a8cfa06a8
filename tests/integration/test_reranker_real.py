"""The reranker on the real SmolLM2: its tokenizer's id sequences, a 100-passage prompt inside the 8,192-token
context, and all three modes end to end on a small list (valid permutations, clean answers)."""

import pytest
import torch
from sieve.reranker import IdTokens, Reranker, parse_permutation

pytestmark = pytest.mark.integration

DOCS = [
    "Aspirin lowers the risk of myocardial infarction in men over 50.",
    "The Eiffel tower was completed in 1889 for the World's Fair in Paris.",
    "Python is a programming language with dynamic typing.",
    "Low-dose aspirin therapy reduced heart attacks in a randomized trial of 22,000 physicians.",
    "",
]


@pytest.fixture(scope="module")
def reranker(smollm2):
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    return Reranker(smollm2)


def test_smollm2_writes_ids_digit_by_digit(smollm2):
    tok = smollm2.tokenizer
    ids = IdTokens.from_tokenizer(tok, max_id=100)
    assert [tok.tok.id_to_token(t) for t in ids.first_open] == ["["]
    assert [tok.tok.id_to_token(t) for t in ids.separator] == ["Ġ>", "Ġ["]
    assert [tok.tok.id_to_token(t) for t in ids.digits_of(100)[11]] == ["1", "2"]
    assert len(ids.digits_of(100)[99]) == 3
    assert ids.output_length(100) == 492  # 192 digits + 100 `]` + 99 separators of 2 + `[` + end token


def test_100_passages_fit_one_prompt(reranker, smollm2):
    long = ["Aspirin and cardiovascular outcomes in a large cohort. " * 30] * 100
    prompt = reranker.prompts.build("Does aspirin prevent heart attacks in older adults?", long)
    assert len(prompt.ids) + prompt.answer_tokens <= smollm2.args.max_seq_len
    assert prompt.truncated == 100 and prompt.passage_cap >= 50


@pytest.mark.parametrize("mode", ["full", "first", "sliding"])
def test_modes_rank_real_passages(reranker, mode):
    res = reranker.rank("Does aspirin prevent heart attacks?", DOCS, mode=mode)
    assert sorted(res.order) == list(range(len(DOCS)))
    for answer in res.answers:
        p = parse_permutation(answer, len(DOCS))
        assert (p.wrong_format, p.repeated, p.missing) == (False, 0, 0), answer


def test_query_likelihood_puts_the_aspirin_trials_first(reranker):
    """Zero-shot query likelihood on the real decoder reads the query: both aspirin passages above the Eiffel
    tower, Python and the empty passage, and another query reorders them."""
    res = reranker.rank("Does aspirin prevent heart attacks?", DOCS, mode="likelihood")
    assert set(res.order[:2]) == {0, 3}, res
    other = reranker.rank("When was the Eiffel tower built?", DOCS, mode="likelihood")
    assert other.order[0] == 1, other
