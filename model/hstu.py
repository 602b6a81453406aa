"""HSTU's layer (Zhai et al. 2024, "Actions Speak Louder than Words"), over the sliding window.

One projection gives four SiLU-activated parts per event: a gate u, a value v, a query q and a
key k. Attention is pointwise, not a softmax: the weight of key j for query i is
SiLU(q_i . k_j + b[age]) / W, where b is a learned bias per head for each age i - j in
[0, W) (a relative position: it depends on no absolute position, so a cached key keeps its
meaning as the window rolls on), and q and k are also rotated by their positions as in the
transformer block. The weighted sum of the values is normalised, gated by u, projected and
added to the residual; there is no feed-forward network.

The keys and values are each event's own, as in `Block`, so the rolling cache holds them
unchanged (`step` = the full pass); the gate u is the query event's and is never cached.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor
from torch.nn import functional as F

from kvrec.model.config import ModelConfig
from kvrec.model.layers import apply_rope, attention_scores, dropout, weighted_values


class HSTUBlock(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.head_dim = config.head_dim
        self.window = config.window
        self.norm = nn.LayerNorm(config.d_model)
        self.uvqk = nn.Linear(config.d_model, 4 * config.d_model)
        self.age_bias = nn.Parameter(torch.empty(config.n_heads, config.window).normal_(std=0.02))
        self.output_norm = nn.LayerNorm(config.d_model)
        self.out = nn.Linear(config.d_model, config.d_model)
        self.dropout = config.dropout  # on the gated output, in training

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        past: tuple[Tensor, Tensor] | None,
        mask: Tensor,
        age: Tensor | None,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """x [B, T, d] -> (x, new keys, new values [B, H, T, D], weights), as `Block.forward`.

        `age` [B or 1, T, S + T] is each key's age for each query (query position - key position),
        any value in [0, W) where `mask` hides the key."""
        if age is None:
            raise ValueError("an HSTU block needs the age of each key")
        batch, length, _ = x.shape
        u, v, q, k = F.silu(self.uvqk(self.norm(x))).chunk(4, dim=-1)
        shape = (batch, length, self.n_heads, self.head_dim)
        q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        bias = F.embedding(age, self.age_bias.T).permute(0, 3, 1, 2)  # [B or 1, H, T, S + T]
        weights = F.silu(attention_scores(q, k, past) + bias) * mask * (1.0 / self.window)
        y = weighted_values(weights, v, past).transpose(1, 2).reshape(batch, length, -1)
        gated = dropout(u * self.output_norm(y), self.dropout, self.training)
        return x + self.out(gated), k, v, weights if need_weights else None
