"""FIRST-style ranking: one forward pass, passages scored by the logits of their ids at the first output position.
Also inline scoring (`inline_scores`): the same one-pass prompt, each passage scored where its text ends.

With single-token ids (FIRST's letters) the score is one logit. Here an id is a short token sequence (`1` `2` for
[12], see permutation.py), so the score of id i is the log-probability of its whole sequence at the first output
position: log p(digits of i, then `]` | prompt, `[`), each step normalized over what constrained decoding would
allow there. All n sequences are scored in the *same* forward as the prompt: the id trie (one node per id: 100
extra tokens for 100 passages) is appended after the prompt's opener `[`, and a tree attention mask lets each trie
node see the prompt and its own ancestors only, at the positions it would have in the answer. The prompt part runs
plain causal attention (SDPA's fused path); only the few trie rows use an explicit mask.

The mask reaches the attention through a registered attention mode (`reranker-tree`) and a context variable:
the backbone's forward takes only a key-padding mask. A `tree_mask` argument on `Transformer.forward` (or an
`attn_bias` in `AttentionContext`) would make this simpler. Training uses the same layout with the target answer
between prompt and trie (`TreeLayout.visible` then covers the prompt and opener only).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from sieve.backbone import register_attention_mode

from .permutation import IdTokens, TrieNode, build_trie

MODE = "reranker-tree"


@dataclass
class TreeLayout:
    """Trie nodes appended after `causal_len` ordinary tokens; node j sees keys [0, visible) + ancestors + itself."""

    causal_len: int
    visible: int  # the prompt incl. the opener; the trie's root is at position visible - 1
    tokens: list[int]  # node tokens, BFS order
    parents: list[int]  # index of the parent node, -1 for a child of the root
    depths: list[int]  # 1 for children of the root
    node_ids: list[int | None]  # passage id ending at the node (1-based) or None
    nodes: list[TrieNode]
    root: TrieNode

    @classmethod
    def build(cls, ids: IdTokens, n: int, *, causal_len: int, visible: int) -> TreeLayout:
        root = build_trie(ids.digits_of(n))
        tokens, parents, depths, node_ids, nodes = [], [], [], [], []
        frontier = [(root, -1)]
        while frontier:
            nxt = []
            for node, index in frontier:
                for tok, child in sorted(node.children.items()):
                    tokens.append(tok)
                    parents.append(index)
                    depths.append(child.depth)
                    node_ids.append(child.id)
                    nodes.append(child)
                    nxt.append((child, len(tokens) - 1))
            frontier = nxt
        return cls(causal_len, visible, tokens, parents, depths, node_ids, nodes, root)

    def positions(self, prefix_positions: torch.Tensor) -> torch.Tensor:
        """Position ids [1, causal_len + m]: the prefix's own, then visible - 1 + depth for each node."""
        tree = torch.tensor(self.depths, dtype=torch.long, device=prefix_positions.device) + (self.visible - 1)
        return torch.cat([prefix_positions, tree])[None]

    def tree_mask(self, device) -> torch.Tensor:
        """[m, causal_len + m] bool, True = may attend."""
        m, c = len(self.tokens), self.causal_len
        mask = torch.zeros(m, c + m, dtype=torch.bool)
        mask[:, : self.visible] = True
        for j in range(m):
            a = j
            while a >= 0:
                mask[j, c + a] = True
                a = self.parents[a]
        return mask.to(device)


_CURRENT: contextvars.ContextVar[tuple[int, torch.Tensor] | None] = contextvars.ContextVar("reranker_tree",
                                                                                           default=None)


def _tree_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx) -> torch.Tensor:
    current = _CURRENT.get()
    if current is None or ctx.use_cache or ctx.key_padding is not None:
        raise RuntimeError(f"attention mode {MODE!r} runs only inside tree_forward (no cache, no padding)")
    c, mask = current
    gqa = q.shape[1] != k.shape[1]
    head = F.scaled_dot_product_attention(q[:, :, :c], k[:, :, :c], v[:, :, :c], is_causal=True, enable_gqa=gqa)
    tree = F.scaled_dot_product_attention(q[:, :, c:], k, v, attn_mask=mask[None, None], enable_gqa=gqa)
    return torch.cat([head, tree], dim=2)


register_attention_mode(MODE, _tree_attention, causal=True)


@contextlib.contextmanager
def tree_attention(layout: TreeLayout, device) -> Iterator[None]:
    """Within this block, forward calls with `mode=MODE` use `layout`'s tree mask."""
    token = _CURRENT.set((layout.causal_len, layout.tree_mask(device)))
    try:
        yield
    finally:
        _CURRENT.reset(token)


