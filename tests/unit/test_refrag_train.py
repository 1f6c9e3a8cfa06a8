"""REFRAG training pieces on a tiny backbone: the loss is next-token loss on exactly the target tokens, gradients reach
only the projector, the curriculum, random expansion, policy labels, the model folder round trip, and the
retrieved-passage builder (gold kept, answer-bearing distractors dropped, seeded order)."""

import io
import random

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from safetensors.torch import save_file
from sieve.refrag import Projector, Refrag
from sieve.refrag.data import QAExample, TokenSampler, detok_wikitext, exact_match, has_answer, with_retrieved
from sieve.refrag.model_dir import PROJECTOR, RefragConfig, load_parts
from sieve.refrag.prompt import Layout, Segment
from sieve.refrag.train import (
    TrainConfig,
    copy_weights,
    expansion_gains,
    lm_loss,
    random_expansion,
    recon_blocks,
    sft_batch,
    training_expansion,
)
from torch.testing import assert_close

from .test_refrag import HashEncoder, backbone, text  # noqa: F401  (backbone is a fixture)

OFF = torch.autocast("cpu", enabled=False)


@pytest.fixture()
def refrag(backbone):  # noqa: F811
    torch.manual_seed(0)
    return Refrag(backbone.model, backbone.tokenizer, HashEncoder(), Projector(HashEncoder.dim, 64, 32, 0.08), k=4)


def test_lm_loss_is_next_token_loss_on_the_targets(refrag):
    ids = refrag.tokenizer.encode(text(12, 1), add_bos=False)
    ctx, target = ids[:-5], ids[-5:]
    layout = refrag.lm_layout(refrag.encode_ids([ctx], 4)[0], target)
    every = set(range(len(layout.blocks)))
    got = lm_loss(refrag, [(layout, every, 5)], OFF)
    full = torch.tensor([layout.full_ids()])
    logits = refrag.model(full).logits[0]
    want = F.cross_entropy(logits[-6:-1], torch.tensor(target))
    assert_close(got, want)


def test_batched_loss_with_padding_equals_the_mean_of_single_losses(refrag):
    items = []
    for n, seed in ((9, 1), (17, 2)):
        ids = refrag.tokenizer.encode(text(n, seed), add_bos=False)
        items.append((refrag.lm_layout(refrag.encode_ids([ids[:-4]], 4)[0], ids[-4:]), set(), 4))
    batched = lm_loss(refrag, items, OFF)
    single = torch.stack([lm_loss(refrag, [it], OFF) for it in items]).mean()
    assert_close(batched, single, atol=1e-5, rtol=1e-5)  # equal target counts: the token mean is the mean


def test_copy_weight_counts_tokens_copyable_from_compressed_blocks_more(refrag):
    ctx = [5, 6, 7, 8, 9, 10, 11, 12]  # two blocks of 4
    target = [6, 11, 13, 6]  # 6 is in block 0, 11 in block 1, 13 in neither
    layout = refrag.lm_layout(refrag.encode_ids([ctx], 4)[0], target)
    assert copy_weights(layout, set(), 4, 2.0) == [3.0, 3.0, 1.0, 3.0]
    assert copy_weights(layout, {1}, 4, 2.0) == [3.0, 1.0, 1.0, 3.0]  # block 1 is fed as tokens: nothing to copy
    for expand in (set(), {1}):
        logits = refrag.model(inputs_embeds=refrag.embed(layout, expand)).logits[0, -5:-1]
        per_token = F.cross_entropy(logits, torch.tensor(target), reduction="none")
        w = torch.tensor(copy_weights(layout, expand, 4, 2.0))
        assert_close(lm_loss(refrag, [(layout, expand, 4)], OFF, copy_weight=2.0), (per_token * w).sum() / w.sum())
        assert_close(lm_loss(refrag, [(layout, expand, 4)], OFF, copy_weight=0.0), per_token.mean())


def test_gradients_reach_the_projector_and_not_the_decoder(refrag):
    refrag.projector.requires_grad_(True)
    ids = refrag.tokenizer.encode(text(10, 3), add_bos=False)
    layout = refrag.lm_layout(refrag.encode_ids([ids], 4)[0], ids)
    lm_loss(refrag, [(layout, set(), len(ids))], OFF).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in refrag.projector.parameters())
    assert all(p.grad is None for p in refrag.model.parameters())


