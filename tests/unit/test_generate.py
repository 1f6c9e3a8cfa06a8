"""Generation: greedy/sampling, batching with per-row stop, logits processors, streaming text."""

import pytest
import torch
from sieve.backbone import generate, sample, stream
from sieve.backbone.generate import left_pad

from .helpers import random_ids, tiny_model


def _greedy_by_recompute(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("preset", ["tiny", "tiny-qwen2"])
def test_cached_greedy_equals_recomputing_everything(preset):
    model = tiny_model(preset)
    prompt = random_ids(1, 9)[0].tolist()
    assert generate(model, [prompt], max_new_tokens=12) == [_greedy_by_recompute(model, prompt, 12)]


def test_batched_prompts_of_different_lengths_equal_alone():
    model = tiny_model()
    prompts = [random_ids(1, n, seed=n)[0].tolist() for n in (3, 17, 9, 1)]
    batched = generate(model, prompts, max_new_tokens=10, pad_id=0)
    alone = [generate(model, [p], max_new_tokens=10)[0] for p in prompts]
    assert batched == alone


def test_each_row_stops_on_its_own_stop_token():
    model = tiny_model()
    prompts = [random_ids(1, 6, seed=s)[0].tolist() for s in (4, 2)]
    free = generate(model, prompts, max_new_tokens=8)
    stop = free[0][2]  # row 0's third token; row 1 never emits it
    assert stop not in free[0][:2] and stop not in free[1]
    steps = list(stream(model, prompts, max_new_tokens=8, stop_tokens=[stop], pad_id=0))
    assert generate(model, prompts, max_new_tokens=8, stop_tokens=[stop], pad_id=0) == [free[0][:2], free[1]]
    assert len(steps) == 8  # row 1 runs to the limit
    assert steps[2].active[0] and steps[2].finished[0] and int(steps[2].tokens[0]) == stop
    assert all(not s.active[0] and s.finished[0] for s in steps[3:])  # row 0 emits nothing after its stop
    assert all(s.active[1] and not s.finished[1] for s in steps)


def test_loop_ends_when_all_rows_stop():
    model = tiny_model()
    prompt = random_ids(1, 5)[0].tolist()
    first = generate(model, [prompt], max_new_tokens=1)[0][0]
    steps = list(stream(model, [prompt, prompt], max_new_tokens=50, stop_tokens=[first]))
    assert len(steps) == 1 and steps[0].finished.all()


def test_logits_processor_constrains_and_sees_generated_tokens():
    model = tiny_model()
    seen = []
    allowed = [11, 22, 33]

    def only_unused_allowed(generated, logits):
        seen.append(generated.clone())
        mask = torch.full_like(logits, float("-inf"))
        for row in range(logits.shape[0]):
            free = [a for a in allowed if a not in generated[row].tolist()]
            mask[row, free] = 0
        return logits + mask

    out = generate(model, [random_ids(1, 4)[0].tolist()] * 2, max_new_tokens=3, logits_processor=only_unused_allowed)
    for row in out:
        assert sorted(row) == allowed  # a permutation of the allowed ids: every one, none repeated
    assert [s.shape[1] for s in seen] == [0, 1, 2]


def test_cursor_extend_equals_one_step_per_token():
    from sieve.backbone.generate import DecodeCursor, prefill

    model = tiny_model()
    prompts = [random_ids(1, n, seed=n)[0].tolist() for n in (7, 3)]  # left-padded rows: own positions
    ids, mask = left_pad(prompts, 0)
    chunk = random_ids(2, 4, seed=9)
    runs = []
    for extend in (False, True):
        cursor = DecodeCursor.start(model, mask, 32)
        prefill(model, ids, mask, "causal")
        if extend:
            logits = cursor.extend(chunk)
        else:
            for j in range(chunk.shape[1]):
                logits = cursor.step(chunk[:, j])
        runs.append((logits, cursor.step(chunk[:, 0]), cursor.slot, cursor.positions.tolist()))
    (a, a_next, a_slot, a_pos), (b, b_next, b_slot, b_pos) = runs
    torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b_next, a_next, atol=1e-4, rtol=1e-4)  # the cache holds the same keys after both
    assert (a_slot, a_pos) == (b_slot, b_pos) == (ids.shape[1] + 5, [12, 8])


class _Pattern:
    """Allow only `want[i]` at step i; `forced` also hands them over as forced tokens (jump-forward)."""

    def __init__(self, want, forced):
        self.want, self.seen = want, 0
        if forced:
            self.forced_tokens = self._forced

    def __call__(self, generated, logits):
        self.seen = generated.shape[1]
        out = torch.full_like(logits, float("-inf"))
        choices = self.want[self.seen]
        out[:, choices] = logits[:, choices]
        return out

    def _forced(self, generated):
        out = []
        i = generated.shape[1]
        while i < len(self.want) and len(self.want[i]) == 1:
            out.append(self.want[i][0])
            i += 1
        return out


