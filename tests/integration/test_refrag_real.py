"""REFRAG on the real SmolLM2 + all-MiniLM-L6-v2 with the shipped refrag-k16 projector: expand-all is the token
path, the compressed prompt is ~k times shorter, answers stream, index-time encodings equal request-time ones."""

from pathlib import Path

import pytest
import torch
from sieve.backbone import generate
from sieve.refrag import Answerer, EncodedPassage, load_block_encoder, load_refrag
from sieve.refrag.policy import n_expanded

pytestmark = pytest.mark.integration

PASSAGES = [
    "Deadpool 2\nDeadpool 2 is scheduled to be released in the United States on May 18, 2018. A sequel, Deadpool 3, "
    "is in development.",
    "Cyrus Cylinder\nThe Cylinder's text has traditionally been seen by biblical scholars as corroborative evidence "
    "of Cyrus's policy of the repatriation of the Jewish people following their Babylonian captivity.",
]


@pytest.fixture(scope="module")
def refrag(smollm2, sieve_home):
    return load_refrag("refrag-k16", home=sieve_home, backbone=smollm2)


def test_expand_all_is_the_token_path_and_compression_shortens_the_prompt(refrag):
    answerer = Answerer(refrag)
    full = answerer.stream("when is the next deadpool movie being released", PASSAGES, expansion=1.0,
                           max_new_tokens=12)
    text = "".join(full)
    layout = refrag.qa_layout("when is the next deadpool movie being released", refrag.encode(PASSAGES))
    want = generate(refrag.model, [layout.full_ids()], max_new_tokens=12, stop_tokens=refrag.tokenizer.eos_ids)[0]
    assert full.token_ids == want and text == refrag.tokenizer.decode(want)
    comp = answerer.stream("when is the next deadpool movie being released", PASSAGES, expansion=0.0,
                           max_new_tokens=8)
    pieces = list(comp)
    assert comp.stats.generated_tokens >= 1 and "".join(pieces) == comp.text
    block_tokens = sum(len(p.token_ids) for p in refrag.encode(PASSAGES))
    assert comp.stats.prompt_positions == comp.stats.full_prompt_tokens - block_tokens + comp.stats.blocks
    assert comp.passages == [0, 1]
    default = answerer.stream("when is the next deadpool movie being released", PASSAGES, max_new_tokens=2)
    "".join(default)  # the shipped default (refrag.json): a quarter of the blocks by similarity
    assert default.stats.expanded == n_expanded(comp.stats.blocks, 0.25) > 0
    assert comp.stats.prompt_positions < default.stats.prompt_positions < full.stats.prompt_positions


def test_index_time_encodings_match_and_survive_storage(refrag, sieve_home):
    indexer = load_block_encoder(home=sieve_home)
    stored = [e.to_record() for e in indexer.encode_blocks(PASSAGES, 16)]
    restored = [EncodedPassage.from_record(r, t, refrag.tokenizer) for r, t in zip(stored, PASSAGES)]
    fresh = refrag.encode(PASSAGES, 16)
    for a, b in zip(restored, fresh):
        assert a.spans == b.spans and a.encoder == b.encoder
        torch.testing.assert_close(a.vectors, b.vectors, atol=2e-3, rtol=0)
    q = "who wrote the first declaration of human rights"
    with torch.no_grad():  # float16 storage moves the decoder input by float16 rounding only (through the
        # projector: about 1% of the token embeddings' RMS of 0.136 at most; another block's vector is ~0.1 away)
        a, b = refrag.embed(refrag.qa_layout(q, restored)), refrag.embed(refrag.qa_layout(q, fresh))
    torch.testing.assert_close(a, b, atol=2e-3, rtol=1e-3)
    assert "".join(Answerer(refrag).stream(q, restored, max_new_tokens=6)).strip()


