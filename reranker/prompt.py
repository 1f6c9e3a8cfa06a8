"""Listwise prompts as data, and building them as token ids inside the context limit.

A `PromptTemplate` is `system` + `prefix` + one `body` per passage + `suffix` (rank_llm's prompt templates), checked
when constructed. The prompt is assembled from token ids, not re-tokenized text, so its length is exact:

    <chat head> prefix(query, n) | [1] passage-1 \\n | ... | [n] passage-n \\n | suffix(query, n) <chat tail>

then the answer `[a] > [b] > ...` (see permutation.py) whose exact length is reserved too.

**Budget (documented policy).** The context (8,192 for SmolLM2) minus everything that is not passage text (chat
wrapping, instructions, the query twice, the n id labels, the reserved answer) is shared by the n passages: each is
cut to the same cap, the largest cap such that all passages fit (water-filling, so short passages leave room for
long ones), and never above `max_passage_tokens`. More passages -> a smaller cap: this is the automatic shrink.
The query is cut to `max_query_tokens`. If the cap would fall below `min_passage_tokens` the request cannot be
ranked meaningfully in one pass and `PromptTooLong` says so (use fewer passages or the sliding mode).
For SmolLM2 and 100 passages the cap is about 70 tokens per passage (with the default 128-token query limit).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .permutation import IdTokens


class PromptTooLong(ValueError):
    """The passages cannot fit the context even at the minimum per-passage budget."""


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    system: str
    prefix: str  # {n}, {query}
    body: str  # {rank}, {passage}; the passage is cut to the budget
    suffix: str  # {n}, {query}

    def __post_init__(self) -> None:
        for part, fields in (("prefix", ("{n}",)), ("body", ("{passage}",)), ("suffix", ())):
            text = getattr(self, part)
            for f in fields:
                if text.count(f) != 1:
                    raise ValueError(f"template {self.name!r}: {part} must contain {f} exactly once")
        before, _, after = self.body.partition("{passage}")
        if before.count("{rank}") != 1:
            raise ValueError(f"template {self.name!r}: the body must put {{rank}} once before {{passage}}")
        if after.count("{rank}") > 1 or "{" in after.replace("{{", "").replace("{rank}", "") or "{query}" in before:
            raise ValueError(f"template {self.name!r}: the body may only use {{rank}} and {{passage}} (and repeat "
                             "{rank} once after the passage)")


RANKGPT = PromptTemplate(
    name="rankgpt",
    system="You are RankGPT, an intelligent assistant that can rank passages based on their relevancy to the query.",
    prefix="I will provide you with {n} passages, each indicated by a numerical identifier []. "
           "Rank the passages based on their relevance to the search query: {query}\n\n",
    body="[{rank}] {passage}\n",
    suffix="\nSearch Query: {query}\nRank the {n} passages above based on their relevance to the search query. "
           "All the passages should be included and listed using identifiers, in descending order of relevance. "
           "The output format should be [] > [], e.g., [2] > [1]. Only respond with the ranking results, "
           "do not say any word or explain.",
)
# RankGPT's prompt with each passage's label repeated after it: in a causal model the trailing label is the first
# token that has read the query (in the prefix) and the whole passage, so it can carry the passage's relevance next
# to the id the answer copies (the leading label has seen none of the passage).
RANKGPT_ECHO = dataclasses.replace(RANKGPT, name="rankgpt-echo", body="[{rank}] {passage} [{rank}]\n")
TEMPLATES = {t.name: t for t in (RANKGPT, RANKGPT_ECHO)}
_QUERY = "\x00SIEVE-QUERY\x00"  # where the query goes in a template (read as text, see Tokenizer.encode_template)


@dataclass
class Prompt:
    ids: list[int]  # the whole prompt, chat-wrapped, ready for prefill
    n: int
    passage_cap: int  # tokens each passage was allowed
    truncated: int  # passages cut to the cap
    answer_tokens: int  # reserved after the prompt (the exact longest answer incl. end token, by default)
    ends: list[int] = dataclasses.field(default_factory=list)  # per passage: index in `ids` of its body's last token


class PromptBuilder:
    """Token-exact prompts for one tokenizer and template, with the budget policy above."""

    def __init__(self, tokenizer, template: PromptTemplate = RANKGPT, *, context: int, ids: IdTokens,
                 chat: bool = True, max_passage_tokens: int = 256, max_query_tokens: int = 128,
                 min_passage_tokens: int = 8):
        self.tok, self.template, self.context, self.ids = tokenizer, template, context, ids
        self.max_passage_tokens, self.max_query_tokens = max_passage_tokens, max_query_tokens
        self.min_passage_tokens = min_passage_tokens
        self.chat_head, self.chat_tail = "", ""
        if chat and tokenizer.meta.chat_template:
            marker = "\x00SIEVE-PROMPT\x00"
            messages = [{"role": "system", "content": template.system}, {"role": "user", "content": marker}]
            full = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            self.chat_head, _, self.chat_tail = full.partition(marker)
        before, _, after = template.body.partition("{passage}")
        # a space before the passage is tokenized with the passage (`Ġword`), as it would be in running text
        self._lead = " " if before.endswith(" ") else ""
        self.passage_lead = bool(self._lead)  # passage_ids() start with the space before the text
        self._label = before.removesuffix(" ") if self._lead else before
        self._after = after
        self._label_cache: dict[int, list[int]] = {}
        self._after_cache: dict[int, list[int]] = {}

    def label_ids(self, rank: int) -> list[int]:
        if rank not in self._label_cache:
            self._label_cache[rank] = self.tok.encode(self._label.format(rank=rank))
        return self._label_cache[rank]

    def after_ids(self, rank: int) -> list[int]:
        """What follows passage `rank` (a newline; the label again for an echoing template)."""
        if rank not in self._after_cache:
            self._after_cache[rank] = self.tok.encode(self._after.format(rank=rank))
        return self._after_cache[rank]

    def passage_ids(self, passages: list[str]) -> list[list[int]]:
        """Token ids of each passage as it sits in the body (leading space included), uncut."""
        # cut absurdly long texts by characters first: no passage needs more than ~8 chars per kept token
        limit = 8 * self.max_passage_tokens + 64
        texts = [self._lead + " ".join(p.split())[:limit] if p.strip() else "" for p in passages]
        return [ids if t else [] for t, ids in zip(texts, self.tok.encode_batch(texts) if texts else [])]

    def build(self, query: str, passages: list[str] | list[list[int]], *, cap: int | None = None,
              reserve: int | None = None) -> Prompt:
        """The prompt for ranking `passages` (texts, or ids from `passage_ids`). `cap`: use this per-passage cap
        instead of computing one (the sliding window reuses the full list's cap); `reserve`: tokens to keep free
        after the prompt (default: the longest answer listing all n ids)."""
        n = len(passages)
        if n == 0:
            raise ValueError("no passages to rank")
        p_ids = passages if passages and isinstance(passages[0], list) else self.passage_ids(passages)
        q = self.tok.encode(" ".join(query.split()))[: self.max_query_tokens]
        query_text = self.tok.decode(q)
        # the query goes in as text (a "<|im_end|>" in it stays characters); the chat markup as control tokens
        query_at = {_QUERY: query_text}
        head = self.tok.encode_template(self.chat_head + self.template.prefix.format(n=n, query=_QUERY), query_at)
        tail = self.tok.encode_template(self.template.suffix.format(n=n, query=_QUERY) + self.chat_tail, query_at)
        answer = self.ids.output_length(n) if reserve is None else reserve
        fixed = len(head) + len(tail) + answer + sum(len(self.label_ids(r)) + len(self.after_ids(r))
                                                     for r in range(1, n + 1))
        if cap is None:
            cap = self.cap_for([len(p) for p in p_ids], self.context - fixed)
            if cap is None:
                per_passage = (fixed - len(head) - len(tail)) / n + self.min_passage_tokens
                most = max(0, int((self.context - len(head) - len(tail)) // per_passage))
                raise PromptTooLong(
                    f"{n} passages do not fit the {self.context}-token context: after the instructions, query, id "
                    f"labels and the reserved answer, {max(self.context - fixed, 0)} tokens are left, under the "
                    f"minimum of {self.min_passage_tokens} per passage (about {most} passages would fit); rank "
                    "fewer passages or use mode='sliding'")
        body: list[int] = []
        ends: list[int] = []
        truncated = 0
        for r, ids in enumerate(p_ids, start=1):
            truncated += len(ids) > cap
            body += self.label_ids(r) + ids[:cap] + self.after_ids(r)
            ends.append(len(head) + len(body) - 1)
        prompt = head + body + tail
        if len(prompt) + answer > self.context:
            raise PromptTooLong(f"{n} passages need {len(prompt) + answer} tokens with a cap of {cap} per passage, "
                                f"over the {self.context}-token context")
        return Prompt(prompt, n, cap, truncated, answer, ends)

    def cap_for(self, lengths: list[int], room: int) -> int | None:
        """Largest per-passage cap c <= max_passage_tokens with sum(min(len, c)) <= room (water-filling);
        None when even `min_passage_tokens` each does not fit."""
        n, floor = len(lengths), self.min_passage_tokens
        if room < n * floor:
            return None
        used = 0
        for i, length in enumerate(sorted(lengths)):
            rest = n - i  # this passage and every longer one
            if used + length * rest <= room:
                used += length  # fits whole at any cap >= length
                continue
            return min(max((room - used) // rest, floor), self.max_passage_tokens)
        return self.max_passage_tokens