def test_jump_forward_gives_the_stepwise_tokens_with_fewer_forwards(monkeypatch):
    from sieve.backbone.generate import DecodeCursor

    model = tiny_model()
    prompt = random_ids(1, 6)[0].tolist()
    # choices of 3 tokens, then 1-3 forced tokens, like an id then its separator; ends on a forced stop token
    want = [[5, 9, 40], [7], [8], [12, 3, 50], [7], [60, 61], [7], [8], [9], [2]]
    calls = {"step": 0, "extend": 0}
    for name in calls:
        original = getattr(DecodeCursor, name)

        def counted(self, tokens, _name=name, _original=original):
            calls[_name] += 1
            return _original(self, tokens)

        monkeypatch.setattr(DecodeCursor, name, counted)
    runs = {}
    for forced in (False, True):
        calls.update(step=0, extend=0)
        steps = list(stream(model, [prompt], max_new_tokens=20, stop_tokens=[2],
                            logits_processor=_Pattern(want, forced)))
        runs[forced] = ([int(s.tokens[0]) for s in steps], [s.forced for s in steps], dict(calls))
    (plain, plain_forced, plain_calls), (jump, jump_forced, jump_calls) = runs[False], runs[True]
    assert jump == plain and len(plain) == len(want) and plain[-1] == 2
    assert not any(plain_forced) and jump_forced == [len(w) == 1 for w in want]
    assert plain_calls == {"step": len(want) - 1, "extend": 0}
    assert jump_calls == {"step": 0, "extend": 2}  # one forward per real choice but the last (then all is forced)
    # the budget counts forced tokens too
    short = list(stream(model, [prompt], max_new_tokens=2, logits_processor=_Pattern(want, True)))
    assert len(short) == 2


