"""Listwise ranking with the backbone: full (one pass), FIRST (one forward) and sliding-window (baseline).

`Reranker.rank(query, passages, mode, top_k)` -> `RankResult` (passage indices best first, their scores, and
what it cost). Inference only: evaluation lives in eval.py and is never imported here.

- full: the whole list in one prompt (per-passage budget from prompt.py), the answer decoded greedily under
  `PermutationConstraint`, so it is a valid permutation by construction. Decoding is speculative by default
  (speculative.py: the rest drafted in prompt order, checked in one forward; the same answer, fewer forwards);
  `speculative=False` decodes through the backbone's `stream` and logits hook (jump-forward). Scores are
  `n - position` (the order is the output). `top_k`: decoding stops after k ids and reserves room for k only.
- first: FIRST scoring (first.py), one forward; scores are log-probabilities.
- inline: the full prompt in one causal forward, each passage scored at its last token (" yes" minus " no" logits,
  first.py); no answer, no id trie. Scores are logit differences.
- likelihood: query likelihood (likelihood.py, UPR): each passage scored by log p(query | passage) under the
  backbone, in batched teacher-forced forwards; zero-shot. Not one pass: n short sequences instead of one long one.
- sliding: RankGPT's sliding window (window 20, stride 10, back to front), each window a constrained full
  ranking of its passages with the *same per-passage cap as the full prompt would use* for this list, so the two
  strategies see the same text and differ only in how they spend the context. `top_k`: each window decodes only
  the ids that still matter (`window_ids_needed`: the ones carried into the next window, and final places above
  k), so the top k are exactly those of the complete sliding ranking, at a fraction of the decoding.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from sieve.backbone import Backbone
from sieve.backbone.generate import stream

from .first import first_scores, inline_scores, relevance_tokens
from .fusion import fuse_with_input_order
from .likelihood import LikelihoodPrompt, likelihood_scores
from .permutation import IdTokens, PermutationConstraint
from .prompt import RANKGPT, PromptBuilder, PromptTemplate, PromptTooLong
from .speculative import speculative_decode

MODES = ("full", "first", "sliding", "inline", "likelihood")


@dataclass
class RankStats:
    prompt_tokens: int = 0  # tokens run through prefill (all windows for sliding; incl. the id trie for first)
    generated_tokens: int = 0  # tokens of the answers (end tokens included)
    decode_forwards: int = 0  # forwards after the prefill: forced tokens ride along with the token before them
    drafted: int = 0  # speculative decoding: draft tokens proposed
    accepted: int = 0  # speculative decoding: draft tokens the model agreed with
    forward_passes: int = 0  # prefills: 1 for full and first, one per window for sliding
    passage_cap: int = 0  # tokens each passage was allowed
    truncated: int = 0  # passages cut to the cap (counted once per passage)
    seconds: float = 0.0

    @property
    def tokens_processed(self) -> int:
        return self.prompt_tokens + self.generated_tokens


@dataclass
class RankResult:
    order: list[int]  # indices into the caller's passages, most relevant first (top_k of them when given)
    scores: list[float]  # aligned with `order`, higher = more relevant
    mode: str
    stats: RankStats = field(default_factory=RankStats)
    answers: list[str] = field(default_factory=list)  # decoded answer text of each constrained decode
    answer_shapes: list[tuple[int, int]] = field(default_factory=list)  # (ids listed in its prompt, ids asked for)
    fused: bool = False  # order and scores are the mode's fused with the input order (RRF scores)


def sliding_windows(n: int, window: int = 20, stride: int = 10) -> list[tuple[int, int]]:
    """RankGPT's windows over positions [0, n), back to front: [(start, end), ...]."""
    if window < 1 or stride < 1:
        raise ValueError("window and stride must be positive")
    out, end = [], n
    start = n - window
    while True:
        out.append((max(start, 0), end))
        if start <= 0:
            return out
        end -= stride
        start -= stride


LIKELIHOOD_CAPS = ("list", "passage")


