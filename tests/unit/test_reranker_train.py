"""Reranker training on a tiny random backbone: complete labels from train qrels, which tokens carry the
importance-aware loss, gradients, learning on a fixed list, checkpoint/resume, and the adapter loading back."""

import json
import random

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from sieve.backbone import ModelArgs, load_backbone
from sieve.embedder.data import Pair
from sieve.reranker import IdTokens, PromptBuilder
from sieve.reranker.data import MixedLists, PairLists, RankingExample, ScifactTrainLists
from sieve.reranker.first import inline_scores, relevance_tokens
from sieve.reranker.model_dir import LORA_TARGETS, merge_lora
from sieve.reranker.train import (
    TrainConfig,
    encode_example,
    importance_weight,
    lora_state,
    losses,
    shuffled,
    train_on,
)

from .tiny_files import write_beir, write_tiny_gguf


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    args = ModelArgs.from_name("tiny")
    args.max_seq_len = 2048
    path = tmp_path_factory.mktemp("rrt") / "tiny.gguf"
    write_tiny_gguf(path, args)
    return path


def fresh_backbone(gguf, tmp_path):
    return load_backbone(gguf, home=tmp_path / "home", device="cpu", dtype="float32")


def inject(model):
    return inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, lora_dropout=0.0),
                                   model)


class FixedLists:
    """A stand-in for ScifactTrainLists: one query, passages in a fixed order, label reversed."""

    qids = ["q1"]

    def pick(self, rng):
        return rng.choice(self.qids)

    def example(self, qid, n, rng, distractors=0):
        return RankingExample("hello world", [f"passage {i} about cells" for i in range(n)], list(range(n))[::-1], 1)


def test_importance_weights_fall_with_rank():
    w = [importance_weight(r) for r in range(100)]
    assert w[0] == 1.0 and all(a > b for a, b in zip(w, w[1:]))


def test_encoded_example_puts_loss_on_id_choices_only(gguf, tmp_path):
    bb = fresh_backbone(gguf, tmp_path)
    ids = IdTokens.from_tokenizer(bb.tokenizer, max_id=12)
    builder = PromptBuilder(bb.tokenizer, context=bb.args.max_seq_len, ids=ids, max_passage_tokens=16)
    ex = RankingExample("q", [f"p{i}" for i in range(12)], [11, 0, 5, 1, 2, 3, 4, 6, 7, 8, 9, 10], 1)
    enc = encode_example(ex, builder, ids)
    prompt = builder.build("q", ex.passages)
    answer = ids.output_ids(ex.order)
    assert enc.ids[0].tolist() == prompt.ids + answer + enc.layout.tokens
    # every target position predicts the answer token that follows it, and that token is allowed there
    for pos, allowed, target, _ in enc.targets:
        assert enc.ids[0, pos + 1].item() == allowed[target] and len(allowed) > 1
    # format tokens are forced (no loss); the last id is forced too: only one id is left
    assert ids.close in [a[t] for _, a, t, _ in enc.targets]  # `]` is a choice after `1` (10, 11, 12 exist)
    assert all(ids.separator[0] != a[t] for _, a, t, _ in enc.targets)
    weights = [w for *_, w in enc.targets]
    assert weights == sorted(weights, reverse=True) and weights[0] == 1.0
    # positions: the trie sits at the opener's position + depth
    assert enc.positions[0, -len(enc.layout.tokens):].min().item() == len(prompt.ids) + len(ids.first_open)