def test_curriculum_grows_from_one_block():
    got = [recon_blocks(s, 100, 8) for s in range(100)]
    assert got[0] == 1 and got[-1] == 8
    assert got == sorted(got) and set(got) == {1, 2, 4, 8}
    assert {recon_blocks(s, 10, 1) for s in range(10)} == {1}


def test_random_expansion_stays_within_the_fraction():
    rng = random.Random(0)
    sizes = [len(random_expansion(16, 0.25, rng)) for _ in range(200)]
    assert max(sizes) <= 4 and min(sizes) == 0 and len(set(sizes)) > 2


def test_training_expansion_moves_a_fraction_of_the_expanded_sets_to_the_end(tmp_path):
    def draw(recency: float) -> list[set[int]]:
        cfg = TrainConfig(out=tmp_path, data_root=tmp_path, expand_max=0.25, expand_recency=recency)
        rng, pattern_rng = random.Random(0), random.Random(1)
        return [training_expansion(32, cfg, rng, pattern_rng) for _ in range(400)]

    plain, half, tail = draw(0.0), draw(0.5), draw(1.0)
    rng = random.Random(0)
    assert plain == [random_expansion(32, 0.25, rng) for _ in range(400)]  # off: exactly the random sets
    assert [len(s) for s in half] == [len(s) for s in plain] == [len(s) for s in tail]  # same counts, same windows
    assert all(s == set(range(32 - len(s), 32)) for s in tail)  # every set is the last blocks
    trailing = [h == set(range(32 - len(h), 32)) for h, p in zip(half, plain) if len(p) >= 2 and h != p]
    assert trailing and all(trailing) and 130 <= len(trailing) <= 210  # ~half moved (a random set rarely trails)


def test_sft_batch_replays_lm_windows_at_the_asked_fraction(refrag, tmp_path):
    nq = [QAExample("q1", "who wrote it", ["alpha"], [text(20, 5), text(20, 6)], [0])]
    sampler = TokenSampler(refrag.tokenizer, {"wiki": [text(300, 7)]}, {"wiki": 1.0}, seed=0)
    cfg = TrainConfig(out=tmp_path, data_root=tmp_path, k=4, batch_size=200, cpt_context_tokens=24, cpt_target_tokens=8)
    answer = len(refrag.tokenizer.encode("alpha", add_bos=False)) + 1  # + the end token

    def kinds(mix: float) -> list[str]:
        cfg.sft_lm_mix = mix
        batch = sft_batch(refrag, nq, sampler, cfg, random.Random(0))
        out = []
        for layout, expand, n_target in batch:
            assert len(layout.segments[-1].token_ids) >= n_target and expand <= set(range(len(layout.blocks)))
            out.append("lm" if (n_target, len(layout.blocks)) == (8, 6) else "qa" if n_target == answer else "?")
        return out

    assert set(kinds(0.0)) == {"qa"}
    assert set(kinds(1.0)) == {"lm"}
    mixed = kinds(0.5)
    assert set(mixed) == {"lm", "qa"} and 70 <= mixed.count("lm") <= 130
    assert lm_loss(refrag, sft_batch(refrag, nq, sampler, TrainConfig(
        out=tmp_path, data_root=tmp_path, k=4, batch_size=4, sft_lm_mix=0.5, cpt_context_tokens=24,
        cpt_target_tokens=8), random.Random(1)), OFF).isfinite()


def test_expansion_gains_label_each_block(refrag):
    ids = refrag.tokenizer.encode(text(20, 4), add_bos=False)
    layout = refrag.lm_layout(refrag.encode_ids([ids[:-6]], 4)[0], ids[-6:])
    base, gains = expansion_gains(refrag, layout, 6)
    assert gains.shape == (len(layout.blocks),)
    i = int(gains.argmax())
    assert_close(torch.tensor(base - float(gains[i])), lm_loss(refrag, [(layout, {i}, 6)], OFF).detach())