def test_sampling_options():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]] * 4)
    assert sample(logits).tolist() == [1, 1, 1, 1]
    g = torch.Generator().manual_seed(0)
    assert sample(logits, temperature=1.0, top_k=1, generator=g).tolist() == [1, 1, 1, 1]
    assert sample(logits, temperature=1.0, top_p=0.01, generator=g).tolist() == [1, 1, 1, 1]
    big = logits.repeat(500, 1)
    draws = sample(big, temperature=1.0, top_k=2, generator=g)
    assert set(draws.tolist()) == {1, 3}  # top-2 only, and both appear
    draws = sample(big, temperature=1.0, top_p=0.9, generator=g)
    assert set(draws.tolist()) <= {1, 2, 3} and 0 not in draws.tolist()
    a = sample(big, temperature=0.7, generator=torch.Generator().manual_seed(5))
    b = sample(big, temperature=0.7, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_seeded_sampling_generation_is_reproducible():
    model = tiny_model()
    prompt = [random_ids(1, 5)[0].tolist()]
    runs = [generate(model, prompt, max_new_tokens=12, temperature=1.0,
                     generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    assert runs[0] == runs[1]


def test_left_pad_and_prompt_validation():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert left_pad([[1, 2], [3, 4]], 0)[1] is None
    model = tiny_model()
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="context"):
        generate(model, [[1] * 256], max_new_tokens=2)
    # a prompt near the limit gets the room that is left, not an error
    assert len(generate(model, [[1] * 250], max_new_tokens=20)[0]) == 6
    from sieve.backbone.generate import DecodeCursor

    with pytest.raises(ValueError, match="256-token context"):  # a cursor refuses a prompt the cache cannot hold
        DecodeCursor.start(model, torch.ones((1, 256), dtype=torch.long), 260)


def _plain_greedy(model, prompts, n, pad_id=0):
    """Greedy decoding through the general forward (masks and contexts built per call): the reference path."""
    from sieve.backbone.generate import decode_one_token, prefill

    ids, mask = left_pad(prompts, pad_id)
    b, t = ids.shape
    model.setup_caches(b, t + n)
    full = torch.ones((b, t + n), dtype=torch.long) if mask is None else torch.cat(
        [mask, torch.ones((b, n), dtype=torch.long)], dim=1)
    with torch.inference_mode():
        logits = prefill(model, ids, None if mask is None else mask)
        out = []
        for i in range(n):
            token = logits.argmax(-1)
            out.append(token)
            logits = decode_one_token(model, token, None if mask is None else full[:, : t + i + 1], t + i)
    return torch.stack(out, 1).tolist()


@pytest.mark.parametrize("preset", ["tiny", "tiny-qwen2"])
def test_static_decode_step_gives_the_plain_paths_tokens_and_logits(preset):
    model = tiny_model(preset)
    prompts = [random_ids(1, n, seed=n)[0].tolist() for n in (5, 13, 1)]
    assert generate(model, prompts, max_new_tokens=9) == _plain_greedy(model, prompts, 9)
    # one step, both ways, on a left-padded batch: same logits
    ids, mask = left_pad(prompts, 0)
    b, t = ids.shape
    with torch.inference_mode():
        model.setup_caches(b, 32)
        from sieve.backbone.generate import decode_one_token, prefill

        prefill(model, ids, mask)
        token = torch.tensor([7, 8, 9])
        full = torch.cat([mask, torch.ones((b, 1), dtype=torch.long)], 1)
        want = decode_one_token(model, token, full, t)
        key_mask = torch.zeros((b, 32), dtype=torch.bool)
        key_mask[:, : t + 1] = full.bool()
        got = model.decode_step(token, mask.sum(-1), torch.tensor([t]), key_mask)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_quantized_head_rescores_its_best_candidates_exactly():
    from sieve.backbone.quant import EXACT_TOPK, quantize

    model = tiny_model()
    emb = model.tok_embeddings.weight.clone()
    quantize(model, "int8")
    assert model.exact_topk == EXACT_TOPK
    h = torch.randn(3, model.args.dim)
    logits = model.head(h)
    top = logits.topk(EXACT_TOPK, -1).indices
    torch.testing.assert_close(logits.gather(-1, top), (h @ emb.T).gather(-1, top), atol=1e-5, rtol=1e-5)
    rest = torch.ones_like(logits, dtype=torch.bool).scatter(-1, top, False)
    assert torch.allclose(logits[rest], model.output(h).float()[rest])  # the others stay the int8 head's


@pytest.mark.parametrize("backend", ["aot", "inductor"])
def test_compiled_decode_gives_the_eager_tokens(backend, tmp_path):
    from sieve.backbone.generate import compile_decode
    from sieve.backbone.quant import quantize

    model = tiny_model()
    quantize(model, "int8")
    prompts = [random_ids(1, n, seed=n)[0].tolist() for n in (4, 11)]
    eager = generate(model, prompts, max_new_tokens=8)
    want = [[5, 9, 40], [7], [8], [12, 3, 50], [60, 61], [7], [9], [3, 4]]  # choices and forced tokens
    eager_jump = generate(model, prompts[:1], max_new_tokens=8, logits_processor=_Pattern(want, True))
    compile_decode(model, backend=backend, cache_dir=tmp_path)
    assert model.decode_backend == backend
    assert generate(model, prompts, max_new_tokens=8) == eager
    assert generate(model, prompts[:1], max_new_tokens=8) == eager[:1]  # another batch size: recompiles, same tokens
    # compiled single steps and eager multi-token extends share one cache
    assert generate(model, prompts[:1], max_new_tokens=8, logits_processor=_Pattern(want, True)) == eager_jump


def test_aot_decode_packages_are_reused_and_keyed_by_the_weights(tmp_path):
    from sieve.backbone.aot import AotDecodeStep
    from sieve.backbone.generate import compile_decode

    model = tiny_model()
    prompt = [random_ids(1, 6)[0].tolist()]
    eager = generate(model, prompt, max_new_tokens=5)
    step = compile_decode(model, backend="aot", cache_dir=tmp_path)
    assert generate(model, prompt, max_new_tokens=5) == eager
    assert len(step.compiled) == 1 and step.compiled[0].exists()
    # a new process (a new step object) on the same weights loads the package instead of compiling
    again = tiny_model()
    step2 = compile_decode(again, backend="aot", cache_dir=tmp_path)
    assert generate(again, prompt, max_new_tokens=5) == eager
    assert step2.compiled == [] and step2.package_path(1, 256) == step.compiled[0]
    # other weights: another package (the weights are compiled into the library)
    other = tiny_model()
    with torch.no_grad():
        other.layers[0].feed_forward.w2.weight.mul_(-1)
    assert AotDecodeStep(other, tmp_path).package_path(1, 256) != step.package_path(1, 256)
    # the step runs on a cache of exactly its shape; anything else is refused with the fix named
    model.clear_caches()
    model.setup_caches(2, 128)
    with pytest.raises(ValueError, match="exact=True"):
        step(torch.tensor([5]), torch.tensor([0]), torch.tensor([0]), torch.ones((1, 256), dtype=torch.bool))