def test_training_resumes_mid_stage_and_skips_finished_stages(tmp_path, sieve_home, smollm2_path, monkeypatch):
    import json

    from sieve.refrag import train as train_mod
    from sieve.refrag.model_dir import RefragConfig, resolve_refrag

    from sieve.settings import Settings

    cfg = train_mod.TrainConfig(out=tmp_path / "m", data_root=Settings().data_path(), stages=["recon", "cpt"],
                                recon_steps=3, cpt_steps=1, batch_size=1, recon_max_blocks=2, save_every=2,
                                val_windows=0, projector_hidden=64, cpt_context_tokens=32, cpt_target_tokens=8)
    real_loss, calls = train_mod.lm_loss, []

    def crash_on_third(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed during recon step 3, after the checkpoint at step 2
        return real_loss(*a, **kw)

    monkeypatch.setattr(train_mod, "lm_loss", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        train_mod.train(cfg, home=sieve_home, device="cpu", progress=False)
    assert (cfg.out / "checkpoint.pt").is_file() and not (cfg.out / "refrag.json").exists()
    monkeypatch.setattr(train_mod, "lm_loss", real_loss)
    summary = train_mod.train(cfg, home=sieve_home, device="cpu", progress=False)
    history = json.loads((cfg.out / "train_log.json").read_text())["history"]
    assert [(h["stage"], h["step"]) for h in history] == [("recon", 1), ("recon", 2), ("recon", 3), ("cpt", 1)]
    assert summary["stages"] == ["recon", "cpt"]
    assert RefragConfig.load(resolve_refrag(str(cfg.out))).projector_hidden == 64


@pytest.mark.parametrize("name,k,policy", [("refrag-k8", 8, False), ("refrag-k32", 32, True)])
def test_shipped_models_use_their_own_block_size(smollm2, sieve_home, name, k, policy):
    """refrag-k8 / -k32: their own projector and LoRA, blocks of k by default; expanding every block is the token
    path; the learned policy only where the folder ships one."""
    import math

    from sieve.refrag.model_dir import shipped

    assert {name, "refrag-k16"} <= set(shipped())
    r = load_refrag(name, home=sieve_home, backbone=smollm2)
    assert r.k == k and (r.scorer is not None) == policy
    q = "when is the next deadpool movie being released"
    comp = Answerer(r).stream(q, PASSAGES, expansion=0.0, max_new_tokens=4)
    "".join(comp)
    encoded = r.encode(PASSAGES)
    assert comp.stats.blocks == sum(math.ceil(len(p.token_ids) / k) for p in encoded)
    full = Answerer(r).stream(q, PASSAGES, expansion=1.0, max_new_tokens=8)
    "".join(full)
    want = generate(r.model, [r.qa_layout(q, encoded).full_ids()], max_new_tokens=8,
                    stop_tokens=r.tokenizer.eos_ids)[0]
    assert full.token_ids == want
    if policy:
        learned = Answerer(r).stream(q, PASSAGES, expansion=0.5, policy="learned", max_new_tokens=2)
        "".join(learned)  # half the blocks chosen by the learned policy enter as tokens
        assert learned.stats.prompt_positions > comp.stats.prompt_positions
    else:
        with pytest.raises(ValueError, match="learned"):
            Answerer(r).stream(q, PASSAGES, expansion=0.5, policy="learned")


def test_init_from_a_shipped_model_and_a_tuned_encoder_ship_with_the_folder(tmp_path, sieve_home, smollm2):
    """--init refrag-k16: zero steps give back its projector, LoRA and policy; --tune-encoder saves the changed
    encoder in the folder, which then loads with its own fingerprint, and workers precomputing for that model
    (load_block_encoder(refrag_model=...)) make the vectors the model answers with."""
    from safetensors.torch import load_file
    from sieve.refrag import train as train_mod
    from sieve.refrag.model_dir import ADAPTER, POLICY, PROJECTOR, RefragConfig, resolve_refrag

    from sieve.settings import Settings

    shipped = resolve_refrag("refrag-k16")
    common = dict(data_root=Settings().data_path(), batch_size=1, recon_max_blocks=1, val_windows=0,
                  cpt_context_tokens=32, cpt_target_tokens=8, init=Path("refrag-k16"))
    copy = train_mod.TrainConfig(out=tmp_path / "copy", stages=["recon"], recon_steps=0, **common)
    train_mod.train(copy, home=sieve_home, device="cpu", progress=False)
    for f in (PROJECTOR, ADAPTER, POLICY):
        a, b = load_file(str(copy.out / f)), load_file(str(shipped / f))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
    assert RefragConfig.load(copy.out).encoder == "all-minilm-l6-v2" and not (copy.out / "encoder").exists()

    tuned = train_mod.TrainConfig(out=tmp_path / "tuned", stages=["recon", "cpt"], recon_steps=2, cpt_steps=1,
                                  cpt_lora=True, tune_encoder=True, encoder_lr=1e-3, **common)
    train_mod.train(tuned, home=sieve_home, device="cpu", progress=False)
    assert RefragConfig.load(tuned.out).encoder == "encoder"
    stock, own = load_refrag("refrag-k16", home=sieve_home, backbone=smollm2), \
        load_refrag(tuned.out, home=sieve_home, backbone=smollm2)
    assert own.blocks.fingerprint != stock.blocks.fingerprint and own.blocks.fingerprint.startswith("tuned/encoder@")
    a, b = stock.encode(PASSAGES)[0].vectors, own.encode(PASSAGES)[0].vectors
    assert a.shape == b.shape and not torch.allclose(a, b, atol=1e-4)  # the encoder moved
    indexer = load_block_encoder(home=sieve_home, refrag_model=str(tuned.out))
    assert indexer.fingerprint == own.blocks.fingerprint
    torch.testing.assert_close(indexer.encode_blocks(PASSAGES, 16)[0].vectors, b)
    assert load_block_encoder(home=sieve_home, refrag_model="refrag-k16").fingerprint == stock.blocks.fingerprint


def test_streams_decoding_together_answer_as_one_at_a_time(refrag):
    """The service's default (SIEVE_ANSWER_BATCH=8): concurrent answers share decoding steps on the real model and
    give the greedy tokens each gives alone, float32, CPU."""
    import threading

    from sieve.refrag import BatchedDecoder

    questions = [("when is the next deadpool movie being released", PASSAGES),
                 ("what did the cyrus cylinder say", PASSAGES[::-1]), ("who is deadpool", PASSAGES[:1]),
                 ("what happened after the babylonian captivity", PASSAGES[1:])]
    want = []
    for q, passages in questions:
        s = Answerer(refrag).stream(q, passages, max_new_tokens=12)
        "".join(s)
        want.append((s.token_ids, s.stats.stopped))
    decoder = BatchedDecoder(refrag.model, refrag.tokenizer.eos_ids, max_rows=8)
    batched = Answerer(refrag, decoder=decoder)
    got: list = [None] * len(questions)
    start = threading.Barrier(len(questions))

    def ask(i):
        start.wait()
        s = batched.stream(*questions[i], max_new_tokens=12)
        "".join(s)
        got[i] = (s.token_ids, s.stats.stopped)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(questions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    decoder.close()
    assert got == want
    assert decoder.widest >= 2