def test_policy_stage_fits_the_gains_and_compares_every_policy_with_the_oracle(refrag, tmp_path):
    from rich.progress import Progress
    from sieve.refrag.projector import PolicyScorer
    from sieve.refrag.train import _train_policy

    torch.manual_seed(0)
    refrag.scorer = PolicyScorer(HashEncoder.dim, 16)
    sampler = TokenSampler(refrag.tokenizer, {"wiki": [text(400, 9)]}, {"wiki": 1.0}, seed=0)
    cfg = TrainConfig(out=tmp_path, data_root=tmp_path, k=4, cpt_context_tokens=32, cpt_target_tokens=8,
                      policy_examples=8, policy_epochs=40, lr=3e-3)
    history: list[dict] = []
    with Progress(disable=True) as bar:
        _train_policy(refrag, sampler, cfg, bar, history)
    losses = [h["loss"] for h in history if h["stage"] == "policy"]
    assert len(losses) == 40 and losses[-1] < losses[0]  # the listwise loss on the gains goes down
    report = next(h for h in history if h["stage"] == "policy-eval")
    assert report["held_out_examples"] == 2
    for policy in ("learned", "similarity", "recency"):  # no policy's top quarter beats the best quarter
        assert report[f"mean_gain_top25_{policy}"] <= report["mean_gain_top25_oracle"] + 1e-4
    assert report["mean_gain_top25_oracle"] >= report["mean_gain_any_block"]


def test_model_folder_parts_round_trip(tmp_path, refrag):
    cfg = RefragConfig(encoder="hash-16", k=4, encoder_dim=16, dim=64, projector_hidden=32, policy_hidden=0)
    cfg.save(tmp_path)
    save_file({k: v.contiguous() for k, v in refrag.projector.state_dict().items()}, str(tmp_path / PROJECTOR))
    loaded = RefragConfig.load(tmp_path)
    assert loaded == cfg
    projector, scorer = load_parts(tmp_path, loaded, torch.device("cpu"))
    x = torch.nn.functional.normalize(torch.randn(3, 16), dim=-1)
    assert_close(projector(x), refrag.projector(x))
    assert scorer is None and not any(p.requires_grad for p in projector.parameters())


def test_projector_starts_at_the_token_embedding_scale():
    proj = Projector(384, 576, 2048, out_rms=0.136)
    x = torch.nn.functional.normalize(torch.randn(256, 384), dim=-1)
    rms = float(proj(x).detach().pow(2).mean().sqrt())
    assert 0.136 / 2 < rms < 0.136 * 2


def _row(i, question, answer, title, body):
    return {"id": f"q{i}", "question": question, "answers": [answer], "passages": [{"title": title, "text": body}],
            "gold": [0]}


def test_retrieved_passages_keep_gold_drop_answer_bearing_distractors_and_are_seeded():
    rows = [
        _row(0, "who painted the mona lisa", "Leonardo", "Mona Lisa", "The Mona Lisa was painted by Leonardo."),
        _row(1, "where is the mona lisa kept", "Louvre", "Louvre", "The Louvre in Paris keeps the Mona Lisa."),
        _row(2, "mona lisa painting theft year", "1911", "Theft", "The Mona Lisa painting was stolen in 1911."),
        _row(3, "what is the capital of peru", "Lima", "Peru", "Lima is the capital of Peru."),
        _row(4, "mona lisa smile", "sfumato", "Leonardo", "Leonardo da Vinci painted the Mona Lisa smile."),
    ]
    out = with_retrieved(rows[:1], rows, n_docs=3, seed=0)[0]
    assert len(out.passages) == 3
    assert out.passages[out.gold[0]] == "Mona Lisa\nThe Mona Lisa was painted by Leonardo."
    assert not any("Leonardo" in p for i, p in enumerate(out.passages) if i != out.gold[0])  # answer-bearing: out
    again = with_retrieved(rows[:1], rows, n_docs=3, seed=0)[0]
    assert again.passages == out.passages
    assert with_retrieved(rows[:1], rows, n_docs=1)[0].passages == ["Mona Lisa\nThe Mona Lisa was painted by Leonardo."]