class Reranker:
    def __init__(self, backbone: Backbone, *, name: str = "sieve-rank", template: PromptTemplate = RANKGPT,
                 max_passage_tokens: int = 256, max_query_tokens: int = 128, min_passage_tokens: int = 8,
                 window: int = 20, stride: int = 10, jump_forward: bool = True, speculative: bool = True,
                 prefill_mode: str = "causal", mode: str = "full", fuse: bool = False,
                 inline_window: int | None = None, likelihood_cap: str = "list"):
        self.backbone, self.name = backbone, name
        if likelihood_cap not in LIKELIHOOD_CAPS:
            raise ValueError(f"likelihood_cap must be one of {', '.join(LIKELIHOOD_CAPS)}, got {likelihood_cap!r}")
        # likelihood mode reads each passage in its own sequence: "list" cuts passages to the cap a one-pass prompt
        # of the same list gets (every mode reads the same text), "passage" to max_passage_tokens (more text, more
        # compute on long lists)
        self.likelihood_cap = likelihood_cap
        # what rank() does when a call does not say (the model card's advice)
        self.mode, self.fuse = _check_mode(mode), fuse
        if inline_window is not None and inline_window < 1:
            raise ValueError("inline_window must be at least 1 (or None: one prompt)")
        # inline mode scores lists longer than this in consecutive prompts of this many passages (input order),
        # the list sizes the model was trained on; None: every passage in one prompt
        self.inline_window = inline_window
        # attention mode of the full and sliding prompts' prefill: "sparse" is the block-sparse prefill of
        # sieve.kernels (register_sparse_attention first); decoding and FIRST's one forward stay dense
        self.prefill_mode = prefill_mode
        self.jump_forward = jump_forward  # forced tokens ride along with a sampled one (False: one forward each)
        self.speculative = speculative  # draft the rest in prompt order, verify in one forward (speculative.py)
        self.window, self.stride = window, stride
        self.ids = IdTokens.from_tokenizer(backbone.tokenizer, max_id=100)
        self.relevance = relevance_tokens(backbone.tokenizer)
        self.prompts = PromptBuilder(backbone.tokenizer, template, context=backbone.args.max_seq_len, ids=self.ids,
                                     max_passage_tokens=max_passage_tokens, max_query_tokens=max_query_tokens,
                                     min_passage_tokens=min_passage_tokens)

    def rank(self, query: str, passages: list[str], *, mode: str | None = None, top_k: int | None = None,
             fuse: bool | None = None) -> RankResult:
        """Rank `passages` for `query` -> their indices best first (top_k of them) with scores.

        mode: full | first | inline | likelihood | sliding (None: this reranker's default, `self.mode`).
        fuse: combine the mode's order with the input order by reciprocal rank fusion (fusion.py); the passages
        must then come in a first stage's order, best first. Scores are then RRF scores. None: `self.fuse`."""
        mode = self.mode if mode is None else _check_mode(mode)
        fuse = self.fuse if fuse is None else fuse
        if isinstance(passages, str):
            raise TypeError("passages is a list of strings")
        if top_k is not None and top_k < 1:
            raise ValueError("top_k must be at least 1")
        n = len(passages)
        t0 = time.perf_counter()
        if n == 0:
            return RankResult([], [], mode)
        self.ids.digits_of(n, self.backbone.tokenizer)
        p_ids = self.prompts.passage_ids(list(passages))
        stats = RankStats()
        scores: list[float] | None = None  # the score modes' (first, inline, likelihood): every passage scored
        if mode == "sliding":
            result = self._sliding(query, p_ids, top_k, stats)
        elif mode == "likelihood":
            scores = self._likelihood(query, p_ids, stats)
        elif mode == "inline" and self.inline_window and n > self.inline_window:
            scores = self._inline_windows(query, p_ids, stats)
        else:
            reserve = (self.ids.output_length(n, top_k) if mode == "full" else 0 if mode == "inline"
                       else len(self.ids.first_open) + _trie_size(self.ids, n))
            prompt = self.prompts.build(query, p_ids, reserve=reserve)
            stats.passage_cap, stats.truncated = prompt.passage_cap, prompt.truncated
            if mode == "full":
                order, answer = self._decode(prompt.ids, n, top_k, stats)
                result = RankResult(order, [float(n - r) for r in range(len(order))], mode, stats, [answer],
                                    [(n, len(order))])
            else:
                if mode == "inline":
                    scores = inline_scores(self.backbone.model, prompt.ids, prompt.ends, self.relevance).tolist()
                    stats.prompt_tokens += len(prompt.ids)
                else:
                    scores = first_scores(self.backbone.model, prompt.ids, self.ids, n).tolist()
                    stats.prompt_tokens += len(prompt.ids) + len(self.ids.first_open) + _trie_size(self.ids, n)
                stats.forward_passes += 1
        if scores is not None:  # fusion reads the whole order, so top_k cuts after it
            ranked = sorted(range(n), key=lambda i: (-scores[i], i))[: n if fuse else top_k or n]
            result = RankResult(ranked, [scores[i] for i in ranked], mode, stats)
        if fuse:
            order, fused = fuse_with_input_order(result.order, n)
            result.order, result.scores, result.fused = order[: top_k or n], fused[: top_k or n], True
        stats.seconds = time.perf_counter() - t0
        return result

    # ------------------------------------------------------------------------------------------------- parts

    def _likelihood(self, query: str, p_ids: list[list[int]], stats: RankStats) -> list[float]:
        """Query-likelihood scores [n]: passages cut to the per-passage cap a one-pass prompt of this list would
        get (at most `max_passage_tokens`), so every mode reads the same amount of text; with likelihood_cap
        "passage", to `max_passage_tokens`."""
        tok = self.backbone.tokenizer
        prompt = LikelihoodPrompt.build(tok, query, self.prompts.max_query_tokens,
                                        passage_lead=self.prompts.passage_lead)
        cap = self.prompts.max_passage_tokens
        if self.likelihood_cap == "list":
            try:
                cap = self.prompts.build(query, p_ids).passage_cap
            except PromptTooLong:  # more passages than one prompt holds: each sequence is short anyway
                pass
        scores, tokens, forwards = likelihood_scores(self.backbone.model, prompt, [p[:cap] for p in p_ids],
                                                     pad_id=tok.pad_id or 0)
        stats.prompt_tokens += tokens
        stats.forward_passes += forwards
        stats.passage_cap, stats.truncated = cap, sum(len(p) > cap for p in p_ids)
        return scores.tolist()

    def _inline_windows(self, query: str, p_ids: list[list[int]], stats: RankStats) -> list[float]:
        """Inline scores of consecutive groups of `inline_window` passages, one prompt each -> [n] scores."""
        scores: list[float] = []
        caps, w = [], self.inline_window
        for start in range(0, len(p_ids), w):
            prompt = self.prompts.build(query, p_ids[start:start + w], reserve=0)
            scores += inline_scores(self.backbone.model, prompt.ids, prompt.ends, self.relevance).tolist()
            stats.prompt_tokens += len(prompt.ids)
            stats.forward_passes += 1
            stats.truncated += prompt.truncated
            caps.append(prompt.passage_cap)
        stats.passage_cap = min(caps)
        return scores

    def _decode(self, prompt_ids: list[int], n: int, k: int | None, stats: RankStats) -> tuple[list[int], str]:
        """Constrained greedy decoding of one answer -> (0-based order of k ids, answer text)."""
        constraint = PermutationConstraint(self.ids, n, k)
        if self.speculative:
            tokens, spec = speculative_decode(self.backbone.model, prompt_ids, constraint,
                                              prefill_mode=self.prefill_mode)
            stats.decode_forwards += spec.forwards
            stats.drafted += spec.drafted
            stats.accepted += spec.accepted
        else:
            tokens = self._stream(prompt_ids, constraint, stats)
        stats.prompt_tokens += len(prompt_ids)
        stats.generated_tokens += len(tokens)
        stats.forward_passes += 1
        if not constraint.done:
            raise RuntimeError(f"decoding stopped after {len(constraint.emitted)} of {constraint.k} ids")
        text = self.backbone.tokenizer.decode([t for t in tokens if t != self.ids.eos])
        return constraint.order(), text

    def _stream(self, prompt_ids: list[int], constraint: PermutationConstraint, stats: RankStats) -> list[int]:
        """Token-by-token constrained decoding through `backbone.generate.stream` (jump-forward optional)."""
        n, k = constraint.n, constraint.k
        tokens, sampled = [], 0
        for step in stream(self.backbone.model, [prompt_ids], max_new_tokens=self.ids.output_length(n, k),
                           stop_tokens=[self.ids.eos], pad_id=self.backbone.tokenizer.pad_id,
                           logits_processor=constraint if self.jump_forward else constraint.process,
                           prefill_mode=self.prefill_mode):
            tokens.append(int(step.tokens[0]))
            sampled += not step.forced
        stats.decode_forwards += sampled - 1  # the prefill gave the first token's logits
        return tokens

    def _sliding(self, query: str, p_ids: list[list[int]], top_k: int | None, stats: RankStats) -> RankResult:
        n = len(p_ids)
        try:  # the cap the one-pass prompt gets for this list, so both strategies see the same passage text
            cap = self.prompts.build(query, p_ids).passage_cap
        except PromptTooLong:
            cap = None  # too many for one pass: each window gets its own cap
        order = list(range(n))
        answers, shapes, caps = [], [], []
        for start, end in sliding_windows(n, self.window, self.stride):
            need = window_ids_needed(start, end, self.stride, top_k or n)
            if need == 0:
                continue
            window = order[start:end]
            prompt = self.prompts.build(query, [p_ids[i] for i in window], cap=cap)
            caps.append(prompt.passage_cap)
            ranked, answer = self._decode(prompt.ids, len(window), need, stats)
            chosen = set(ranked)
            order[start:end] = [window[i] for i in ranked] + [j for i, j in enumerate(window) if i not in chosen]
            answers.append(answer)
            shapes.append((len(window), need))
        stats.passage_cap = min(caps)
        stats.truncated = sum(len(p) > stats.passage_cap for p in p_ids)
        order = order[: top_k or n]
        return RankResult(order, [float(n - r) for r in range(len(order))], "sliding", stats, answers, shapes)


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    return mode


def window_ids_needed(start: int, end: int, stride: int, k: int) -> int:
    """How many ids the window over positions [start, end) must decode for the final top `k` to be exact: those
    carried into the next window (positions [start, end - stride), re-ranked there as a set) and those whose places
    are final and above k. The rest keep their order; a window with none to decode is skipped."""
    carry = max(0, end - stride - start) if start > 0 else 0
    return max(0, min(end - start, max(carry, k - start)))


def _trie_size(ids: IdTokens, n: int) -> int:
    return len({d[:j] for d in ids.digits_of(n) for j in range(1, len(d) + 1)})