def tree_forward(model, prefix: torch.Tensor, layout: TreeLayout, at: torch.Tensor) -> torch.Tensor:
    """One forward over prefix [1, causal_len] + the trie; -> logits [len(at), V] at sequence positions `at`."""
    device = prefix.device
    tree = torch.tensor(layout.tokens, dtype=torch.long, device=device)[None]
    ids = torch.cat([prefix, tree], dim=1)
    pos = layout.positions(torch.arange(layout.causal_len, device=device))
    with tree_attention(layout, device):
        out = model(ids, position_ids=pos, mode=MODE, return_hidden=True, return_logits=False)
    return model.output(out.hidden_states[0, at]).float()


def sequence_scores(logits_root: torch.Tensor, logits_nodes: torch.Tensor, layout: TreeLayout,
                    close: int) -> torch.Tensor:
    """Per id (1..n) the constrained log-probability of `digits ]` -> [n] (differentiable).

    logits_root [V] at the opener, logits_nodes [m, V] at each trie node (BFS order, as the layout). Each step is
    normalized over what constrained decoding allows at the first id: the children, plus `]` on an id's node."""
    index = {id(node): j for j, node in enumerate(layout.nodes)}
    step: list[torch.Tensor | None] = [None] * len(layout.nodes)  # log p(node's token | parent)
    end: dict[int, torch.Tensor] = {}  # node index -> log p(`]` | node)
    for node, logits in [(layout.root, logits_root), *zip(layout.nodes, logits_nodes)]:
        children = sorted(node.children)
        options = children + ([close] if node.id is not None else [])
        if not options:
            continue
        logp = torch.log_softmax(logits[torch.tensor(options, device=logits.device)], dim=-1)
        for o, tok in enumerate(children):
            step[index[id(node.children[tok])]] = logp[o]
        if node.id is not None:
            end[index[id(node)]] = logp[-1]
    path: list[torch.Tensor] = []
    for j, parent in enumerate(layout.parents):  # BFS order: a parent comes before its children
        path.append(step[j] + path[parent] if parent >= 0 else step[j])
    by_id = {i: path[j] + end[j] for j, i in enumerate(layout.node_ids) if i is not None}
    return torch.stack([by_id[i] for i in range(1, len(by_id) + 1)])


# Inline relevance: the prompt's token after each passage (`Prompt.ends`) has read the query (in the prefix), the
# passages before it and its own passage, so its hidden state can say how relevant that passage is. The score is the
# logit of " yes" minus that of " no" there, through the model's own LM head (no new parameters). Training teaches
# it directly (train.py, `inline_weight`): on small shuffled lists it learns where the FIRST pointer does not
# (sessions 12-14: FIRST's RankNet loss stayed at chance), and it is also the auxiliary signal for FIRST.
RELEVANCE_WORDS = (" yes", " no")


def relevance_tokens(tokenizer) -> tuple[int, int]:
    """The ids of the last token of " yes" and " no" (one token each in SmolLM2's vocabulary)."""
    yes, no = (tokenizer.encode(w)[-1] for w in RELEVANCE_WORDS)
    return yes, no


def inline_from_hidden(model, hidden: torch.Tensor, relevance: tuple[int, int]) -> torch.Tensor:
    """hidden [n, dim] (after the final norm) at the passages' last tokens -> scores [n] (differentiable):
    logit(yes) - logit(no), through the LM head as it is (float, packed or quantized)."""
    logits = model.output(hidden)[:, list(relevance)].float()
    return logits[:, 0] - logits[:, 1]


def inline_scores(model, prompt_ids: list[int], ends: list[int], relevance: tuple[int, int]) -> torch.Tensor:
    """Inline scores [n] for a prompt (no answer, no trie): one causal forward, read at each passage's end."""
    device = model.tok_embeddings.weight.device
    with torch.inference_mode():
        out = model(torch.tensor([prompt_ids], dtype=torch.long, device=device), return_hidden=True,
                    return_logits=False)
        return inline_from_hidden(model, out.hidden_states[0, ends], relevance)


def first_scores(model, prompt_ids: list[int], ids: IdTokens, n: int) -> torch.Tensor:
    """FIRST scores [n] (log-probabilities, higher = more relevant) for a prompt without its answer."""
    device = model.tok_embeddings.weight.device
    prefix = torch.tensor([prompt_ids + list(ids.first_open)], dtype=torch.long, device=device)
    c = prefix.shape[1]
    layout = TreeLayout.build(ids, n, causal_len=c, visible=c)
    at = torch.arange(c - 1, c + len(layout.tokens), device=device)
    with torch.inference_mode():
        logits = tree_forward(model, prefix, layout, at)
    return sequence_scores(logits[0], logits[1:], layout, ids.close)
