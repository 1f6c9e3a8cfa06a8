"""Embedders on real weights: MiniLM through Sieve's API == sentence-transformers; a tiny training run on the real
SmolLM2 trains, checkpoints, resumes and loads back through `load_embedder`."""

import json

import numpy as np
import pytest
from sieve.embedder import load_embedder

from sieve.registry import resolve_embedder
from sieve.settings import Settings

pytestmark = pytest.mark.integration


def test_minilm_through_sieve_equals_sentence_transformers(sieve_home):
    from sentence_transformers import SentenceTransformer

    folder = resolve_embedder("all-minilm-l6-v2")
    ours = load_embedder(folder, home=sieve_home, device="cpu", dtype="float32")
    texts = ["hello world", "Sieve ranks a whole candidate list in one pass. " * 3, "", "x" * 3000]
    ref = SentenceTransformer(str(folder), device="cpu").encode(texts, normalize_embeddings=True)
    np.testing.assert_allclose(ours.encode(texts), ref, atol=1e-5)
    assert ours.dim == 384 and ours.max_length == 256


@pytest.fixture(scope="module")
def data_root():
    root = Settings().data_path()
    if not (root / "retrieval" / "scifact").is_dir():
        pytest.skip(f"shared data not found at {root} (set SIEVE_DATA_DIR)")
    return root


def test_training_runs_resumes_and_loads(tmp_path, sieve_home, data_root, smollm2):
    from sieve.embedder.train import TrainConfig, calibrate_and_save, train

    cfg = TrainConfig(out=tmp_path / "emb", data_root=data_root, steps=1, batch_size=4, max_doc_len=24,
                      max_query_len=24, save_every=1, sources={"scifact-train": 1.0}, dtype="float32")
    first = train(cfg, home=sieve_home, device="cpu", progress=False)
    assert first["steps"] == 1 and (cfg.out / "checkpoint.pt").is_file()
    cfg.steps = 2  # resume: only the second step runs
    train(cfg, home=sieve_home, device="cpu", progress=False)
    history = json.loads((cfg.out / "train_log.json").read_text())["history"]
    assert [h["step"] for h in history] == [1, 2] and all(np.isfinite(h["loss"]) for h in history)
    calibrate_and_save(cfg.out, data_root, home=sieve_home, n=8)
    emb = load_embedder(cfg.out, home=sieve_home, device="cpu", dtype="float32")
    vecs = emb.encode_queries(["aspirin reduces the risk of heart attack", "a claim"], precision="int8")
    assert vecs.shape == (2, 576) and vecs.dtype == np.int8
    float_vecs = emb.encode_documents(["some abstract text", "another"])
    np.testing.assert_allclose(np.linalg.norm(float_vecs, axis=1), 1.0, atol=1e-5)


def test_shipped_sieve_embed_loads_ranks_and_quantizes(sieve_home, smollm2):
    emb = load_embedder(resolve_embedder("sieve-embed"), home=sieve_home, device="cpu", dtype="float32")
    assert emb.dim == 576 and emb.query_instruction and emb.calibration is not None
    docs = ["Aspirin lowers the risk of myocardial infarction in men over 50.",
            "The Eiffel tower was completed in 1889 for the World's Fair in Paris.",
            "Python is a programming language with dynamic typing."]
    q = emb.encode_queries(["Does aspirin prevent heart attacks?"])
    d = emb.encode_documents(docs)
    assert int(np.argmax(d @ q[0])) == 0
    codes = emb.encode_documents(docs, precision="int8")
    from sieve.embedder import rescore

    np.testing.assert_allclose(rescore(q, codes, "int8", ranges=emb.int8_ranges()), q @ d.T, atol=0.03)