def test_answer_metrics_and_detokenizer():
    assert exact_match("The Louvre.", ["Louvre"]) and not exact_match("in the Louvre", ["Louvre"])
    assert has_answer("It is in the Louvre, Paris", ["louvre"]) and not has_answer("Paris", ["Louvre"])
    assert detok_wikitext("a @-@ b , c . d 's ( e )") == "a-b, c. d's (e)"


def test_layout_positions_skip_no_segment():
    seg = Segment([1, 2, 3], torch.zeros(4))
    layout = Layout([Segment([9]), seg, Segment([7, 7])])
    assert layout.n_positions() == 4 and layout.n_positions({0}) == 6


def test_wikitext_windows_are_evenly_spaced_contexts_with_their_continuations():
    from sieve.refrag.eval import wikitext_windows

    ids = list(range(1000))
    windows = wikitext_windows(ids, 100, 20, 4)
    assert [c[0] for c, _ in windows] == [0, 220, 440, 660]  # (1000 - 120) / 4 apart
    assert all(c == list(range(c[0], c[0] + 100)) and t == list(range(c[0] + 100, c[0] + 120)) for c, t in windows)
    assert wikitext_windows(ids, 880, 120, 3) == [(ids[:880], ids[880:])] * 3  # as long as the text: all start at 0
    assert wikitext_windows(ids, 100, 20, 0) == []


def test_wikitext_eval_rows_compare_compressed_full_and_the_base_decoder(refrag, tmp_path):
    """Expanding every block is the full-context row; a REFRAG model with its own tuned decoder also gets the plain
    backbone's baselines (decoder "base"), which differ from its own."""
    import copy

    from sieve.refrag.eval import EvalConfig, wikitext_rows

    (tmp_path / "text/wikitext-2-raw").mkdir(parents=True)
    (tmp_path / "text/wikitext-2-raw/test.txt").write_text(" ".join(text(40, s) for s in range(6)))
    cfg = EvalConfig(data_root=tmp_path, ks=[4], expansions=[0.0, 1.0], contexts=[16], target_tokens=8, limit=2)

    def rows_of(rows):
        return {(r["mode"], r.get("decoder"), r.get("expansion")): r for r in rows}

    alone = rows_of(wikitext_rows(lambda k: refrag, cfg))
    assert set(alone) == {("no-context", "own", None), ("full-context", "own", None), ("compressed", None, 0.0),
                          ("compressed", None, 1.0)}
    full = alone["full-context", "own", None]
    assert full["ppl_vs_full"] == 1.0 and full["windows"] == 2 and full["context_tokens"] == 16
    assert alone["compressed", None, 1.0]["perplexity"] == pytest.approx(full["perplexity"], rel=1e-4)
    assert alone["compressed", None, 0.0]["decoder_positions"] < full["decoder_positions"]

    tuned = copy.deepcopy(refrag.model)
    with torch.no_grad():
        tuned.layers[0].attention.wqkv.weight.mul_(1.5)
    own = Refrag(tuned, refrag.tokenizer, refrag.blocks.encoder, refrag.projector, k=4)
    both = rows_of(wikitext_rows(lambda k: own, cfg, plain=refrag))
    assert both["full-context", "base", None]["perplexity"] == pytest.approx(full["perplexity"], rel=1e-4)
    assert both["full-context", "own", None]["perplexity"] != pytest.approx(full["perplexity"], rel=1e-3)
    assert both["no-context", "base", None]["perplexity"] == alone["no-context", "own", None]["perplexity"]


