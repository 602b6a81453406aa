"""A SASRec-family next-item encoder with an exact rolling key/value cache.

Attention is causal and limited to a sliding window of the last W positions, and positions
enter only through rotary embeddings (RoPE), so attention scores depend on relative distance
alone. The key and value computed for an event therefore never change afterwards, and a
rolling buffer of W slots per layer (position p lives in slot p % W, as in Mistral 7B) holds
everything the next event needs:

    forward(items, types)      full pass over left-padded sequences (training)
    encode(items, types)       full pass that also returns the cache (cold caches)
    step(cache, items, types)  one new event per user against the cache

`step` after any number of events equals `forward` over the whole history with the
sliding-window mask. An N-layer output depends on N*(W-1)+1 events, so `encode` over the last
`config.history_needed` events refills a cache exactly.

Positions grow without bound in a long-lived cache. RoPE angles are computed in float64 and
reduced modulo 2*pi before the cast to float32, so their float32 error stays flat however far
the position counter runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor
from torch.nn import functional as F

from model.config import ModelConfig

TWO_PI = 2.0 * math.pi


@dataclass
class KVCache:
    """Per-layer keys and values of each user's last W events, in a rolling buffer."""

    keys: Tensor  # [n_layers, B, n_heads, W, head_dim], rotated by their own positions
    values: Tensor  # [n_layers, B, n_heads, W, head_dim]
    positions: Tensor  # [B] int64: events seen so far = the position of the next event

    @staticmethod
    def empty(
        config: ModelConfig,
        batch_size: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> KVCache:
        shape = (config.n_layers, batch_size, config.n_heads, config.window, config.head_dim)
        return KVCache(
            torch.zeros(shape, device=device, dtype=dtype),
            torch.zeros(shape, device=device, dtype=dtype),
            torch.zeros(batch_size, device=device, dtype=torch.long),
        )

    @property
    def batch_size(self) -> int:
        return int(self.positions.shape[0])

    def split(self) -> list[KVCache]:
        """One cache per user, each with its own storage (so it can be kept alone)."""
        return [
            KVCache(
                self.keys[:, b : b + 1].clone(),
                self.values[:, b : b + 1].clone(),
                self.positions[b : b + 1].clone(),
            )
            for b in range(self.batch_size)
        ]

    @staticmethod
    def cat(caches: list[KVCache]) -> KVCache:
        return KVCache(
            torch.cat([c.keys for c in caches], dim=1),
            torch.cat([c.values for c in caches], dim=1),
            torch.cat([c.positions for c in caches]),
        )

    def to(self, device: torch.device | str) -> KVCache:
        return KVCache(self.keys.to(device), self.values.to(device), self.positions.to(device))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.positions))


def rope_cos_sin(positions: Tensor, head_dim: int, base: float) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotary angles, [..., head_dim // 2], exact for huge positions."""
    exponents = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float64)
    inv_freq = 1.0 / (base ** (exponents / head_dim))
    angles = torch.remainder(positions.to(torch.float64).unsqueeze(-1) * inv_freq, TWO_PI)
    return torch.cos(angles).float(), torch.sin(angles).float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x[..., i], x[..., i + half]) of x [B, H, T, D] by cos/sin [B, 1, T, D/2]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.head_dim = config.head_dim
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.out = nn.Linear(config.d_model, config.d_model)
        self.dropout = config.dropout

    def project(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Rotated queries and keys and the values, each [B, H, T, D]."""
        batch, length, _ = x.shape
        q, k, v = self.qkv(x).split(self.n_heads * self.head_dim, dim=-1)
        shape = (batch, length, self.n_heads, self.head_dim)
        q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def merge(self, y: Tensor) -> Tensor:
        batch, _, length, _ = y.shape
        return self.out(y.transpose(1, 2).reshape(batch, length, self.n_heads * self.head_dim))


class Dropout(nn.Module):
    """`nn.Dropout` with the keep mask drawn by `torch.rand`: the same distribution, and on CPU
    2-3x faster than `bernoulli_`, which took half of a training step's time."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    if not training or p == 0.0:
        return x
    return x * (torch.rand_like(x) >= p) * (1.0 / (1.0 - p))


def attention_with_dropout(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, p: float) -> Tensor:
    """What `scaled_dot_product_attention` computes with `dropout_p=p`, with the fast mask."""
    scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return dropout(weights, p, training=True) @ v


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        hidden = config.mlp_ratio * config.d_model
        self.up = nn.Linear(config.d_model, hidden)
        self.down = nn.Linear(hidden, config.d_model)
        self.dropout = Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.down(self.dropout(F.gelu(self.up(x)))))


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(config.d_model)
        self.attention = Attention(config)
        self.ffn_norm = nn.LayerNorm(config.d_model)
        self.ffn = FeedForward(config)
        self.dropout = Dropout(config.dropout)


