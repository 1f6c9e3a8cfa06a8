"""REFRAG on a tiny random backbone with a hashing stand-in for the chunk encoder: block boundaries, prompt
assembly (expand-all == the full-context token path), expansion anywhere, streaming order, cancellation, errors,
index-time records."""

import re
import threading
import zlib

import pytest
import torch
from sieve.backbone import generate
from sieve.refrag import Answerer, EncodedPassage, Projector, Refrag, block_spans, encode_blocks
from sieve.refrag.policy import n_expanded, score_blocks, select
from sieve.refrag.projector import PolicyScorer
from torch.testing import assert_close

from .tiny_files import load_tiny_backbone

WORDS = "the cell protein gene aspirin heart risk study patients cancer blood level increase effect".split()


class HashEncoder:
    """A deterministic stand-in for MiniLM: hashed character trigrams (crc32: the same in every process, unlike
    Python's salted str hash), L2-normalized."""

    name = "hash-16"
    dim = 16

    def __init__(self):
        self.calls: list[int] = []

    def embed(self, texts):
        self.calls.append(len(texts))
        out = torch.zeros(len(texts), self.dim)
        for i, t in enumerate(texts):
            for j in range(max(len(t) - 2, 1)):
                out[i, zlib.crc32(t[j:j + 3].encode()) % self.dim] += 1.0
        return torch.nn.functional.normalize(out + 1e-3, dim=-1)