def test_wikitext_eval_has_one_row_per_expansion_policy(refrag, tmp_path, monkeypatch):
    """Each policy is its own row where blocks are expanded, chosen by that policy; nothing expanded is one row,
    policy "none"."""
    from sieve.refrag.eval import EvalConfig, run_eval, wikitext_rows

    (tmp_path / "text/wikitext-2-raw").mkdir(parents=True)
    (tmp_path / "text/wikitext-2-raw/test.txt").write_text(" ".join(text(40, s) for s in range(6)))
    cfg = EvalConfig(data_root=tmp_path, ks=[4], expansions=[0.0, 0.5], contexts=[16], target_tokens=8, limit=2,
                     policies=["similarity", "recency"])
    asked = []
    real = Refrag.choose_expansion

    def spy(self, layout, p, **kw):
        asked.append((p, kw.get("policy")))
        return real(self, layout, p, **kw)

    monkeypatch.setattr(Refrag, "choose_expansion", spy)
    rows = {(r["expansion"], r["policy"]): r for r in wikitext_rows(lambda k: refrag, cfg) if r["mode"] == "compressed"}
    assert set(rows) == {(0.0, "none"), (0.5, "similarity"), (0.5, "recency")}
    assert rows[0.5, "recency"]["decoder_positions"] == rows[0.5, "similarity"]["decoder_positions"]
    assert asked.count((0.5, "recency")) == asked.count((0.5, "similarity")) == 2  # each policy chose, per window
    with pytest.raises(ValueError, match="unknown expansion policy"):
        run_eval(EvalConfig(data_root=tmp_path, tasks=["wikitext"], policies=["nearest"]), home=tmp_path)


def test_nq_eval_rows_score_each_system_on_every_question(refrag, tmp_path, monkeypatch):
    import sieve.refrag.eval as ev
    from sieve.refrag.data import QAExample

    examples = [QAExample(str(i), f"what is {text(3, i)}?", [text(2, i)], [text(30, i), text(20, i + 7)], [0])
                for i in range(2)]
    monkeypatch.setattr(ev, "nq_eval", lambda root, n_docs, limit: examples[:limit])
    cfg = ev.EvalConfig(data_root=tmp_path, ks=[4], expansions=[0.0], limit=2, n_docs=2, max_new_tokens=3)
    rows = {(r["mode"], r.get("decoder")): r for r in ev.nq_rows(lambda k: refrag, cfg, plain=refrag)}
    assert set(rows) == {("closed-book", "own"), ("closed-book", "base"), ("full-context", "own"),
                         ("full-context", "base"), ("compressed", None)}
    assert all(r["questions"] == 2 and 0 <= r["exact_match"] <= r["accuracy"] <= 1 for r in rows.values())
    assert rows["full-context", "own"]["accuracy_minus_full"] == 0
    assert (rows["closed-book", "own"]["decoder_positions"] < rows["compressed", None]["decoder_positions"]
            < rows["full-context", "own"]["decoder_positions"])
    # with a console the questions run under a progress bar, to the same rows
    console = Console(file=io.StringIO(), force_terminal=True, width=100)
    shown = {(r["mode"], r.get("decoder")): r for r in ev.nq_rows(lambda k: refrag, cfg, console=console, plain=refrag)}
    assert shown == rows
    assert "nq-open 2 docs" in console.file.getvalue()


def test_a_tuned_chunk_encoder_gets_gradients_and_a_frozen_one_builds_no_graph(backbone):  # noqa: F811
    """--tune-encoder: the real MiniLM's `embed` runs with autograd only while training, gives the same vectors as
    inference, and the decoder's loss reaches its weights through the projector."""
    from sieve.refrag.encoder import load_chunk_encoder

    enc = load_chunk_encoder("all-minilm-l6-v2")
    texts = ["the heart pumps blood", "aspirin thins the blood"]
    frozen = enc.embed(texts)
    assert not frozen.requires_grad and not any(p.requires_grad for p in enc.parameters())
    enc.set_trainable(True)
    tuned = enc.embed(texts)
    assert tuned.requires_grad
    assert_close(tuned.detach(), frozen, atol=1e-5, rtol=0)
    with torch.no_grad():
        assert not enc.embed(texts).requires_grad  # evaluation inside training builds no graph
    r = Refrag(backbone.model, backbone.tokenizer, enc, Projector(enc.dim, backbone.args.dim, 32, 0.08), k=4)
    layout = r.lm_layout(r.encode_ids([list(range(5, 21))])[0], list(range(30, 36)))
    lm_loss(r, [(layout, set(), 6)], OFF).backward()
    assert sum(float(p.grad.abs().sum()) for p in enc.parameters() if p.grad is not None) > 0
    enc.set_trainable(False)
    assert not enc.embed(texts).requires_grad and not any(p.requires_grad for p in enc.parameters())
