"""Continuous batching for decoding: sequences that decode together, joining and leaving between steps.

`DecodeBatch` holds the rows' KV caches itself (`Transformer.decode_step` takes them as arguments), so one step
advances every row by one token, whatever its prompt length or how far it has come. A row joins with the KV of its
own prefill (any prompt: token ids or REFRAG's compressed `inputs_embeds`) and leaves when it is done; between
steps, nothing else changes.

Layout. The rows share one write slot: each row's tokens sit right-aligned, ending just before it, and its
`key_mask` row marks them; each row keeps its own RoPE position (its token count). A join or a leave rebuilds the
cache at the size the rows now need (the longest row, plus the most tokens any row may still add, rounded up to
`pad` slots), copying each row's KV across: a few milliseconds against a prefill's hundreds, and the step, whose
attention reads every slot up to the mask's width, never reads a slot no row needs. Steps run the eager
`decode_step` (a compiled step is built for one (batch, cache length) shape; those change with every join).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (k, v) [B, Hkv, L, D]


class DecodeBatch:
    def __init__(self, model, *, pad: int = 64):
        self.model = model
        self.pad = pad
        self.keys: list[Hashable] = []  # row i's owner
        self.lengths: list[int] = []  # tokens in row i's cache (prompt + generated): its next RoPE position
        self.room: list[int] = []  # tokens row i may still add
        self.caches: KV = []
        self.key_mask = torch.zeros((0, 0), dtype=torch.bool)
        self.slot = 0  # the next write slot, shared by every row

    def __len__(self) -> int:
        return len(self.keys)

    def join(self, key: Hashable, kv: KV, length: int, room: int) -> None:
        """Add a row whose prompt KV is `kv` (per layer [1, Hkv, >= length, D], its first `length` slots real) and
        that may decode `room` more tokens."""
        if key in self.keys:
            raise ValueError(f"{key!r} is already decoding in this batch")
        if length < 1 or room < 1:
            raise ValueError("a row needs a prompt of at least one token and room for one more")
        if length + room > self.model.args.max_seq_len:
            raise ValueError(f"{length} + {room} tokens exceed the model's context of {self.model.args.max_seq_len}")
        self._rebuild(keep=list(range(len(self.keys))), new=(key, kv, length, room))

    def leave(self, keys: Sequence[Hashable]) -> None:
        gone = set(keys)
        if gone:
            self._rebuild(keep=[i for i, k in enumerate(self.keys) if k not in gone])

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [rows] (row i's next token) -> next logits [rows, vocab]."""
        if tokens.shape != (len(self.keys),):
            raise ValueError(f"{tuple(tokens.shape)} tokens for {len(self.keys)} rows")
        if any(r < 1 for r in self.room):
            raise ValueError("a row has used the room it joined with")
        device = self.key_mask.device
        self.key_mask[:, self.slot] = True
        positions = torch.tensor(self.lengths, dtype=torch.long, device=device)
        slot = torch.tensor([self.slot], dtype=torch.long, device=device)
        logits = self.model.decode_step(tokens.to(device), positions, slot, self.key_mask, caches=self.caches)
        self.slot += 1
        self.lengths = [n + 1 for n in self.lengths]
        self.room = [r - 1 for r in self.room]
        return logits

    def _rebuild(self, keep: list[int], new: tuple[Hashable, KV, int, int] | None = None) -> None:
        lengths = [self.lengths[i] for i in keep] + ([new[2]] if new else [])
        room = [self.room[i] for i in keep] + ([new[3]] if new else [])
        keys = [self.keys[i] for i in keep] + ([new[0]] if new else [])
        if not keys:
            self.keys, self.lengths, self.room, self.caches, self.slot = [], [], [], [], 0
            self.key_mask = torch.zeros((0, 0), dtype=torch.bool)
            return
        slot = max(lengths)
        width = min(-(-(slot + max(room)) // self.pad) * self.pad, self.model.args.max_seq_len)
        ref = self.model.tok_embeddings.weight
        args = self.model.args
        caches: KV = []
        for layer in range(args.n_layers):
            k = torch.zeros((len(keys), args.n_kv_heads, width, args.head_dim), dtype=ref.dtype, device=ref.device)
            v = torch.zeros_like(k)
            for row, i in enumerate(keep):  # old slots [self.slot - n, self.slot) -> [slot - n, slot)
                n = self.lengths[i]
                old_k, old_v = self.caches[layer]
                k[row, :, slot - n:slot] = old_k[i, :, self.slot - n:self.slot]
                v[row, :, slot - n:slot] = old_v[i, :, self.slot - n:self.slot]
            if new:
                n = new[2]
                new_k, new_v = new[1][layer]
                k[-1, :, slot - n:slot] = new_k[0, :, :n]
                v[-1, :, slot - n:slot] = new_v[0, :, :n]
            caches.append((k, v))
        mask = torch.zeros((len(keys), width), dtype=torch.bool, device=ref.device)
        for row, n in enumerate(lengths):
            mask[row, slot - n:slot] = True
        self.keys, self.lengths, self.room, self.caches, self.key_mask, self.slot = (
            keys, lengths, room, caches, mask, slot)