def test_losses_are_finite_and_reach_the_adapter(gguf, tmp_path):
    bb = fresh_backbone(gguf, tmp_path)
    model = inject(bb.model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    ids = IdTokens.from_tokenizer(bb.tokenizer, max_id=15)
    builder = PromptBuilder(bb.tokenizer, context=bb.args.max_seq_len, ids=ids, max_passage_tokens=16)
    enc = encode_example(FixedLists().example("q1", 15, None), builder, ids)
    out = losses(model, enc, ids, bb.device, relevance_tokens(bb.tokenizer))
    assert out.first_scores.shape == out.inline_scores.shape == (15,)
    assert all(torch.isfinite(x) and x > 0 for x in (out.lm, out.first, out.inline))
    (out.lm + out.first + out.inline).backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    # the inline scores read in training are the ones inference computes from the prompt alone
    ex = FixedLists().example("q1", 15, None)
    prompt = builder.build(ex.query, ex.passages)
    assert prompt.ends == enc.ends and len(set(prompt.ends)) == 15
    for p in model.parameters():
        p.requires_grad_(False)
    alone = inline_scores(model, prompt.ids, prompt.ends, relevance_tokens(bb.tokenizer))
    torch.testing.assert_close(alone, out.inline_scores.detach(), rtol=1e-4, atol=1e-4)
    no_inline = losses(model, enc, ids, bb.device)
    assert no_inline.inline == 0 and torch.equal(no_inline.first_scores, out.first_scores.detach())


def test_training_learns_a_fixed_list_resumes_and_loads_back(gguf, tmp_path):
    bb = fresh_backbone(gguf, tmp_path)
    cfg = TrainConfig(out=tmp_path / "out", data_root=tmp_path, steps=16, batch_size=1, n_min=6, n_max=6, lr=1e-2,
                      warmup=1, dtype="float32", save_every=8, max_passage_tokens=16, shuffle=0.0)
    saved = {}
    train_on(bb, cfg, FixedLists(), progress=False, save=lambda m: saved.update(lora_state(m)), inject=inject)
    history = json.loads((cfg.out / "train_log.json").read_text())["history"]
    assert [h["step"] for h in history] == list(range(1, 17))
    assert history[-1]["first"] < history[0]["first"] and history[-1]["lm"] < history[0]["lm"]
    assert all(0.0 <= h["pos_rank"] <= 1.0 for h in history)  # the one positive's place under the FIRST scores
    saved_cfg = json.loads((cfg.out / "reranker.json").read_text())
    assert (cfg.out / "checkpoint.pt").is_file() and saved_cfg["lora_r"]
    assert saved_cfg["max_passage_tokens"] == 16  # inference cuts passages where training did

    cfg.steps = 18  # resume: only steps 17 and 18 run
    train_on(fresh_backbone(gguf, tmp_path), cfg, FixedLists(), progress=False, save=lambda m: None, inject=inject)
    history = json.loads((cfg.out / "train_log.json").read_text())["history"]
    assert [h["step"] for h in history] == list(range(1, 19))

    plain = fresh_backbone(gguf, tmp_path)
    before = plain.model.layers[0].attention.wqkv.weight.clone()
    assert merge_lora(plain.model, saved, 8 / 4) == 4 * plain.args.n_layers
    assert not torch.equal(before, plain.model.layers[0].attention.wqkv.weight)


def test_shuffled_list_keeps_the_label_on_the_same_passages():
    ex = RankingExample("q", [f"p{i}" for i in range(20)], [7, 3] + [i for i in range(20) if i not in (7, 3)], 2)
    mixed = shuffled(ex, random.Random(0))
    assert mixed.passages != ex.passages and sorted(mixed.passages) == sorted(ex.passages)
    assert [mixed.passages[i] for i in mixed.order] == [ex.passages[i] for i in ex.order]
    assert (mixed.query, mixed.positives) == ("q", 2)


def test_training_shows_lists_shuffled(gguf, tmp_path, monkeypatch):
    import sieve.reranker.train as train_mod

    seen = []
    real = train_mod.encode_example
    monkeypatch.setattr(train_mod, "encode_example", lambda ex, *a: seen.append(ex) or real(ex, *a))
    cfg = TrainConfig(out=tmp_path / "out", data_root=tmp_path, steps=3, batch_size=1, n_min=8, n_max=8,
                      dtype="float32", max_passage_tokens=16)  # shuffle=1.0: the default
    train_on(fresh_backbone(gguf, tmp_path), cfg, FixedLists(), progress=False, save=lambda m: None, inject=inject)
    plain = FixedLists().example("q1", 8, None)
    assert len(seen) == 3 and all(ex.passages != plain.passages for ex in seen)
    for ex in seen:  # the label still puts the same passages first: plain's order is reversed
        assert [ex.passages[i] for i in ex.order] == [plain.passages[i] for i in plain.order]


def test_complete_labels_put_train_positives_first(tmp_path):
    docs = {f"d{i}": f"aspirin heart study number {i} " + "filler " * i for i in range(30)}
    docs["gold"] = "unrelated words about galaxies and stars"  # a positive BM25 will not retrieve
    docs["gold2"] = "aspirin heart aspirin heart aspirin heart"
    write_beir(tmp_path / "retrieval" / "scifact", docs, {"q1": "aspirin heart", "q2": "filler"},
               [("q1", "gold", 1), ("q1", "gold2", 1), ("q2", "d29", 1)])
    lists = ScifactTrainLists(tmp_path, depth=30, teacher="bm25")
    assert lists.qids == ["q1", "q2"]
    ex = lists.example("q1", 10, random.Random(0))
    assert len(ex.passages) == 10 and sorted(ex.order) == list(range(10)) and ex.positives == 2
    top = {ex.passages[i] for i in ex.order[:2]}
    assert top == {lists.corpus["gold"], lists.corpus["gold2"]}  # positives first, the unretrieved one included
    # the rest follows the teacher (BM25 here): scores non-increasing along the label
    by_doc = dict(lists.bm25["q1"])
    text_to_id = {v: k for k, v in lists.corpus.items()}
    rest = [by_doc.get(text_to_id[ex.passages[i]], 0.0) for i in ex.order[2:]]
    assert rest == sorted(rest, reverse=True)


def test_teacher_scores_file_round_trips_and_replaces_the_teacher(tmp_path):
    docs = {f"d{i}": f"aspirin heart study number {i} " + "filler " * i for i in range(12)}
    docs["gold"] = "unrelated words about galaxies and stars"
    write_beir(tmp_path / "retrieval" / "scifact", docs, {"q1": "aspirin heart", "q2": "filler"},
               [("q1", "gold", 1), ("q2", "d11", 1)])
    made = ScifactTrainLists(tmp_path, depth=8, teacher="bm25")
    assert "gold" in made.candidates("q1") and len(made.candidates("q1")) == 9  # top-8 plus the unretrieved positive
    path = tmp_path / "scores.json"
    made.save_teacher_scores(path)
    loaded = ScifactTrainLists(tmp_path, depth=8, teacher="bm25")
    loaded.load_teacher_scores(path)
    loaded._score = None  # the file must answer every candidate: calling the teacher now would fail
    for qid in ("q1", "q2"):
        a, b = made.example(qid, 6, random.Random(1)), loaded.example(qid, 6, random.Random(1))
        assert (a.passages, a.order) == (b.passages, b.order)
    other = ScifactTrainLists(tmp_path, depth=8, teacher="all-minilm-l6-v2")
    with pytest.raises(ValueError, match="bm25"):
        other.load_teacher_scores(path)


def test_time_budget_stops_after_a_step_and_saves(gguf, tmp_path):
    cfg = TrainConfig(out=tmp_path / "out", data_root=tmp_path, steps=50, batch_size=1, n_min=6, n_max=6,
                      dtype="float32", max_passage_tokens=16, max_minutes=0.0)
    saved = {}
    summary = train_on(fresh_backbone(gguf, tmp_path), cfg, FixedLists(), progress=False,
                       save=lambda m: saved.update(lora_state(m)), inject=inject)
    assert summary["steps"] == 1 and saved  # one step, then the adapter is written all the same
    assert torch.load(cfg.out / "checkpoint.pt", weights_only=False)["step"] == 1
    assert json.loads((cfg.out / "reranker.json").read_text())["mode"] == "full"


def test_inline_only_training_makes_inline_the_default_mode(gguf, tmp_path):
    cfg = TrainConfig(out=tmp_path / "inline", data_root=tmp_path, steps=1, batch_size=1, n_min=6, n_max=6,
                      dtype="float32", max_passage_tokens=16, lm_weight=0.0, first_weight=0.0)
    train_on(fresh_backbone(gguf, tmp_path), cfg, FixedLists(), progress=False, save=lambda m: None, inject=inject)
    saved = json.loads((cfg.out / "reranker.json").read_text())
    assert (saved["mode"], saved["inline_window"]) == ("inline", 6)  # scored in groups of the trained list size
    assert "Default mode (`reranker.json`): `inline`" in (cfg.out / "README.md").read_text()


def test_id_token_loss_equals_one_softmax_per_target():
    from sieve.reranker.train import id_token_loss, target_tensors

    g = torch.Generator().manual_seed(0)
    targets = [(0, [5, 9, 2], 1, 1.0), (1, [7], 0, 0.6), (2, [3, 4, 8, 11, 1], 4, 0.5)]
    allowed, valid, _, _ = target_tensors(targets)
    assert allowed.shape == (3, 5) and valid.sum().item() == 9  # padded to the widest choice
    logits = torch.randn(3, 12, generator=g)
    want = sum(-torch.log_softmax(logits[i, a], -1)[t] * w for i, (_, a, t, w) in enumerate(targets)) / 2.1
    assert torch.allclose(id_token_loss(logits, targets), want)


def qa_pairs(topic: str, n: int) -> list[Pair]:
    return [Pair(f"what about {topic} {i}", f"{topic} {i} answer " + "words " * i, topic) for i in range(n)]


def test_pair_lists_pool_the_answers_and_put_a_querys_positives_first():
    pairs = qa_pairs("aspirin", 12) + [Pair("what about aspirin 3", "a second answer about aspirin 3", "x")]
    lists = PairLists(pairs, depth=10, teacher="bm25")
    assert len(lists.qids) == 12 and len(lists.corpus) == 13  # the repeated question is one query, two positives
    q = next(q for q in lists.qids if lists.queries[q] == "what about aspirin 3")
    ex = lists.example(q, 8, random.Random(0))
    assert ex.positives == 2 and sorted(ex.order) == list(range(8))
    assert {ex.passages[i] for i in ex.order[:2]} == {"aspirin 3 answer " + "words " * 3,
                                                      "a second answer about aspirin 3"}
    assert all(p in lists.corpus.values() for p in ex.passages)  # negatives are other questions' answers


def test_mixed_lists_draw_by_weight_and_keep_teacher_scores(tmp_path):
    a, b = PairLists(qa_pairs("aspirin", 10), depth=6, teacher="bm25"), PairLists(qa_pairs("gene", 10), depth=6,
                                                                                     teacher="bm25")
    mixed = MixedLists({"a": (a, 3.0), "b": (b, 1.0)})
    rng = random.Random(0)
    draws = [mixed.pick(rng) for _ in range(4000)]
    assert 0.72 < sum(d.startswith("a/") for d in draws) / len(draws) < 0.78
    ex = mixed.example(draws[0], 5, random.Random(1))
    assert ex.query == (a if draws[0].startswith("a/") else b).queries[draws[0].split("/", 1)[1]]
    path = tmp_path / "scores.json"
    mixed.save_teacher_scores(path)
    fresh = MixedLists({"a": (PairLists(qa_pairs("aspirin", 10), depth=6, teacher="bm25"), 3.0),
                        "b": (PairLists(qa_pairs("gene", 10), depth=6, teacher="bm25"), 1.0)})
    fresh.load_teacher_scores(path)
    for lists in fresh.sources.values():
        lists._score = None  # every candidate's score must come from the file
    for qid in draws[:20]:
        x, y = mixed.example(qid, 5, random.Random(2)), fresh.example(qid, 5, random.Random(2))
        assert (x.passages, x.order) == (y.passages, y.order)
    with pytest.raises(ValueError, match="positive weight"):
        MixedLists({"a": (a, 0.0)})


def test_positive_rank_reads_where_the_first_scores_put_the_positives():
    from sieve.reranker.train import Encoded, positive_rank

    enc = Encoded(None, None, None, [], label=[3, 0, 1, 2, 4], root_at=0, positives=2)  # passages 3 and 0 are judged
    assert positive_rank(torch.tensor([5.0, 1.0, 2.0, 9.0, 0.0]), enc) == 0.125  # ranks 0 and 1 of 5 -> 0.5 / 4
    assert positive_rank(torch.tensor([-5.0, 1.0, 2.0, -9.0, 0.0]), enc) == 0.875  # the last two places
    assert positive_rank(torch.zeros(5), Encoded(None, None, None, [], [0, 1, 2, 3, 4], 0, 0)) is None


def test_distractors_are_other_queries_positives_labelled_last_and_follow_a_shuffle():
    lists = PairLists(qa_pairs("aspirin", 15) + qa_pairs("gene", 15), depth=6, teacher="bm25")
    q = next(q for q in lists.qids if lists.queries[q] == "what about aspirin 3")
    plain = lists.example(q, 8, random.Random(0))
    ex = lists.example(q, 8, random.Random(0), distractors=2)
    assert len(ex.passages) == 8 and sorted(ex.order) == list(range(8)) and plain.foreign == ()
    assert len(ex.foreign) == 2 and set(ex.order[-2:]) == set(ex.foreign)  # labelled below every own candidate
    own = {lists.corpus[d] for d in lists.candidates(q)}
    foreign = [ex.passages[i] for i in ex.foreign]
    assert len(set(foreign)) == 2 and not own & set(foreign) and all(p in lists.corpus.values() for p in foreign)
    assert ex.positives == 1 and ex.passages[ex.order[0]] == "aspirin 3 answer " + "words " * 3
    kept = [ex.passages[i] for i in ex.order[:-2]]  # the own candidates keep their label order
    assert kept == [plain.passages[i] for i in plain.order][:6]
    mixed = shuffled(ex, random.Random(3))
    assert [mixed.passages[i] for i in mixed.foreign] == foreign
    assert [mixed.passages[i] for i in mixed.order] == [ex.passages[i] for i in ex.order]
    assert len(lists.example(q, 3, random.Random(0), distractors=5).foreign) == 2  # one own place always stays


def test_foreign_rank_reads_where_the_scores_put_other_queries_positives():
    from sieve.reranker.train import Encoded, foreign_rank

    enc = Encoded(None, None, None, [], [1, 0, 2, 3, 4], 0, 1, [], (3, 4))
    assert foreign_rank(torch.tensor([0.0, 1.0, 2.0, -1.0, -2.0]), enc) == 0.875  # the bottom two places
    assert foreign_rank(torch.tensor([0.0, 1.0, 2.0, 9.0, 8.0]), enc) == 0.125  # a passage prior: the top two
    assert foreign_rank(torch.zeros(5), Encoded(None, None, None, [], [0, 1, 2, 3, 4], 0, 1)) is None


def test_training_with_distractors_logs_where_they_rank(gguf, tmp_path):
    lists = PairLists(qa_pairs("aspirin", 12) + qa_pairs("gene", 12), depth=5, teacher="bm25")
    cfg = TrainConfig(out=tmp_path / "out", data_root=tmp_path, steps=2, batch_size=2, n_min=6, n_max=6,
                      dtype="float32", max_passage_tokens=16, inline_weight=1.0, distractors=2)
    summary = train_on(fresh_backbone(gguf, tmp_path), cfg, lists, progress=False, save=lambda m: None,
                       inject=inject)
    history = json.loads((cfg.out / "train_log.json").read_text())["history"]
    assert all(0.0 <= h["foreign_rank"] <= 1.0 for h in history) and summary["final_foreign_rank_avg10"] is not None
    assert "2 place(s) per list held by other queries' judged positives" in (cfg.out / "README.md").read_text()
