"""Passage ids as token sequences, and constrained decoding that can only emit a valid permutation.

Output format: `[a] > [b] > ... > [z]<eos>` (RankGPT / rank_llm). Each id is a *fixed token sequence*: its
opener (`[` for the first id, ` >` ` [` after that, as the tokenizer writes them in context), the digits of the
number as the tokenizer splits them, then `]`. SmolLM2's tokenizer splits every digit into its own token
(`[12]` -> `[` `1` `2` `]`, ` > [7]` -> `Ġ>` `Ġ[` `7` `]`), so ids 1..100 take 1-3 digit tokens. The
sequences are read from the tokenizer itself and checked (`IdTokens.from_tokenizer`), so another tokenizer that
merges digits (Llama-3, Qwen) also works as long as `[i]` tokenizes the same alone and after ` > `.

The digits of all ids form a trie. `PermutationConstraint` walks it with the tokens emitted so far and allows only
(a) the forced format tokens, (b) digits that lead to an id not yet emitted, (c) `]` on a node that is an id not yet
emitted, (d) the end token once exactly `k` ids are out. Every other logit is -inf and the allowed ones are made
finite, so greedy, sampled, random or adversarial logits all give a valid permutation: no repeats, no unknown ids,
none missing. No post-hoc repair exists or is needed; `parse_permutation` only measures *unconstrained* output.
Where only one token is allowed, `forced_tokens` hands it to the decoding loop (jump-forward decoding), which runs
it with the token before it in one forward: about 2 forwards per id instead of 5 (`[`/` >` ` [`, digits, `]`).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field

import torch


class UnsupportedTokenizer(ValueError):
    """The tokenizer does not write `[i]` as one fixed token sequence per id."""


@dataclass
class TrieNode:
    id: int | None = None  # 1-based passage id ending here (then `]` may follow), or None
    children: dict[int, TrieNode] = field(default_factory=dict)
    depth: int = 0
    ids_below: list[int] = field(default_factory=list)  # every id in this subtree (incl. this node's)


@dataclass(frozen=True)
class IdTokens:
    """The token sequences of the output format, read from a tokenizer."""

    first_open: tuple[int, ...]  # before the first id: `[`
    separator: tuple[int, ...]  # between ids: ` >` ` [`
    close: int  # `]`
    eos: int  # ends the answer
    # "12" -> tokens of the number 12 in context (read and checked per id on first use)
    digit_tokens: dict[str, tuple[int, ...]] = field(repr=False, compare=False)

    @classmethod
    def from_tokenizer(cls, tokenizer, max_id: int = 20) -> IdTokens:
        enc = tokenizer.encode
        if not tokenizer.eos_ids:
            raise UnsupportedTokenizer("the tokenizer has no end token to stop the ranking with")
        first = enc("[1]")
        two = enc("[1] > [2]")
        one_digits = enc("1")
        if len(first) < 3 or first[-1] != two[len(first) - 1] or two[: len(first)] != first:
            raise UnsupportedTokenizer(f"'[1] > [2]' tokenizes as {two}, which does not start with '[1]' = {first}")
        close = first[-1]
        i = _find(first, one_digits)
        if i is None or first[i + len(one_digits):] != [close]:
            raise UnsupportedTokenizer(f"'[1]' = {first} does not contain the digits of '1' = {one_digits} before ']'")
        first_open = tuple(first[:i])
        rest = two[len(first):]
        j = _find(rest, enc("2"))
        if j is None or rest[-1] != close:
            raise UnsupportedTokenizer(f"' > [2]' tokenizes as {rest}: no '2' digits followed by ']'")
        out = cls(first_open, tuple(rest[:j]), close, int(tokenizer.eos_ids[0]), {})
        out.digits_of(max_id, tokenizer)  # check the tokenizer for every id up to max_id now
        return out

    def digits_of(self, n: int, tokenizer=None) -> list[tuple[int, ...]]:
        """Token sequences of ids 1..n (index 0 is id 1); read and checked once per id, then cached."""
        for i in range(1, n + 1):
            key = str(i)
            if key in self.digit_tokens:
                continue
            if tokenizer is None:
                raise ValueError(f"id {i} was not prepared; build IdTokens with max_id >= {n}")
            alone = tokenizer.encode(f"[{i}]")
            after = tokenizer.encode(f"[1] > [{i}]")
            head = [*self.first_open, *self.digit_tokens.get("1", alone[len(self.first_open):-1]), self.close,
                    *self.separator]
            digits = tuple(alone[len(self.first_open):-1])
            if (tuple(alone[: len(self.first_open)]) != self.first_open or alone[-1] != self.close
                    or after != [*head, *digits, self.close] or not digits):
                raise UnsupportedTokenizer(f"id {i}: '[{i}]' = {alone} and '[1] > [{i}]' = {after} do not share one "
                                           "token sequence for the number")
            self.digit_tokens[key] = digits
        return [self.digit_tokens[str(i)] for i in range(1, n + 1)]

    def output_ids(self, order: list[int]) -> list[int]:
        """Tokens of the answer `[a] > [b] ...<eos>` for a 0-based order (what constrained decoding emits)."""
        digits = [self.digit_tokens[str(i + 1)] for i in order]
        out: list[int] = []
        for k, d in enumerate(digits):
            out += [*(self.first_open if k == 0 else self.separator), *d, self.close]
        return [*out, self.eos]

    def output_length(self, n: int, k: int | None = None) -> int:
        """Exact number of tokens (end token included) of an answer listing `k` of `n` ids, at its longest."""
        k = n if k is None else min(k, n)
        lengths = sorted((len(d) for d in self.digits_of(n)), reverse=True)[:k]
        if k == 0:
            return 1
        return sum(lengths) + k + len(self.first_open) + (k - 1) * len(self.separator) + 1


def build_trie(digits: list[tuple[int, ...]]) -> TrieNode:
    root = TrieNode()
    for i, seq in enumerate(digits, start=1):
        node = root
        node.ids_below.append(i)
        for tok in seq:
            node = node.children.setdefault(tok, TrieNode(depth=node.depth + 1))
            node.ids_below.append(i)
        if node.id is not None:
            raise UnsupportedTokenizer(f"ids {node.id} and {i} have the same token sequence")
        node.id = i
    return root


class PermutationConstraint:
    """A logits processor (`backbone.generate`'s hook) that lets one row emit only a permutation of `k` of n ids.

    `process(generated [1, t], logits [1, V]) -> logits` reads the tokens emitted since the last call, advances the
    state, and masks. `emitted` is the 1-based ids in order once decoding ends.
    """

    def __init__(self, ids: IdTokens, n: int, k: int | None = None):
        if n < 1:
            raise ValueError("a permutation needs at least one id")
        self.ids, self.n, self.k = ids, n, n if k is None else max(1, min(k, n))
        self.root = build_trie(ids.digits_of(n))
        self.reset()

    def reset(self) -> None:
        self.emitted: list[int] = []
        self._emitted: set[int] = set()
        self.left_below: dict[int, int] = {}  # id(node) -> ids not yet emitted in its subtree
        self._walk_counts(self.root)
        self.forced: list[int] = list(self.ids.first_open)  # tokens that must come next, in order
        self.node: TrieNode | None = None  # inside an id: the trie node reached; None while forced tokens remain
        self.done = False
        self.consumed = 0

    @property
    def emitted_set(self) -> set[int]:
        return self._emitted

    def clone(self) -> PermutationConstraint:
        """An independent copy of the decoding state (the trie is shared: it never changes)."""
        c = copy.copy(self)
        c.emitted, c._emitted, c.forced = list(self.emitted), set(self._emitted), list(self.forced)
        c.left_below = dict(self.left_below)
        return c

    def _walk_counts(self, node: TrieNode) -> None:
        self.left_below[id(node)] = len(node.ids_below)
        for child in node.children.values():
            self._walk_counts(child)

    # ------------------------------------------------------------------------------------------------ state

    def allowed(self) -> list[int]:
        if self.done:
            return [self.ids.eos]
        if self.forced:
            return [self.forced[0]]
        node = self.node
        out = [tok for tok, child in node.children.items() if self.left_below[id(child)] > 0]
        if node.id is not None and node.id not in self._emitted:
            out.append(self.ids.close)
        return out

    def advance(self, token: int) -> None:
        allowed = self.allowed()
        if token not in allowed:
            raise ValueError(f"token {token} is not allowed here (allowed: {allowed})")
        if self.done:
            return
        if self.forced:
            self.forced.pop(0)
            if not self.forced:
                self.node = self.root
            return
        if token == self.ids.close and token not in self.node.children:
            self._emit()
        else:
            self.node = self.node.children[token]

    def _emit(self) -> None:
        i = self.node.id
        self.emitted.append(i)
        self._emitted.add(i)
        node = self.root
        self.left_below[id(node)] -= 1
        for tok in self.ids.digit_tokens[str(i)]:
            node = node.children[tok]
            self.left_below[id(node)] -= 1
        self.node = None
        if len(self.emitted) == self.k:
            self.done = True
        else:
            self.forced = list(self.ids.separator)

    def process(self, generated: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if logits.shape[0] != 1:
            raise ValueError("PermutationConstraint constrains one row; use one constraint per prompt")
        self._consume(generated)
        return constrain(logits, self.allowed())

    def forced_tokens(self, generated: torch.Tensor) -> list[int]:
        """The tokens that must come next whatever the logits say (separators, `]` of an id with no longer id left
        below it, the end token), taken as emitted: the decoding loop runs them through the model in one forward
        (jump-forward decoding) instead of sampling each."""
        self._consume(generated)
        out: list[int] = []
        while len(allowed := self.allowed()) == 1:
            out.append(allowed[0])
            if self.done:
                break
            self.advance(allowed[0])
        self.consumed += len(out)
        return out

    def _consume(self, generated: torch.Tensor) -> None:
        if generated.shape[0] != 1:
            raise ValueError("PermutationConstraint constrains one row; use one constraint per prompt")
        for tok in generated[0, self.consumed:].tolist():
            self.advance(int(tok))
        self.consumed = generated.shape[1]

    __call__ = process

    def order(self) -> list[int]:
        """0-based passage indices in the order emitted."""
        return [i - 1 for i in self.emitted]


def constrain(logits: torch.Tensor, allowed: list[int]) -> torch.Tensor:
    """-inf everywhere but `allowed`, whose logits are made finite (NaN -> 0, +-inf -> +-1e4)."""
    idx = torch.tensor(allowed, dtype=torch.long, device=logits.device)
    kept = torch.nan_to_num(logits.index_select(-1, idx).float(), nan=0.0, posinf=1e4, neginf=-1e4)
    out = torch.full_like(logits, float("-inf"), dtype=torch.float32)
    out.index_copy_(-1, idx, kept)
    return out


@dataclass
class ParsedPermutation:
    order: list[int]  # 0-based, all n ids: the parsed ones first (deduplicated), then the missing in input order
    wrong_format: bool  # text is not `[a] > [b] > ...` with in-range numbers
    repeated: int  # ids that appeared more than once (counted once each)
    missing: int  # ids 1..n that never appeared
    unknown: int  # numbers outside 1..n


_ID = re.compile(r"\[(\d+)\]")
_FORMAT = re.compile(r"\s*\[\d+\](\s*>\s*\[\d+\])*\s*")


def parse_permutation(text: str, n: int, expected: int | None = None) -> ParsedPermutation:
    """Read a ranking answer *without* constraints (for measuring what unconstrained decoding would break):
    rank_llm's receive_permutation (parse, dedupe, append missing in input order), with counts of each fault.
    `expected`: the answer was asked for its top `expected` ids only; `missing` counts those it lacks."""
    numbers = [int(m) for m in _ID.findall(text)]
    seen: list[int] = []
    repeated_ids: set[int] = set()
    unknown = 0
    for x in numbers:
        if not 1 <= x <= n:
            unknown += 1
        elif x in seen:
            repeated_ids.add(x)
        else:
            seen.append(x)
    missing = [i for i in range(1, n + 1) if i not in seen]
    wrong = _FORMAT.fullmatch(text) is None or unknown > 0
    lacking = len(missing) if expected is None else max(0, min(expected, n) - len(seen))
    return ParsedPermutation([i - 1 for i in seen + missing], wrong, len(repeated_ids), lacking, unknown)


def _find(seq: list[int], sub: list[int]) -> int | None:
    for i in range(len(seq) - len(sub) + 1):
        if seq[i: i + len(sub)] == sub:
            return i
    return None
