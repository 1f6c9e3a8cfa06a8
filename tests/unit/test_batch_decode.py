"""Continuous batching (`backbone/batch_decode.py`): a row decoded beside others, joining and leaving at any step,
gets the logits it gets decoding alone."""

from __future__ import annotations

import pytest
import torch
from sieve.backbone.batch_decode import DecodeBatch
from sieve.backbone.generate import DecodeCursor, prefill

from .helpers import random_ids, tiny_model


def _prefill_kv(model, ids: torch.Tensor):
    """ids [1, t] -> (per-layer KV of the prompt, its last logits [1, V]), through the model's own cache."""
    model.setup_caches(1, ids.shape[1] + 8)
    logits = prefill(model, ids, None)
    return [(k.clone(), v.clone()) for k, v in model.cache_tensors()], logits


def _alone(model, ids: torch.Tensor, forced: list[int]) -> list[torch.Tensor]:
    """The reference: one sequence, the plain cursor, fed `forced` tokens -> logits after the prompt and each."""
    cursor = DecodeCursor.start(model, torch.ones_like(ids), ids.shape[1] + len(forced) + 1)
    out = [prefill(model, ids, None)[0]]
    for tok in forced:
        out.append(cursor.step(torch.tensor([tok]))[0])
    return out


@torch.inference_mode()
def test_rows_joining_and_leaving_get_the_logits_they_get_alone():
    model = tiny_model()
    prompts = {"a": random_ids(1, 5, seed=1), "b": random_ids(1, 17, seed=2), "c": random_ids(1, 9, seed=3)}
    forced = {name: random_ids(1, 12, seed=10 + i)[0].tolist() for i, name in enumerate(prompts)}
    want = {name: _alone(model, ids, forced[name]) for name, ids in prompts.items()}
    joins = {0: ["a"], 3: ["b"], 5: ["c"]}  # at step s (of the batch), these join; each leaves after 12 tokens
    got: dict[str, list[torch.Tensor]] = {name: [] for name in prompts}
    fed = {name: 0 for name in prompts}
    batch = DecodeBatch(model, pad=16)
    for s in range(40):
        for name in joins.get(s, []):
            kv, logits = _prefill_kv(model, prompts[name])
            batch.join(name, kv, prompts[name].shape[1], room=len(forced[name]))
            got[name].append(logits[0])
        if not len(batch):
            break
        tokens = torch.tensor([forced[k][fed[k]] for k in batch.keys])
        logits = batch.step(tokens)
        for row, k in enumerate(list(batch.keys)):
            fed[k] += 1
            got[k].append(logits[row])
        batch.leave([k for k in batch.keys if fed[k] == len(forced[k])])
    for name in prompts:
        assert len(got[name]) == len(want[name]) == 13
        for step, (g, w) in enumerate(zip(got[name], want[name])):
            torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4, msg=f"{name} at step {step}")
    assert len(batch) == 0 and batch.slot == 0


@torch.inference_mode()
def test_the_cache_is_as_wide_as_the_rows_need():
    model = tiny_model()
    batch = DecodeBatch(model, pad=16)
    kv, _ = _prefill_kv(model, random_ids(1, 20, seed=1))
    batch.join("long", kv, 20, room=5)
    assert batch.slot == 20 and batch.key_mask.shape == (1, 32)  # 20 + 5, rounded up to 16s
    kv, _ = _prefill_kv(model, random_ids(1, 3, seed=2))
    batch.join("short", kv, 3, room=40)
    assert batch.slot == 20 and batch.key_mask.shape == (2, 64)  # 20 + 40 -> 64
    assert batch.key_mask.sum(-1).tolist() == [20, 3]  # right-aligned, ending before the shared slot
    assert batch.key_mask[1, 17:20].all() and not batch.key_mask[1, :17].any()
    batch.leave(["long"])
    assert batch.keys == ["short"] and batch.slot == 3 and batch.key_mask.shape == (1, 48)


@torch.inference_mode()
def test_bad_joins_and_steps_are_refused():
    model = tiny_model()
    batch = DecodeBatch(model)
    kv, _ = _prefill_kv(model, random_ids(1, 4, seed=1))
    batch.join("a", kv, 4, room=1)
    with pytest.raises(ValueError, match="already decoding"):
        batch.join("a", kv, 4, room=1)
    with pytest.raises(ValueError, match="context"):
        batch.join("b", kv, 4, room=model.args.max_seq_len)
    with pytest.raises(ValueError, match="rows"):
        batch.step(torch.tensor([1, 2]))
    batch.step(torch.tensor([1]))
    with pytest.raises(ValueError, match="room"):
        batch.step(torch.tensor([1]))
