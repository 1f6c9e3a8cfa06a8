"""Reranker on a tiny random backbone: ids as token sequences, constrained permutation decoding under any logits,
edge cases of the list (n=1, n=2, duplicates, empty and over-long passages), the context budget, FIRST scores,
and sliding windows."""

import math

import pytest
import torch
from sieve.backbone import load_backbone, sample
from sieve.reranker import (
    IdTokens,
    PermutationConstraint,
    PromptTemplate,
    PromptTooLong,
    Reranker,
    parse_permutation,
    sliding_windows,
)
from sieve.reranker.first import first_scores
from sieve.reranker.listwise import window_ids_needed
from sieve.reranker.model_dir import RerankerConfig, resolve_reranker
from torch.testing import assert_close

from .tiny_files import load_tiny_backbone, write_tiny_gguf

WORDS = "the cell protein gene aspirin heart risk study patients cancer blood level increase effect".split()


def passages(n: int, words: int = 12, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[j] for j in torch.randint(0, len(WORDS), (words,), generator=g).tolist()) + f" {i}"
            for i in range(n)]


def is_permutation(order: list[int], n: int) -> bool:
    return sorted(order) == list(range(n))


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    return load_tiny_backbone(tmp_path_factory, max_seq_len=4096)  # room for 100 passages


@pytest.fixture(scope="module")
def reranker(backbone):
    return Reranker(backbone, max_passage_tokens=64)


@pytest.fixture(scope="module")
def small_context(tmp_path_factory):
    path = tmp_path_factory.mktemp("rr-small") / "tiny.gguf"
    write_tiny_gguf(path)  # the tiny preset's 256-token context
    return load_backbone(path, home=tmp_path_factory.mktemp("home-small"), device="cpu", dtype="float32")


# ------------------------------------------------------------------------------------------------- id tokens


def test_id_tokens_match_the_tokenizer(backbone):
    tok = backbone.tokenizer
    ids = IdTokens.from_tokenizer(tok, max_id=120)
    order = [1, 0, 11, 119, 99]  # ids 2, 1, 12, 120, 100
    assert ids.output_ids(order) == tok.encode("[2] > [1] > [12] > [120] > [100]") + [tok.eos_ids[0]]
    assert ids.digits_of(12)[11] == tuple(tok.encode("12"))
    for n in (1, 9, 10, 100, 101):
        longest = max(len(ids.output_ids(list(range(n)))), len(ids.output_ids(list(range(n))[::-1])))
        assert ids.output_length(n) == longest
    assert ids.output_length(100, 3) == len(ids.output_ids([99, 98, 97]))


# ------------------------------------------------------------------------------ constraint under bad logits


def adversaries(ids: IdTokens, vocab: int):
    """Logit functions that try to break the format: repeat id 1, stop at once, close early, NaN, +-inf, random."""
    g = torch.Generator().manual_seed(1)

    def bias(tokens, value=1e6):
        out = torch.zeros(1, vocab)
        out[0, tokens] = value
        return out

    yield "random", lambda t: torch.randn(1, vocab, generator=g) * 10
    yield "repeat-id-1", lambda t: bias([*ids.digit_tokens["1"], ids.close, *ids.first_open])
    yield "stop-now", lambda t: bias([ids.eos])
    yield "close-early", lambda t: bias([ids.close])
    yield "forbidden-only", lambda t: bias([5, 6, 7])  # tokens that are never part of the format
    yield "nan", lambda t: torch.full((1, vocab), float("nan"))
    yield "plus-inf", lambda t: torch.full((1, vocab), float("inf"))
    yield "minus-inf", lambda t: torch.full((1, vocab), float("-inf"))
    yield "mixed", lambda t: torch.where(torch.rand(1, vocab, generator=g) < 0.5, float("nan"), float("inf"))


