"""The projector (chunk-encoder vector -> one decoder input embedding) and the learned expansion policy's scorer.

Both are small `nn.Module`s saved as safetensors in the model folder; shapes come from `RefragConfig`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Projector(nn.Module):
    """2-layer MLP: [n, in_dim] -> [n, out_dim] (the decoder's d_model), GELU between.

    Inputs are expected L2-normalized (MiniLM's are). `out_rms` is the RMS of the decoder's token embeddings: the
    layers start so that outputs have about that RMS, so untrained vectors already look like token embeddings in
    size (SmolLM2: 0.136).
    """

    def __init__(self, in_dim: int, out_dim: int, hidden: int, out_rms: float = 0.1):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc2 = nn.Linear(hidden, out_dim)
        with torch.no_grad():
            self.fc1.weight.normal_(0.0, 1.0)  # unit-norm input -> pre-activations ~ N(0, 1)
            self.fc1.bias.zero_()
            self.fc2.weight.normal_(0.0, out_rms / (0.65 * hidden ** 0.5))  # rms(gelu(N(0, 1))) ~ 0.65
            self.fc2.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class PolicyScorer(nn.Module):
    """Scores how much expanding a block helps: features of (query vector, block vector, relative position) -> [n].

    Features: q * b, |q - b| (both [dim]), cosine(q, b), position in the context in [0, 1].
    Trained (train.py, stage "policy") on the decoder's own perplexity gain from expanding each block alone.
    """

    def __init__(self, dim: int, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2 * dim + 2, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, query: torch.Tensor, blocks: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        # query [dim], blocks [n, dim], position [n] -> scores [n]
        q = query.expand_as(blocks)
        cos = F.cosine_similarity(q, blocks, dim=-1)
        feats = torch.cat([q * blocks, (q - blocks).abs(), cos[:, None], position[:, None]], dim=-1)
        return self.net(feats).squeeze(-1)
