"""Query-likelihood scoring (UPR: Sachan et al., "Improving Passage Retrieval with Zero-Shot Question Generation",
EMNLP 2022): each passage is scored by log p(query | passage) under the backbone, read off one teacher-forced
forward of `passage prompt + query`. Zero-shot: the decoder's own language modelling is the relevance judge, so it
needs no training (a reranker folder's adapter, when it has one, is merged into that judge; the shipped
`sieve-rank-likelihood` has none).

The n (passage, query) sequences run as right-padded batches of about `batch_tokens` tokens; the LM head runs only
at the positions that predict a query token (the head is 49K wide, most of a forward's cost on short sequences).
The query's tokens are the same for every passage, so the summed log-probability ranks exactly as the mean does.

Template: `Passage: {passage}` + `\n\nA statement based on this passage:` + ` {query}`, chosen on 30 SciFact *train*
claims (BM25 top 20) among three cues (nDCG@10: this one 0.760, "A search query this passage answers:" 0.750, UPR's
". Please write a question based on this passage." 0.749; docs/reranker.md, session 18); no test query was used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PASSAGE_PREFIX = "Passage:"  # then a space: the passage's own leading space, or one added here
QUERY_CUE = "\n\nA statement based on this passage:"


@dataclass(frozen=True)
class LikelihoodPrompt:
    """Token pieces of the query-likelihood prompt for one query."""

    prefix: list[int]  # "Passage:" (+ " " for passages encoded without their leading space)
    cue: list[int]  # between the passage and the query
    query: list[int]  # the scored tokens

    @classmethod
    def build(cls, tokenizer, query: str, max_query_tokens: int, *, passage_lead: bool = True) -> LikelihoodPrompt:
        """`passage_lead`: the passages' tokens start with the space before their text (`PromptBuilder.passage_ids`
        of a template with a space before `{passage}`)."""
        if not query.strip():
            raise ValueError("the query is empty: query likelihood scores the query's tokens")
        q = tokenizer.encode(" " + " ".join(query.split()), add_bos=False)[:max_query_tokens]
        prefix = PASSAGE_PREFIX if passage_lead else PASSAGE_PREFIX + " "
        return cls(tokenizer.encode(prefix, add_bos=False), tokenizer.encode(QUERY_CUE, add_bos=False), q)

    def sequence(self, passage: list[int]) -> tuple[list[int], int]:
        """-> (tokens, index of the first query token)."""
        head = self.prefix + passage + self.cue
        return head + self.query, len(head)


def batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Consecutive index groups whose padded size (rows x longest) stays within `batch_tokens` (one row at least)."""
    out, cur, longest = [], [], 0
    for i, n in enumerate(lengths):
        if cur and max(longest, n) * (len(cur) + 1) > batch_tokens:
            out.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, n)
    if cur:
        out.append(cur)
    return out


def likelihood_scores(model, prompt: LikelihoodPrompt, passages: list[list[int]], *, pad_id: int = 0,
                      batch_tokens: int = 4096) -> tuple[torch.Tensor, int, int]:
    """log p(query | passage) for each passage -> (scores [n], tokens run, forward passes)."""
    device = model.tok_embeddings.weight.device
    seqs = [prompt.sequence(p) for p in passages]
    scores = torch.empty(len(seqs))
    tokens = forwards = 0
    q = len(prompt.query)
    target = torch.tensor(prompt.query, device=device)
    for group in batches([len(s) for s, _ in seqs], batch_tokens):
        width = max(len(seqs[i][0]) for i in group)
        ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        mask = torch.zeros(len(group), width, dtype=torch.long)
        for row, i in enumerate(group):
            ids[row, : len(seqs[i][0])] = torch.tensor(seqs[i][0])
            mask[row, : len(seqs[i][0])] = 1
        # the positions whose next token is a query token: start - 1 ... start + q - 2
        at = torch.stack([torch.arange(seqs[i][1] - 1, seqs[i][1] - 1 + q) for i in group]).to(device)
        with torch.inference_mode():
            hidden = model(ids.to(device), attention_mask=mask.to(device), return_hidden=True,
                           return_logits=False).hidden_states
            picked = hidden[torch.arange(len(group), device=device)[:, None], at]  # [b, q, dim]
            logp = torch.log_softmax(model.output(picked).float(), -1)
            scores[group] = logp.gather(-1, target.expand(len(group), q)[..., None]).squeeze(-1).sum(-1).cpu()
        tokens += int(mask.sum())
        forwards += 1
    return scores, tokens, forwards