@pytest.mark.parametrize("n", [1, 2, 3, 9, 10, 11, 20, 100, 101])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_any_logits_give_a_valid_permutation(backbone, n, temperature):
    ids = IdTokens.from_tokenizer(backbone.tokenizer, max_id=n)
    vocab = backbone.args.vocab_size
    gen = torch.Generator().manual_seed(n)
    for name, fn in adversaries(ids, vocab):
        constraint = PermutationConstraint(ids, n)
        generated = torch.empty(1, 0, dtype=torch.long)
        for _ in range(ids.output_length(n)):
            logits = constraint(generated, fn(generated))
            token = sample(logits, temperature=temperature, generator=gen)
            generated = torch.cat([generated, token[:, None]], dim=1)
            if int(token) == ids.eos:
                break
        out = generated[0].tolist()
        assert out[-1] == ids.eos, name
        assert is_permutation(constraint.order(), n), (name, constraint.order())
        assert out == ids.output_ids(constraint.order()), name  # exactly the format, nothing else
        parsed = parse_permutation(backbone.tokenizer.decode(out[:-1]), n)
        assert (parsed.wrong_format, parsed.repeated, parsed.missing) == (False, 0, 0), name


def test_top_k_constraint_stops_after_k_distinct_ids(backbone):
    ids = IdTokens.from_tokenizer(backbone.tokenizer, max_id=30)
    constraint = PermutationConstraint(ids, 30, k=5)
    generated = torch.empty(1, 0, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    while not generated.shape[1] or int(generated[0, -1]) != ids.eos:
        token = sample(constraint(generated, torch.randn(1, backbone.args.vocab_size, generator=g)))
        generated = torch.cat([generated, token[:, None]], dim=1)
    order = constraint.order()
    assert len(order) == 5 and len(set(order)) == 5 and all(0 <= i < 30 for i in order)
    assert generated.shape[1] <= ids.output_length(30, 5)


def test_constraint_rejects_a_forbidden_token(backbone):
    ids = IdTokens.from_tokenizer(backbone.tokenizer, max_id=3)
    c = PermutationConstraint(ids, 3)
    with pytest.raises(ValueError, match="not allowed"):
        c(torch.tensor([[ids.eos]]), torch.zeros(1, backbone.args.vocab_size))


def test_parse_permutation_counts_faults():
    p = parse_permutation("[1] > [1] > [5] > [3]", 4)
    assert p.wrong_format and p.repeated == 1 and p.unknown == 1 and p.missing == 2
    assert p.order == [0, 2, 1, 3]  # parsed first (deduplicated), then the missing in input order
    assert parse_permutation("Sure! [2] > [1]", 2).wrong_format
    clean = parse_permutation("[2] > [1]", 2)
    assert (clean.wrong_format, clean.repeated, clean.missing, clean.order) == (False, 0, 0, [1, 0])
    top = parse_permutation("[3] > [1]", 5, expected=2)  # a top-2 answer lacks nothing
    assert (top.wrong_format, top.missing, top.order) == (False, 0, [2, 0, 1, 3, 4])
    assert parse_permutation("[3]", 5, expected=2).missing == 1


# -------------------------------------------------------------------------------------- ranking end to end


@pytest.mark.parametrize("mode", ["full", "first", "sliding", "inline", "likelihood"])
@pytest.mark.parametrize("n", [1, 2, 25])
def test_rank_returns_a_permutation_with_scores(reranker, mode, n):
    res = reranker.rank("does aspirin lower heart risk?", passages(n), mode=mode)
    assert is_permutation(res.order, n) and len(res.scores) == n
    assert all(a >= b for a, b in zip(res.scores, res.scores[1:]))  # best first
    assert res.stats.prompt_tokens > 0 and res.stats.forward_passes >= 1 and res.stats.seconds > 0
    if mode == "first":
        assert res.stats.generated_tokens == 0 and res.stats.forward_passes == 1
        assert all(math.isfinite(s) and s <= 0 for s in res.scores)  # log-probabilities
    elif mode == "inline":
        assert res.stats.generated_tokens == 0 and res.stats.forward_passes == 1
        assert all(math.isfinite(s) for s in res.scores) and res.answers == []
    elif mode == "likelihood":
        assert res.stats.generated_tokens == 0 and res.answers == []
        assert all(math.isfinite(s) and s < 0 for s in res.scores)  # summed log-probabilities
    else:
        assert res.stats.generated_tokens > 0
        sizes = [e - s for s, e in sliding_windows(n)] if mode == "sliding" else [n]
        assert len(res.answers) == len(sizes)
        for answer, size in zip(res.answers, sizes):
            parsed = parse_permutation(answer, size)
            assert (parsed.wrong_format, parsed.repeated, parsed.missing) == (False, 0, 0)
    if mode == "sliding":
        assert res.stats.forward_passes == len(sliding_windows(n))


def test_full_ranks_100_passages_in_one_pass(reranker, backbone):
    res = reranker.rank("heart risk", passages(100, words=40), mode="full")
    assert is_permutation(res.order, 100)
    assert res.stats.forward_passes == 1
    assert res.stats.prompt_tokens + res.stats.generated_tokens <= backbone.args.max_seq_len


@pytest.mark.parametrize("mode", ["full", "sliding"])
def test_jump_forward_ranks_as_stepwise_decoding_with_fewer_forwards(backbone, mode):
    texts = passages(30, words=16, seed=3)
    runs = [Reranker(backbone, max_passage_tokens=64, jump_forward=j, speculative=False).rank("heart risk", texts,
                                                                                         mode=mode)
            for j in (False, True)]
    stepwise, jump = runs
    assert jump.order == stepwise.order and jump.answers == stepwise.answers
    assert stepwise.stats.decode_forwards == stepwise.stats.generated_tokens - stepwise.stats.forward_passes
    # per id: one forward for its first digit, one for `]` or a second digit; separators and the end are forced
    assert jump.stats.decode_forwards < 0.5 * stepwise.stats.decode_forwards


def test_top_k(reranker):
    full = reranker.rank("q", passages(12), mode="full")
    top = reranker.rank("q", passages(12), mode="full", top_k=3)
    assert top.order == full.order[:3]  # greedy: the same first ids, decoding just stops earlier
    assert top.stats.generated_tokens < full.stats.generated_tokens
    first = reranker.rank("q", passages(12), mode="first", top_k=4)
    assert len(first.order) == 4
    with pytest.raises(ValueError):
        reranker.rank("q", passages(3), top_k=0)


def test_duplicate_and_empty_passages_are_ranked(reranker):
    ps = ["same text here", "same text here", "", "   ", "other words", "same text here"]
    for mode in ("full", "first", "sliding", "inline", "likelihood"):
        res = reranker.rank("text", ps, mode=mode)
        assert is_permutation(res.order, len(ps)), mode


def test_long_passages_are_cut_to_the_budget_and_still_ranked(backbone):
    rr = Reranker(backbone, max_passage_tokens=10_000)
    long = [" ".join(WORDS) * 60, "short one", " ".join(WORDS) * 40]  # thousands of tokens each
    for mode in ("full", "first", "sliding", "inline", "likelihood"):
        res = rr.rank("query", long * 10, mode=mode)
        assert is_permutation(res.order, 30)
        assert res.stats.truncated == 20 and res.stats.passage_cap < 2000
    prompt = rr.prompts.build("query", long * 10)
    assert len(prompt.ids) + prompt.answer_tokens <= backbone.args.max_seq_len


def test_budget_shrinks_with_n_then_errors_clearly(small_context):
    short = PromptTemplate(name="short", system="", prefix="{n} for: {query}\n", body="[{rank}] {passage}\n",
                           suffix="Rank:")
    rr = Reranker(small_context, template=short, max_passage_tokens=200)
    caps = [rr.prompts.build("q", passages(n, words=60)).passage_cap for n in (1, 2, 4)]
    assert caps[0] > caps[1] > caps[2] >= rr.prompts.min_passage_tokens
    for n in (1, 2, 4):
        prompt = rr.prompts.build("q", passages(n, words=60))
        assert len(prompt.ids) + prompt.answer_tokens <= 256
    with pytest.raises(PromptTooLong, match="do not fit the 256-token context.*passages would fit"):
        rr.rank("q", passages(40), mode="full")
    with pytest.raises(PromptTooLong):
        rr.rank("q", passages(40), mode="first")


def test_sliding_equals_full_within_one_window(reranker):
    ps = passages(15)
    assert reranker.rank("q", ps, mode="sliding").order == reranker.rank("q", ps, mode="full").order


@pytest.mark.parametrize("k", [1, 5, 10, 12, 30, 45])
def test_sliding_top_k_is_the_complete_rankings_top_k_with_less_decoding(reranker, k):
    texts = passages(45, words=10, seed=5)
    complete = reranker.rank("heart risk", texts, mode="sliding")
    top = reranker.rank("heart risk", texts, mode="sliding", top_k=k)
    assert top.order == complete.order[:k]
    assert top.stats.prompt_tokens == complete.stats.prompt_tokens  # every window is still read
    windows = sliding_windows(45)
    assert [n for n, _ in top.answer_shapes] == [e - s for s, e in windows]
    for answer, (n, asked) in zip(top.answers, top.answer_shapes):
        parsed = parse_permutation(answer, n, expected=asked)
        assert (parsed.wrong_format, parsed.repeated, parsed.missing) == (False, 0, 0)
        assert len(answer.split(">")) == asked
    if k < 45:
        assert top.stats.generated_tokens < complete.stats.generated_tokens


def test_window_ids_needed():
    # window 20, stride 10 over 100: a window carries its top 10 on, the last one (start 0) decodes the top k
    assert [window_ids_needed(s, e, 10, 10) for s, e in sliding_windows(100)] == [10] * 9
    assert [window_ids_needed(s, e, 10, 100) for s, e in sliding_windows(100)] == [20] * 9
    assert window_ids_needed(0, 20, 10, 3) == 3
    assert window_ids_needed(80, 100, 10, 95) == 15  # places 90..94 are final and asked for
    assert window_ids_needed(5, 25, 10, 1) == 10
    # windows that do not overlap (stride = window): those starting at or past k are skipped
    assert [window_ids_needed(s, e, 20, 30) for s, e in sliding_windows(100, 20, 20)] == [0, 0, 0, 10, 20]


def test_sliding_windows_back_to_front():
    assert sliding_windows(100) == [(s, s + 20) for s in range(80, -1, -10)]
    assert sliding_windows(25) == [(5, 25), (0, 15)]
    assert sliding_windows(10) == [(0, 10)]
    assert sliding_windows(20) == [(0, 20)]


def test_first_scores_equal_sequence_log_probs(reranker, backbone):
    """The tree forward scores every id like teacher-forcing `[<digits>]` after the prompt, one id at a time."""
    n = 12  # ids 1..12: 1 has children 10, 11, 12, so `]` competes with digits there
    prompt = reranker.prompts.build("a query", passages(n))
    got = first_scores(backbone.model, prompt.ids, reranker.ids, n)
    ids = reranker.ids
    want = []
    for seq in ids.digits_of(n):
        full = prompt.ids + list(ids.first_open) + list(seq)
        with torch.no_grad():
            logits = backbone.model(torch.tensor([full])).logits[0]
        t0 = len(prompt.ids) + len(ids.first_open) - 1
        total = 0.0
        node_prefix: tuple[int, ...] = ()
        for j, tok in enumerate([*seq, ids.close]):
            children = {d[len(node_prefix)] for d in ids.digits_of(n)
                        if len(d) > len(node_prefix) and d[: len(node_prefix)] == node_prefix}
            options = sorted(children) + ([ids.close] if node_prefix in ids.digits_of(n) else [])
            logp = torch.log_softmax(logits[t0 + j, options], -1)
            total += float(logp[options.index(tok)])
            node_prefix = (*node_prefix, tok)
        want.append(total)
    assert_close(got, torch.tensor(want), atol=2e-4, rtol=1e-4)
    assert_close(got.exp().sum(), torch.tensor(1.0), atol=1e-4, rtol=0)  # a distribution over the 12 ids


def test_inline_scores_read_yes_minus_no_where_each_passage_ends(reranker, backbone):
    """Inline mode: one causal forward of the prompt; a passage's score is logit(" yes") - logit(" no") at its body's
    last token, exactly what a plain forward gives there; the order sorts those scores."""
    ps = passages(9)
    prompt = reranker.prompts.build("a query", ps, reserve=0)
    body = [len(reranker.prompts.label_ids(r)) + min(len(p), prompt.passage_cap) + len(reranker.prompts.after_ids(r))
            for r, p in enumerate(reranker.prompts.passage_ids(ps), start=1)]
    assert [b - a for a, b in zip(prompt.ends, prompt.ends[1:])] == body[1:]  # one end per passage body
    with torch.no_grad():
        logits = backbone.model(torch.tensor([prompt.ids])).logits[0]
    yes, no = reranker.relevance
    want = logits[prompt.ends, yes] - logits[prompt.ends, no]
    res = reranker.rank("a query", ps, mode="inline")
    assert res.order == sorted(range(9), key=lambda i: (-float(want[i]), i))
    assert_close(torch.tensor(res.scores), want[res.order], atol=2e-4, rtol=1e-4)
    assert res.stats.prompt_tokens == len(prompt.ids)
    top = reranker.rank("a query", ps, mode="inline", top_k=3)
    assert top.order == res.order[:3]


def test_inline_window_scores_groups_of_passages_in_their_own_prompts(reranker, backbone):
    """inline_window=4 over 10 passages: prompts of passages 0-3, 4-7, 8-9, each scored as on its own; lists that
    fit one window are ranked exactly as without windows."""
    from sieve.reranker.first import inline_scores

    windowed = Reranker(backbone, max_passage_tokens=24, mode="inline", inline_window=4)
    ps = passages(10)
    want = []
    for start in (0, 4, 8):
        prompt = windowed.prompts.build("a query", ps[start:start + 4], reserve=0)
        want += inline_scores(backbone.model, prompt.ids, prompt.ends, windowed.relevance).tolist()
    res = windowed.rank("a query", ps)
    assert res.mode == "inline" and res.stats.forward_passes == 3
    assert res.order == sorted(range(10), key=lambda i: (-want[i], i))
    assert res.scores == pytest.approx([want[i] for i in res.order], abs=1e-5)
    small = windowed.rank("a query", ps[:4])
    assert small.order == Reranker(backbone, max_passage_tokens=24).rank("a query", ps[:4], mode="inline").order
    with pytest.raises(ValueError, match="inline_window"):
        Reranker(backbone, inline_window=0)


@pytest.mark.parametrize("mode", ["inline", "full"])
def test_fuse_combines_the_mode_with_the_input_order(reranker, mode):
    """fuse=True: the mode's order fused with the input (first-stage) order by RRF; score modes fuse their whole
    order before top_k cuts it."""
    from sieve.reranker.fusion import fuse_with_input_order

    ps = passages(9)
    alone = reranker.rank("a query", ps, mode=mode)
    fused = reranker.rank("a query", ps, mode=mode, fuse=True)
    want, scores = fuse_with_input_order(alone.order, 9)
    assert fused.fused and not alone.fused and fused.order == want and fused.scores == scores
    top = reranker.rank("a query", ps, mode=mode, fuse=True, top_k=3)
    if mode == "inline":
        assert top.order == want[:3]
    assert len(top.order) == 3 and top.scores == sorted(top.scores, reverse=True)


def test_rank_input_errors(reranker):
    assert reranker.rank("q", [], mode="full").order == []
    with pytest.raises(ValueError, match="unknown mode"):
        reranker.rank("q", ["a"], mode="pairwise")
    with pytest.raises(TypeError):
        reranker.rank("q", "a single string")


def test_template_is_checked():
    with pytest.raises(ValueError, match="exactly once"):
        PromptTemplate(name="bad", system="", prefix="rank these", body="[{rank}] {passage}\n", suffix="")
    with pytest.raises(ValueError, match="before"):
        PromptTemplate(name="bad", system="", prefix="{n}", body="{passage} [{rank}]\n", suffix="")


def test_echo_template_repeats_each_label_after_its_passage(backbone):
    from sieve.reranker.prompt import RANKGPT_ECHO

    rr = Reranker(backbone, template=RANKGPT_ECHO, max_passage_tokens=64)
    b = rr.prompts
    ps = passages(12)
    prompt = b.build("cell protein", ps)
    cap = prompt.passage_cap
    body = [t for r, p in enumerate(b.passage_ids(ps), start=1) for t in b.label_ids(r) + p[:cap] + b.after_ids(r)]
    at = next(i for i in range(len(prompt.ids)) if prompt.ids[i:i + len(body)] == body)  # the body, in one piece
    assert at > 0 and b.tok.decode(b.after_ids(7)) == " [7]\n" and b.tok.decode(b.label_ids(7)) == "[7]"
    # the repeated labels are paid for in the budget: 100 passages still fit the 4,096-token context
    plain = Reranker(backbone, max_passage_tokens=64).prompts.build("q", passages(100, words=60))
    echo = b.build("q", passages(100, words=60))
    assert echo.passage_cap < plain.passage_cap and len(echo.ids) + echo.answer_tokens <= backbone.args.max_seq_len
    for mode in ("full", "first", "sliding"):
        assert is_permutation(rr.rank("q", ps, mode=mode).order, 12), mode
    with pytest.raises(ValueError, match="once after"):
        PromptTemplate(name="bad", system="", prefix="{n}", body="[{rank}] {passage} [{rank}] [{rank}]\n", suffix="")


def test_shipped_reranker_folder_is_zero_shot_without_adapter():
    folder = resolve_reranker("sieve-rank")
    cfg = RerankerConfig.load(folder)
    assert cfg.backbone == "smollm2-135m-instruct" and cfg.window == 20 and cfg.stride == 10
    assert cfg.lora_r == 0 or (folder / "adapter.safetensors").is_file()
    with pytest.raises(FileNotFoundError, match="shipped: sieve-rank"):
        resolve_reranker("/no/such/folder")
    zero_shot = RerankerConfig.load(resolve_reranker("sieve-rank-likelihood"))  # the plain backbone, query likelihood
    assert (zero_shot.lora_r, zero_shot.mode, zero_shot.fuse) == (0, "likelihood", False)
    assert zero_shot.likelihood_cap == "passage"  # SciFact depth 100: 0.6435 vs 0.5115 with the list's cap
    assert not (resolve_reranker("sieve-rank-likelihood") / "adapter.safetensors").exists()


# ------------------------------------------------------------------------------------------------- query likelihood


def naive_query_logprob(model, tokens: list[int], start: int) -> float:
    """log p(tokens[start:] | tokens[:start]) from one unpadded forward with logits everywhere."""
    with torch.inference_mode():
        logits = model(torch.tensor([tokens]), return_hidden=False).logits[0].float()
    logp = torch.log_softmax(logits, -1)
    return sum(logp[i - 1, tokens[i]].item() for i in range(start, len(tokens)))


def test_likelihood_scores_equal_each_sequence_scored_alone(backbone):
    from sieve.reranker.likelihood import LikelihoodPrompt, likelihood_scores

    tok = backbone.tokenizer
    prompt = LikelihoodPrompt.build(tok, "does aspirin lower heart risk", max_query_tokens=32)
    texts = passages(7, words=5) + [" ".join(WORDS) * 3]  # different lengths: right padding in every batch
    ids = [tok.encode(" " + t, add_bos=False) for t in texts]
    want = [naive_query_logprob(backbone.model, *prompt.sequence(p)) for p in ids]
    # one sequence per forward, a few per forward, all in one
    longest = max(len(prompt.sequence(p)[0]) for p in ids)
    for batch_tokens, expected_forwards in ((1, len(ids)), (3 * longest, None), (100_000, 1)):
        scores, tokens, forwards = likelihood_scores(backbone.model, prompt, ids, batch_tokens=batch_tokens)
        assert_close(scores, torch.tensor(want), atol=2e-3, rtol=1e-4)
        assert tokens == sum(len(prompt.sequence(p)[0]) for p in ids)
        assert forwards == expected_forwards if expected_forwards else 1 < forwards < len(ids)


def test_likelihood_batches_stay_within_the_token_budget():
    from sieve.reranker.likelihood import batches

    lengths = [5, 9, 3, 30, 2, 2, 2, 7]
    groups = batches(lengths, 20)
    assert [i for g in groups for i in g] == list(range(len(lengths)))  # all, in order, once
    for g in groups:
        assert len(g) == 1 or max(lengths[i] for i in g) * len(g) <= 20
    assert [30] in [[lengths[i] for i in g] for g in groups]  # longer than the budget: alone


def test_likelihood_mode_reads_the_query(reranker):
    """The scores are log p(query | passage): duplicates score the same, and another query changes them."""
    ps = ["same text here", "other words entirely", "same text here", "aspirin heart risk study"]
    a = reranker.rank("aspirin heart risk", ps, mode="likelihood")
    by = dict(zip(a.order, a.scores))
    assert by[0] == pytest.approx(by[2], abs=1e-4)
    b = reranker.rank("cancer blood level", ps, mode="likelihood")
    assert dict(zip(b.order, b.scores)) != pytest.approx(by)
    fused = reranker.rank("aspirin heart risk", ps, mode="likelihood", fuse=True, top_k=2)
    assert fused.fused and len(fused.order) == 2
    with pytest.raises(ValueError, match="empty"):
        reranker.rank("   ", ps, mode="likelihood")


def test_likelihood_cap_passage_reads_each_passage_up_to_max_passage_tokens(backbone):
    """"list" cuts passages to the one-pass prompt's cap for this many passages; "passage" only to
    max_passage_tokens, since each passage is its own sequence: the scores are those of the passages cut there."""
    from sieve.reranker.likelihood import LikelihoodPrompt, likelihood_scores

    long = [" ".join(WORDS[i % 9:] + WORDS[:i % 9]) * 4 + f" {i}" for i in range(100)]  # the one prompt is tight
    by_list = Reranker(backbone, max_passage_tokens=64)
    by_passage = Reranker(backbone, max_passage_tokens=64, likelihood_cap="passage")
    a = by_list.rank("aspirin heart risk", long, mode="likelihood")
    b = by_passage.rank("aspirin heart risk", long, mode="likelihood")
    assert a.stats.passage_cap < 64 == b.stats.passage_cap
    ids = by_passage.prompts.passage_ids(long)
    prompt = LikelihoodPrompt.build(backbone.tokenizer, "aspirin heart risk", 128,
                                    passage_lead=by_passage.prompts.passage_lead)
    want, _, _ = likelihood_scores(backbone.model, prompt, [p[:64] for p in ids], pad_id=backbone.tokenizer.pad_id or 0)
    assert_close(torch.tensor([dict(zip(b.order, b.scores))[i] for i in range(100)]), want, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="likelihood_cap"):
        Reranker(backbone, likelihood_cap="all")