class Encoder(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config.validate()
        self.item_embedding = nn.Embedding(config.n_items + 1, config.d_model, padding_idx=0)
        self.type_embedding = nn.Embedding(config.n_event_types + 1, config.d_model, padding_idx=0)
        self.embedding_dropout = Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = nn.LayerNorm(config.d_model)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
            if module.padding_idx is not None:
                module.weight.data[module.padding_idx].zero_()

    def embed(self, items: Tensor, event_types: Tensor) -> Tensor:
        x = self.item_embedding(items) * math.sqrt(self.config.d_model)
        return self.embedding_dropout(x + self.type_embedding(event_types))

    def item_embeddings(self) -> Tensor:
        """[n_items + 1, d]: the output scoring matrix (tied with the input); row 0 = padding."""
        return self.item_embedding.weight

    def score(self, user_vectors: Tensor) -> Tensor:
        return user_vectors @ self.item_embedding.weight.T

    # --- full pass ----------------------------------------------------------------------------
    def _full(self, items: Tensor, event_types: Tensor, keep_cache: bool) -> tuple[Tensor, list]:
        cfg = self.config
        real = items != 0  # left-padded: each row's real events are contiguous at the end
        positions = (real.long().cumsum(dim=1) - 1).clamp(min=0)  # [B, T]
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_base)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, T, D/2]
        length = items.shape[1]
        index = torch.arange(length, device=items.device)
        distance = index.view(-1, 1) - index.view(1, -1)  # query i - key j
        allowed = (distance >= 0) & (distance < cfg.window)  # [T, T]
        mask = allowed & real.unsqueeze(1)  # [B, T(query), T(key)]
        mask = mask | torch.eye(length, dtype=torch.bool, device=items.device)  # pads see self
        mask = mask.unsqueeze(1)
        x = self.embed(items, event_types)
        per_layer: list[tuple[Tensor, Tensor]] = []
        for block in self.blocks:
            q, k, v = block.attention.project(block.attention_norm(x), cos, sin)
            if keep_cache:
                per_layer.append((k, v))
            if self.training and block.attention.dropout > 0.0:
                y = attention_with_dropout(q, k, v, mask, block.attention.dropout)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            x = x + block.dropout(block.attention.merge(y))
            x = x + block.ffn(block.ffn_norm(x))
        return self.norm(x), per_layer

    def forward(self, items: Tensor, event_types: Tensor) -> Tensor:
        """Hidden states [B, T, d] of left-padded (0 = pad) sequences; pad rows are garbage."""
        hidden, _ = self._full(items, event_types, keep_cache=False)
        return hidden

    def encode(self, items: Tensor, event_types: Tensor) -> tuple[Tensor, KVCache]:
        """User vectors at each row's last event [B, d] and the cache to continue with `step`.

        A row with no events returns an empty cache (and a meaningless vector)."""
        hidden, per_layer = self._full(items, event_types, keep_cache=True)
        cfg = self.config
        batch, length = items.shape
        lengths = (items != 0).sum(dim=1)  # [B]
        slots = torch.arange(cfg.window, device=items.device)
        # the newest position p < L with p % W == s, for each slot s
        age = torch.remainder(lengths.view(-1, 1) - 1 - slots.view(1, -1), cfg.window)
        slot_positions = lengths.view(-1, 1) - 1 - age  # [B, W]
        valid = slot_positions >= 0
        time_index = (length - lengths).view(-1, 1) + slot_positions.clamp(min=0)  # into padded
        time_index = time_index.clamp(max=length - 1)  # rows with no events: masked below
        gather = time_index.view(batch, 1, cfg.window, 1).expand(
            batch, cfg.n_heads, cfg.window, cfg.head_dim
        )
        keep = valid.view(batch, 1, cfg.window, 1)
        keys = torch.stack([torch.gather(k, 2, gather) * keep for k, _ in per_layer])
        values = torch.stack([torch.gather(v, 2, gather) * keep for _, v in per_layer])
        return hidden[:, -1], KVCache(keys, values, lengths.clone())

    # --- several new events per user against the cache ---------------------------------------------
    def extend(
        self,
        cache: KVCache,
        items: Tensor,
        event_types: Tensor,
        counts: Tensor,
        return_attention: bool = False,
    ) -> tuple[Tensor, KVCache, Tensor | None]:
        """Advance user b by its `counts[b]` new events `items[b, :counts[b]]` (right-padded,
        1 <= counts[b] <= T <= W) in one pass: user vectors after each new event [B, T, d]
        (garbage past counts[b]), the new cache, and optionally the last layer's attention
        after each new event [B, T, W] by age (index 0 = that event), as `step` gives it.

        Equal to `counts[b]` calls of `step`; what a consumer batch with several events of the
        same user needs (a chunked prefill against the rolling cache)."""
        cfg = self.config
        batch, length = items.shape
        window = cfg.window
        if length > window:
            raise ValueError(f"extend takes at most W={window} new events per user, got {length}")
        device = items.device
        start = cache.positions  # [B]: position of each user's first new event
        offsets = torch.arange(length, device=device)
        positions = start.view(-1, 1) + offsets.view(1, -1)  # [B, T]
        real = offsets.view(1, -1) < counts.view(-1, 1)  # [B, T]
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_base)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, T, D/2]
        slots = torch.arange(window, device=device)
        # the position each slot holds: the newest p < start with p % W == slot (< 0: empty)
        slot_positions = start.view(-1, 1) - 1 - torch.remainder(
            start.view(-1, 1) - 1 - slots.view(1, -1), window
        )  # [B, W]
        distance_to_slot = positions.view(batch, length, 1) - slot_positions.view(batch, 1, window)
        sees_cached = (slot_positions.view(batch, 1, window) >= 0) & (distance_to_slot < window)
        distance = offsets.view(-1, 1) - offsets.view(1, -1)  # new query t - new key t'
        sees_new = ((distance >= 0) & (distance < window)).view(1, length, length) & real.view(
            batch, 1, length
        )
        sees_new = sees_new | torch.eye(length, dtype=torch.bool, device=device)  # pads: self
        mask = torch.cat([sees_cached, sees_new], dim=-1).unsqueeze(1)  # [B, 1, T, W + T]
        scale = 1.0 / math.sqrt(cfg.head_dim)
        x = self.embed(items, event_types)  # [B, T, d]
        new_keys, new_values = [], []
        probabilities = torch.empty(0)
        for layer, block in enumerate(self.blocks):
            q, k, v = block.attention.project(block.attention_norm(x), cos, sin)  # [B, H, T, D]
            keys = torch.cat([cache.keys[layer], k], dim=2)  # [B, H, W + T, D]
            values = torch.cat([cache.values[layer], v], dim=2)
            scores = (q @ keys.transpose(-1, -2)) * scale
            probabilities = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
            x = x + block.attention.merge(probabilities @ values)
            x = x + block.ffn(block.ffn_norm(x))
            new_keys.append(keys)
            new_values.append(values)
        # each slot's new content: the newest new event with that slot, else what it held
        age_in_chunk = torch.remainder(slots.view(1, -1) - start.view(-1, 1), window)  # t of slot
        written = age_in_chunk < counts.view(-1, 1)  # [B, W]
        source = torch.where(written, window + age_in_chunk, slots.view(1, -1))  # into W + T
        gather = source.view(batch, 1, window, 1).expand(batch, cfg.n_heads, window, cfg.head_dim)
        new_cache = KVCache(
            torch.stack([torch.gather(k, 2, gather) for k in new_keys]),
            torch.stack([torch.gather(v, 2, gather) for v in new_values]),
            start + counts,
        )
        attention = None
        if return_attention:
            by_key = probabilities.mean(dim=1)  # [B, T, W + T]
            ages = torch.arange(window, device=device)
            key_offset = offsets.view(1, -1, 1) - ages.view(1, 1, -1)  # [1, T, W]: t - age
            key_position = positions.view(batch, length, 1) - ages.view(1, 1, -1)
            index = torch.where(
                key_offset >= 0, window + key_offset, torch.remainder(key_position, window)
            )
            attention = torch.gather(by_key, 2, index) * (key_position >= 0)
        return self.norm(x), new_cache, attention

    # --- one event per user against the cache ----------------------------------------------------
    def step(
        self,
        cache: KVCache,
        items: Tensor,
        event_types: Tensor,
        return_attention: bool = False,
    ) -> tuple[Tensor, KVCache, Tensor | None]:
        """Advance every user by one event: user vectors [B, d], the new cache, and optionally
        the last layer's attention [B, W] averaged over heads, by age: index 0 = this event,
        1 = the event before, ...; zero where the user has fewer events."""
        cfg = self.config
        positions = cache.positions  # [B]
        cos, sin = rope_cos_sin(positions.view(-1, 1), cfg.head_dim, cfg.rope_base)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, 1, D/2]
        slots = torch.arange(cfg.window, device=items.device)
        age = torch.remainder(positions.view(-1, 1) - slots.view(1, -1), cfg.window)  # [B, W]
        valid = (age <= positions.view(-1, 1)).view(-1, 1, 1, cfg.window)
        write = (age == 0).view(-1, 1, 1, cfg.window)  # the slot this event overwrites
        older = valid & ~write  # cached events still inside the window
        x = self.embed(items.view(-1, 1), event_types.view(-1, 1))  # [B, 1, d]
        step_keys, step_values = [], []
        weights = torch.empty(0)
        scale = 1.0 / math.sqrt(cfg.head_dim)
        for layer, block in enumerate(self.blocks):
            q, k, v = block.attention.project(block.attention_norm(x), cos, sin)  # [B, H, 1, D]
            step_keys.append(k)
            step_values.append(v)
            # attend to the older cached events and to this event itself (not yet in the cache)
            cached = (q @ cache.keys[layer].transpose(-1, -2)) * scale  # [B, H, 1, W]
            own = (q * k).sum(dim=-1, keepdim=True) * scale  # [B, H, 1, 1]
            both = torch.cat([cached.masked_fill(~older, float("-inf")), own], dim=-1)
            probabilities = torch.softmax(both, dim=-1)
            p_cached, p_own = probabilities[..., :-1], probabilities[..., -1:]
            x = x + block.attention.merge(p_cached @ cache.values[layer] + p_own * v)
            x = x + block.ffn(block.ffn_norm(x))
            weights = torch.where(write, p_own, p_cached)  # by slot, as if written first
        # one copy of the cache (the caller's stays valid) with each user's slot overwritten
        slot = torch.remainder(positions, cfg.window).view(1, -1, 1, 1, 1)
        index = slot.expand(cfg.n_layers, -1, cfg.n_heads, 1, cfg.head_dim)
        new_keys = cache.keys.scatter(3, index, torch.stack(step_keys))
        new_values = cache.values.scatter(3, index, torch.stack(step_values))
        new_cache = KVCache(new_keys, new_values, positions + 1)
        attention = None
        if return_attention:
            by_slot = weights.mean(dim=1).squeeze(1)  # [B, W]
            slot_of_age = torch.remainder(positions.view(-1, 1) - slots.view(1, -1), cfg.window)
            attention = torch.gather(by_slot, 1, slot_of_age)  # column a = age a
        return self.norm(x).squeeze(1), new_cache, attention
