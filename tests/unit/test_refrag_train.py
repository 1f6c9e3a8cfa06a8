"""REFRAG training pieces on a tiny backbone: the loss is next-token loss on exactly the target tokens, gradients reach
only the projector, the curriculum, random expansion, policy labels, the model folder round trip, and the
retrieved-passage builder (gold kept, answer-bearing distractors dropped, seeded order)."""

import random

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from sieve.refrag import Projector, Refrag
from sieve.refrag.data import detok_wikitext, exact_match, has_answer, with_retrieved
from sieve.refrag.model_dir import PROJECTOR, RefragConfig, load_parts
from sieve.refrag.prompt import Layout, Segment
from sieve.refrag.train import expansion_gains, lm_loss, random_expansion, recon_blocks
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


def test_expansion_gains_label_each_block(refrag):
    ids = refrag.tokenizer.encode(text(20, 4), add_bos=False)
    layout = refrag.lm_layout(refrag.encode_ids([ids[:-6]], 4)[0], ids[-6:])
    base, gains = expansion_gains(refrag, layout, 6)
    assert gains.shape == (len(layout.blocks),)
    i = int(gains.argmax())
    assert_close(torch.tensor(base - float(gains[i])), lm_loss(refrag, [(layout, {i}, 6)], OFF).detach())


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