def text(n_words: int, seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    return " ".join(WORDS[j] for j in torch.randint(0, len(WORDS), (n_words,), generator=g).tolist())


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    return load_tiny_backbone(tmp_path_factory, max_seq_len=1024)


@pytest.fixture()
def refrag(backbone):
    torch.manual_seed(0)
    projector = Projector(HashEncoder.dim, backbone.args.dim, 32, out_rms=0.08).eval().requires_grad_(False)
    return Refrag(backbone.model, backbone.tokenizer, HashEncoder(), projector, k=4)


# ---------------------------------------------------------------------------------------------------- blocks


@pytest.mark.parametrize(("n", "k", "expected"), [
    (16, 8, [(0, 8), (8, 16)]),
    (17, 8, [(0, 8), (8, 16), (16, 17)]),  # not a multiple of k: a short last block
    (5, 16, [(0, 5)]),  # a single block
    (0, 16, []),
])
def test_block_spans(n, k, expected):
    assert block_spans(n, k) == expected


def test_block_spans_rejects_bad_k():
    with pytest.raises(ValueError, match="block size"):
        block_spans(10, 0)


def test_encode_blocks_covers_every_token_once(refrag):
    texts = [text(7, 1), text(30, 2), "x"]
    spans, vectors = encode_blocks(texts, 4, encoder=refrag.blocks)
    for t, sp, v in zip(texts, spans, vectors):
        ids = refrag.tokenizer.encode(t, add_bos=False)
        assert sp[0][0] == 0 and sp[-1][1] == len(ids)
        assert all(a[1] == b[0] for a, b in zip(sp, sp[1:]))  # contiguous, no overlap
        assert all(e - s == 4 for s, e in sp[:-1]) and 1 <= sp[-1][1] - sp[-1][0] <= 4
        assert v.shape == (len(sp), HashEncoder.dim)
    assert refrag.blocks.encoder.calls == [sum(len(s) for s in spans)]  # one encoder call for all blocks


def test_record_roundtrip_restores_spans_and_vectors(refrag):
    t = text(25, 3)
    enc = refrag.encode([t], 4)[0]
    back = EncodedPassage.from_record(enc.to_record(), t, refrag.tokenizer)
    assert back.spans == enc.spans and back.token_ids == enc.token_ids and back.k == 4
    assert_close(back.vectors, enc.vectors, atol=1e-3, rtol=1e-3)  # stored as float16
    with pytest.raises(ValueError, match="another tokenizer"):
        EncodedPassage.from_record(enc.to_record(), t + " more words", refrag.tokenizer)


# ---------------------------------------------------------------------------------------------------- layouts


def test_compressed_prompt_has_one_position_per_block(refrag):
    passages = refrag.encode([text(9, 1), text(14, 2)], 4)
    layout = refrag.qa_layout("which gene?", passages)
    n_blocks = sum(p.n_blocks for p in passages)
    n_block_tokens = sum(len(p.token_ids) for p in passages)
    assert len(layout.blocks) == n_blocks
    full = len(layout.full_ids())
    assert layout.n_positions() == full - n_block_tokens + n_blocks
    assert layout.n_positions(range(n_blocks)) == full
    emb = refrag.embed(layout)
    assert emb.shape == (1, layout.n_positions(), refrag.model.args.dim)
    assert layout.passages == [0, 1]


def test_expanding_every_block_equals_the_full_context_token_path(refrag):
    passages = refrag.encode([text(11, 4), text(3, 5), text(20, 6)], 4)  # 11, 3, 20 words: ragged last blocks
    layout = refrag.qa_layout("what increases the risk?", passages)
    every = set(range(len(layout.blocks)))
    model = refrag.model
    full_ids = torch.tensor([layout.full_ids()])
    assert_close(refrag.embed(layout, every), model.tok_embeddings(full_ids))
    with torch.no_grad():
        got = model(inputs_embeds=refrag.embed(layout, every)).logits
        want = model(full_ids).logits
    assert torch.equal(got, want)


def test_expansion_anywhere_puts_tokens_exactly_there(refrag):
    passages = refrag.encode([text(16, 7), text(16, 8)], 4)
    layout = refrag.qa_layout("q?", passages)
    n = len(layout.blocks)
    middle = {1, n - 2}
    emb = refrag.embed(layout, middle)[0]
    # walk the layout: expanded blocks are their tokens' embeddings, compressed ones the projector's output
    pos, b = 0, 0
    for seg in layout.segments:
        if seg.is_block and b not in middle:
            assert_close(emb[pos], refrag.projector(seg.vector[None])[0])
            pos += 1
        else:
            assert_close(emb[pos:pos + len(seg.token_ids)], refrag.model.tok_embeddings(torch.tensor(seg.token_ids)))
            pos += len(seg.token_ids)
        b += seg.is_block
    assert pos == emb.shape[0] == layout.n_positions(middle)


def test_lm_layout_with_a_single_block(refrag):
    ctx = refrag.encode_ids([[5, 6, 7]], 16)[0]
    layout = refrag.lm_layout(ctx, [8, 9])
    assert len(layout.blocks) == 1 and layout.n_positions() == 1 + 1 + 2
    assert layout.full_ids()[1:] == [5, 6, 7, 8, 9]


# ---------------------------------------------------------------------------------------------------- policy


def test_select_takes_round_p_n_top_scores():
    scores = torch.tensor([0.1, 0.9, 0.3, 0.8, 0.2])
    assert select(scores, 0.0) == set()
    assert select(scores, 0.4) == {1, 3}
    assert select(scores, 1.0) == {0, 1, 2, 3, 4}
    assert n_expanded(10, 0.25) == 3 and n_expanded(3, 0.1) == 0
    with pytest.raises(ValueError, match="between 0 and 1"):
        select(scores, 1.5)


def test_similarity_policy_prefers_the_block_like_the_query(refrag):
    enc = refrag.blocks.encoder
    blocks = enc.embed(["aspirin heart", "cancer blood", "gene protein"])
    scores = score_blocks("similarity", enc.embed(["cancer blood"])[0], blocks)
    assert int(scores.argmax()) == 1
    scorer = PolicyScorer(enc.dim, 8)
    learned = score_blocks("learned", enc.embed(["x"])[0], blocks, scorer)
    assert learned.shape == (3,)
    with pytest.raises(ValueError, match="no learned policy"):
        score_blocks("learned", blocks[0], blocks, None)


def test_recency_policy_expands_the_blocks_nearest_the_end(refrag):
    """Recency ignores the vectors: the last round(p * n) blocks, whatever the query (here the first block)."""
    vectors = refrag.blocks.encoder.embed(["aspirin heart", "cancer blood", "gene protein", "bone density"])
    scores = score_blocks("recency", vectors[0], vectors)
    assert select(scores, 0.5) == {2, 3} and select(scores, 0.25) == {3}
    assert select(score_blocks("recency", vectors[0], vectors[:1]), 1.0) == {0}
    ctx = refrag.encode_ids([list(range(5, 5 + 4 * 7))], 4)[0]  # 7 blocks
    layout = refrag.lm_layout(ctx, [9, 10])
    assert refrag.choose_expansion(layout, 0.3, policy="recency") == {5, 6}
    with pytest.raises(ValueError, match="unknown expansion policy 'nearest'.*recency"):
        refrag.choose_expansion(layout, 0.3, policy="nearest")
    with pytest.raises(ValueError, match="unknown expansion policy 'nearest'"):  # p = 1 reads no scores
        refrag.choose_expansion(layout, 1.0, policy="nearest")
    assert refrag.choose_expansion(layout, 0.0, policy="none") == set()  # nothing expanded: no policy needed


# ---------------------------------------------------------------------------------------------------- answering


def test_stream_yields_the_greedy_tokens_in_order_and_expand_all_matches_full_prompt(refrag):
    answerer = Answerer(refrag)
    passages = [text(10, 1), text(13, 2)]
    s = answerer.stream("which gene?", passages, k=4, expansion=1.0, max_new_tokens=12)
    pieces = list(s)
    layout = refrag.qa_layout("which gene?", refrag.encode(passages, 4))
    want = generate(refrag.model, [layout.full_ids()], max_new_tokens=12, stop_tokens=refrag.tokenizer.eos_ids)[0]
    assert s.token_ids == want
    assert pieces == list(refrag.tokenizer.stream_decode(want))  # random weights: held-back partial UTF-8 too
    assert s.passages == [0, 1] and s.stats.expanded == s.stats.blocks
    assert s.stats.prompt_positions == s.stats.full_prompt_tokens


def test_compressed_stream_is_shorter_and_reports_expanded_blocks(refrag):
    answerer = Answerer(refrag)
    passages = [text(30, 1), text(30, 2), text(30, 3)]
    s = answerer.stream("cancer blood", passages, k=4, expansion=0.25, max_new_tokens=3)
    list(s)
    assert s.stats.prompt_positions < s.stats.full_prompt_tokens
    assert len(s.expanded) == n_expanded(s.stats.blocks, 0.25) > 0
    assert all(0 <= p < 3 for p, _ in s.expanded)


def test_precomputed_encodings_give_the_same_answer_as_texts(refrag):
    answerer = Answerer(refrag)
    passages = [text(12, 1), text(9, 2)]
    pre = refrag.encode(passages, 4)
    a = answerer.stream("q?", passages, k=4, max_new_tokens=6)
    b = answerer.stream("q?", pre, k=4, max_new_tokens=6)
    list(a), list(b)
    assert a.token_ids == b.token_ids
    with pytest.raises(ValueError, match="encoded with k=4"):
        answerer.stream("q?", pre, k=8)


def test_unset_expansion_and_policy_take_the_models_defaults(backbone):
    torch.manual_seed(0)
    projector = Projector(HashEncoder.dim, backbone.args.dim, 32, out_rms=0.08).eval().requires_grad_(False)
    r = Refrag(backbone.model, backbone.tokenizer, HashEncoder(), projector, k=4, expansion=0.5, policy="recency")
    answerer = Answerer(r)
    passages = [text(30, 1), text(30, 2), text(30, 3)]
    default = answerer.stream("cancer blood", passages, max_new_tokens=4)
    list(default)
    said = answerer.stream("cancer blood", passages, expansion=0.5, policy="recency", max_new_tokens=4)
    list(said)
    assert default.expanded == said.expanded and default.token_ids == said.token_ids
    assert len(default.expanded) == n_expanded(default.stats.blocks, 0.5) > 0
    blocks = r.qa_layout("cancer blood", r.encode(passages, 4)).blocks  # recency: the last blocks of the context
    m = len(default.expanded)
    assert default.expanded == sorted((b.passage, b.block) for b in blocks[len(blocks) - m:])
    by_similarity = answerer.stream("cancer blood", passages, policy="similarity", max_new_tokens=1)  # default 0.5
    assert len(by_similarity.expanded) == len(default.expanded) and by_similarity.expanded != default.expanded
    nothing = answerer.stream("cancer blood", passages, expansion=0.0, max_new_tokens=1)
    assert nothing.expanded == [] and nothing.stats.expanded == 0
    plain = Refrag(backbone.model, backbone.tokenizer, HashEncoder(), projector, k=4)  # library defaults
    assert (plain.expansion, plain.policy) == (0.25, "similarity")


@pytest.mark.parametrize(("options", "message"), [
    ({"expansion": 1.5}, "between 0 and 1"),
    ({"policy": "random"}, "unknown expansion policy"),
    ({"policy": "learned"}, "no learned policy"),
])
def test_bad_default_expansion_is_refused_at_load(backbone, options, message):
    projector = Projector(HashEncoder.dim, backbone.args.dim, 32).eval()
    with pytest.raises(ValueError, match=message):
        Refrag(backbone.model, backbone.tokenizer, HashEncoder(), projector, k=4, **options)


def test_model_folder_sets_the_answer_defaults(backbone, tmp_path):
    """refrag.json's expansion / policy reach the loaded model; a folder written before they existed gets the
    library defaults; a bad value names the file."""
    import json

    from safetensors.torch import save_file
    from sieve.refrag import load_refrag
    from sieve.refrag.model_dir import CONFIG, PROJECTOR, RefragConfig, resolve_refrag, shipped

    projector = Projector(HashEncoder.dim, backbone.args.dim, 32)
    cfg = RefragConfig(encoder_dim=HashEncoder.dim, dim=backbone.args.dim, projector_hidden=32, policy_hidden=0,
                       k=4, expansion=0.5, policy="recency")
    cfg.save(tmp_path)
    save_file(projector.state_dict(), str(tmp_path / PROJECTOR))
    r = load_refrag(tmp_path, home=tmp_path / "home", backbone=backbone, encoder=HashEncoder())
    assert (r.expansion, r.policy, r.k) == (0.5, "recency", 4)
    raw = json.loads((tmp_path / CONFIG).read_text())
    old = {k: v for k, v in raw.items() if k not in ("expansion", "policy")}
    (tmp_path / CONFIG).write_text(json.dumps(old))
    r = load_refrag(tmp_path, home=tmp_path / "home", backbone=backbone, encoder=HashEncoder())
    assert (r.expansion, r.policy) == (0.25, "similarity")
    (tmp_path / CONFIG).write_text(json.dumps(old | {"policy": "learned"}))  # no policy.safetensors here
    with pytest.raises(ValueError, match=f"{CONFIG}: the default policy is 'learned'"):
        load_refrag(tmp_path, home=tmp_path / "home", backbone=backbone, encoder=HashEncoder())
    for name in shipped():  # what the shipped models answer with when a caller does not say
        got = RefragConfig.load(resolve_refrag(name))
        assert (got.expansion, got.policy) == (0.25, "similarity"), name


def _count_forwards(model):
    calls = []
    # the final norm runs once per model pass: prompt forward or decode step
    handle = model.norm.register_forward_hook(lambda *a: calls.append(1))
    return calls, handle


def test_consumer_that_stops_stops_generation(refrag):
    answerer = Answerer(refrag)
    calls, handle = _count_forwards(refrag.model)
    try:
        s = answerer.stream("q?", [text(20, 1)], k=4, max_new_tokens=50)
        next(s)  # the first text piece (a token that is part of a character gives none on its own)
        n = len(s.token_ids)
        s.close()
        assert s.stats.stopped == "closed" and len(s.token_ids) == n < 50
        assert len(calls) <= n + 1  # the prompt forward and one decode step per token after the first, at most
        calls.clear()
        s2 = answerer.stream("q?", [text(20, 1)], k=4, max_new_tokens=50)  # the model is free again
        list(s2)
        assert len(calls) >= 2
    finally:
        handle.remove()


def test_cancel_event_stops_generation(refrag):
    answerer = Answerer(refrag)
    event = threading.Event()
    calls, handle = _count_forwards(refrag.model)
    try:
        s = answerer.stream("q?", [text(20, 1)], k=4, max_new_tokens=40, cancel=event)
        at_cancel = None
        for _ in s:
            if at_cancel is None:
                at_cancel = len(s.token_ids)  # tokens made before the first text piece reached the consumer
            event.set()
        assert s.stats.stopped == "cancelled"
        assert len(s.token_ids) == at_cancel < 40  # no token after the event
        assert len(calls) <= at_cancel + 1
        pre = threading.Event()
        pre.set()
        assert list(answerer.stream("q?", [text(5, 1)], k=4, cancel=pre)) == []
    finally:
        handle.remove()


def test_two_streams_cannot_share_the_cache(refrag):
    answerer = Answerer(refrag)
    a = answerer.stream("q?", [text(10, 1)], k=4, max_new_tokens=30)
    next(a)  # a holds the model now
    b = answerer.stream("q?", [text(10, 2)], k=4, max_new_tokens=30)
    with pytest.raises(RuntimeError, match="another answer"):
        next(b)
    a.close()
    assert isinstance("".join(answerer.stream("q?", [text(10, 2)], k=4, max_new_tokens=3)), str)


@pytest.mark.parametrize(("question", "passages", "options", "message"), [
    ("", ["a passage"], {}, "question is empty"),
    ("   ", ["a passage"], {}, "question is empty"),
    ("q?", [], {}, "no passages"),
    ("q?", ["ok", "  "], {}, "passage 1 is empty"),
    ("q?", ["ok"], {"expansion": 2.0}, "between 0 and 1"),
    ("q?", ["ok"], {"k": 0}, "block size"),
    ("q?", ["ok"], {"max_new_tokens": 0}, "at least 1"),
])
def test_bad_input_gives_clear_errors(refrag, question, passages, options, message):
    with pytest.raises(ValueError, match=message):
        Answerer(refrag).stream(question, passages, **options)


def test_over_long_input_gives_a_clear_error(refrag):
    answerer = Answerer(refrag)
    long = [text(400, i) for i in range(4)]  # thousands of tokens: over the 1024 context even compressed at k=4?
    with pytest.raises(ValueError, match="context"):
        answerer.stream("q?", long, k=4, expansion=1.0, max_new_tokens=8)
    s = answerer.stream("q?", long, k=32, expansion=0.0, max_new_tokens=2)  # compressed 8x it fits
    assert s.stats.prompt_positions < 1024
    with pytest.raises(ValueError, match="passages is more than"):
        Answerer(refrag, max_passages=2).stream("q?", ["a", "b", "c"])
    with pytest.raises(ValueError, match="question is .* tokens"):
        answerer.stream("why " * 600, ["a"])


# ---------------------------------------------------------------------------------------------------- CLI


def test_answer_cli_streams_from_inline_and_file_passages(refrag, tmp_path, monkeypatch):
    import json

    import typer
    from sieve.refrag import cli, model_dir
    from typer.testing import CliRunner

    monkeypatch.setattr(model_dir, "load_refrag", lambda *a, **kw: refrag)
    app = typer.Typer()
    app.command()(cli.answer)
    (tmp_path / "a.txt").write_text(text(20, 1))
    (tmp_path / "b.jsonl").write_text(json.dumps({"title": "T", "text": text(8, 2)}) + "\n\n"
                                      + json.dumps({"text": text(8, 3)}) + "\n")
    runner = CliRunner()
    res = runner.invoke(app, ["which gene?", text(6, 4), "--file", str(tmp_path / "a.txt"), "--file",
                              str(tmp_path / "b.jsonl"), "--k", "4", "--max-new-tokens", "5", "--expansion", "1.0"])
    assert res.exit_code == 0, res.output
    given = [text(6, 4), text(20, 1), f"T\n{text(8, 2)}", text(8, 3)]
    layout = refrag.qa_layout("which gene?", refrag.encode(given, 4))
    want = generate(refrag.model, [layout.full_ids()], max_new_tokens=5, stop_tokens=refrag.tokenizer.eos_ids)[0]
    assert "".join(refrag.tokenizer.stream_decode(want)) in res.stdout
    default = runner.invoke(app, ["which gene?", text(40, 5), "--k", "4", "--max-new-tokens", "1"])  # no --expansion
    blocks, expanded = map(int, re.search(r"(\d+) blocks, (\d+) expanded", default.output).groups())
    assert default.exit_code == 0 and expanded == n_expanded(blocks, refrag.expansion) > 0
    zero = runner.invoke(app, ["which gene?", text(40, 5), "--k", "4", "--max-new-tokens", "1", "--expansion", "0"])
    assert re.search(r"\d+ blocks, 0 expanded", zero.output), zero.output
    bad = runner.invoke(app, ["  ", "a passage"])
    assert bad.exit_code == 1 and "question is empty" in bad.output
    missing = runner.invoke(app, ["q?", "--file", str(tmp_path / "nope.txt")])
    assert missing.exit_code == 1 and "no file" in missing.output
