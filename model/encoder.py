"""A SASRec-style next-item encoder with an exact rolling key/value cache.

Attention is causal over a sliding window of the last W events, and positions enter only
through rotary embeddings (and, in HSTU blocks, a learned bias by the age of each key: a
relative position too), so an event's key and value never change once computed. A rolling
buffer of W slots per layer (position p in slot p % W, as in Mistral 7B) is all the next event
needs:

    encode_into(pool, vectors, slots, events)          full pass of left-padded histories,
                                                       written into rows `slots` of a slab of
                                                       many users' caches (state/kvpool.py)
    extend_into(pool, vectors, slots, events, counts)  up to W new events per user against
                                                       those rows, written back in place

are the serving path's two primitives; `events` is the bundle of what the model reads of each
event (`EventInputs`, model/events.py: a new event feature is one field there). The reference
passes, for training, evaluation and the exactness tests, take items and types (and, with
`config.time_features`, each event's time code, model/events.py):

    forward(items, types)                full pass over left-padded sequences (training)
    encode(items, types)                 full pass that also returns the cache
    extend(cache, items, types, counts)  up to W new events per user against the cache
    step(cache, items, types)            one new event per user: extend with T = 1

All run the same `Block.forward` (or `HSTUBlock.forward`, model/hstu.py, with
`config.block = "hstu"`), with the cached keys and values as its past or none.
After any number of events, `step` and `extend` equal `forward` over the whole history; an
N-layer output depends on the last N*(W-1)+1 events (`config.history_needed`), so `encode`
over those refills a cache exactly. Rotary angles are reduced modulo 2*pi in float64 before
the cast to float32, so their error stays flat however far a long-lived cache's positions run.

Over 400 lines as one thing, as gpt-fast's model.py: the model and its cache, whose passes
share the masks, the rotary positions and the rolling buffer's arithmetic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor
from torch.nn import functional as F

from kvrec.model.config import ModelConfig
from kvrec.model.events import DAYS, GAP_BUCKETS, HOURS, EventInputs
from kvrec.model.hstu import HSTUBlock
from kvrec.model.layers import (
    Dropout,
    apply_rope,
    attention_scores,
    dropout,
    rope_cos_sin,
    weighted_values,
)


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

    def rows(self, slots: Tensor) -> KVCache:
        """A copy of the users in rows `slots` (of a slab: many users' caches)."""
        return KVCache(
            self.keys.index_select(1, slots),
            self.values.index_select(1, slots),
            self.positions.index_select(0, slots),
        )

    def write_rows(self, slots: Tensor, cache: KVCache) -> None:
        """Rows `slots` become the users of `cache` (row b into slot slots[b]), in place."""
        self.keys.index_copy_(1, slots, cache.keys.to(self.keys.dtype))
        self.values.index_copy_(1, slots, cache.values.to(self.values.dtype))
        self.positions.index_copy_(0, slots, cache.positions)

    def write_new(self, slots: Tensor, new: _NewEvents, counts: Tensor) -> None:
        """The new events of `extend`'s pass into rows `slots`, in place: each one's key and
        value into its slot of the rolling buffer (nothing else is copied back), the positions
        advanced by `counts`."""
        _, batch, n_heads, length, head_dim = new.keys.shape
        n_layers = new.keys.shape[0]
        # [L, B, H, T, D] -> [B * T, L, H, D]: the layout `self.keys[:, slot, :, w]` takes
        rows = slots.repeat_interleave(length)
        where = torch.remainder(new.positions, self.keys.shape[3]).reshape(-1)
        self.keys[:, rows, :, where] = new.keys.permute(1, 3, 0, 2, 4).reshape(
            batch * length, n_layers, n_heads, head_dim)
        self.values[:, rows, :, where] = new.values.permute(1, 3, 0, 2, 4).reshape(
            batch * length, n_layers, n_heads, head_dim)
        self.positions.index_copy_(0, slots, new.positions[:, 0] + counts)

    def to(self, device: torch.device | str) -> KVCache:
        return KVCache(self.keys.to(device), self.values.to(device), self.positions.to(device))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.positions))


@dataclass
class _NewEvents:
    """What one `extend` pass computed for its new events (see `Encoder._extend`)."""

    hidden: Tensor  # [B, T, d]
    keys: Tensor  # [n_layers, B, n_heads, T, head_dim]: padding's = what its slot held
    values: Tensor  # [n_layers, B, n_heads, T, head_dim]
    positions: Tensor  # [B, T]: each new event's position (its slot: position % W)
    index: Tensor  # [n_layers, B, n_heads, T, head_dim]: the slot of each, for `scatter`
    attention: Tensor | None  # [B, T, W] by age, if asked for


class Attention(nn.Module):
    """Multi-head attention with rotary positions; the new events attend to a past (cached
    keys and values, or none) followed by themselves."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.head_dim = config.head_dim
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.out = nn.Linear(config.d_model, config.d_model)
        self.dropout = config.dropout  # on the attention weights, in training

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        past: tuple[Tensor, Tensor] | None,
        mask: Tensor,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """x [B, T, d] -> (output [B, T, d], new keys and values [B, H, T, D], weights).

        `mask` [B, 1, T, S + T] says which of the S past keys and the T new ones each query
        sees. `weights` [B, H, T, S + T] only if `need_weights`, else None."""
        q, k, v = self.project(x, cos, sin)
        p = self.dropout if self.training else 0.0
        if past is None and not need_weights and p == 0.0:  # the fused kernel
            return self.merge(F.scaled_dot_product_attention(q, k, v, attn_mask=mask)), k, v, None
        scores = attention_scores(q, k, past) * (1.0 / math.sqrt(self.head_dim))
        weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        kept = dropout(weights, p, self.training)  # scaled_dot_product_attention's dropout_p
        y = weighted_values(kept, v, past)
        return self.merge(y), k, v, weights if need_weights else None

    def project(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Rotated queries and keys and the values, each [B, H, T, D]."""
        batch, length, _ = x.shape
        q, k, v = self.qkv(x).split(self.n_heads * self.head_dim, dim=-1)
        shape = (batch, length, self.n_heads, self.head_dim)
        q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def merge(self, y: Tensor) -> Tensor:
        """Heads [B, H, T, D] to the output projection [B, T, d]."""
        batch, _, length, _ = y.shape
        return self.out(y.transpose(1, 2).reshape(batch, length, self.n_heads * self.head_dim))


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
    """Pre-norm transformer layer: attention, then feed-forward, each added to the residual."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(config.d_model)
        self.attention = Attention(config)
        self.ffn_norm = nn.LayerNorm(config.d_model)
        self.ffn = FeedForward(config)
        self.dropout = Dropout(config.dropout)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        past: tuple[Tensor, Tensor] | None,
        mask: Tensor,
        age: Tensor | None = None,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """x [B, T, d] -> (x, new keys, new values, weights), as `Attention.forward` (rotary
        positions only: `age` is for `HSTUBlock`)."""
        h, keys, values, weights = self.attention(
            self.attention_norm(x), cos, sin, past, mask, need_weights
        )
        x = x + self.dropout(h)
        return x + self.ffn(self.ffn_norm(x)), keys, values, weights


class Encoder(nn.Module):
    """Item and event-type embeddings, `n_layers` blocks, a final norm; the input item
    embedding doubles as the output scoring matrix."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config.validate()
        self.item_embedding = nn.Embedding(config.n_items + 1, config.d_model, padding_idx=0)
        self.type_embedding = nn.Embedding(config.n_event_types + 1, config.d_model, padding_idx=0)
        if config.time_features:  # absent otherwise: older artifacts' weights load unchanged
            self.gap_embedding = nn.Embedding(GAP_BUCKETS, config.d_model)
            self.day_embedding = nn.Embedding(DAYS, config.d_model)
            self.hour_embedding = nn.Embedding(HOURS, config.d_model)
        self.embedding_dropout = Dropout(config.dropout)
        layer = HSTUBlock if config.block == "hstu" else Block
        self.blocks = nn.ModuleList(layer(config) for _ in range(config.n_layers))
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

    def embed(self, events: EventInputs) -> Tensor:
        """[B, T, d]: every feature of each event, embedded and summed (the one reader of
        `EventInputs`' fields)."""
        x = self.item_embedding(events.items) * math.sqrt(self.config.d_model)
        x = x + self.type_embedding(events.event_types)
        if self.config.time_features:
            x = x + self._embed_times(events.times)
        return self.embedding_dropout(x)

    def _embed_times(self, times: Tensor | None) -> Tensor:
        """Hour, day and gap embeddings of time codes (model/events.py); zero at padding."""
        if times is None:
            raise ValueError("this model has time features: its inputs need `times`")
        code = torch.clamp(times - 1, min=0)
        hour = torch.remainder(code, HOURS)
        day = torch.remainder(torch.div(code, HOURS, rounding_mode="floor"), DAYS)
        gap = torch.div(code, HOURS * DAYS, rounding_mode="floor")
        summed = self.gap_embedding(gap) + self.day_embedding(day) + self.hour_embedding(hour)
        return summed * (times != 0).unsqueeze(-1).to(summed.dtype)

    def item_embeddings(self) -> Tensor:
        """[n_items + 1, d]: the output scoring matrix (tied with the input); row 0 = padding.
        With cosine similarity its rows are L2-normalised (the padding row stays zero)."""
        if self.config.similarity == "cosine":
            return F.normalize(self.item_embedding.weight, dim=-1)
        return self.item_embedding.weight

    def user_vectors(self, hidden: Tensor) -> Tensor:
        """The final normed hidden states as user vectors: an item's score is the inner product
        with its row of `item_embeddings()`. With cosine similarity they are L2-normalised and
        divided by the temperature, so that inner product is cosine / temperature."""
        if self.config.similarity == "cosine":
            return F.normalize(hidden, dim=-1) / self.config.temperature
        return hidden

    def score(self, user_vectors: Tensor) -> Tensor:
        return user_vectors @ self.item_embeddings().T

    def _layers(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        cache: KVCache | None,
        mask: Tensor,
        age: Tensor | None,
        keep: bool,
        need_weights: bool = False,
    ) -> tuple[Tensor, list[Tensor], list[Tensor], Tensor | None]:
        """All blocks over x [B, T, d], layer l with past `cache[l]` (if any): the normed
        output, each layer's new keys and values (if `keep`), the last layer's weights (if
        `need_weights`). `age` (HSTU blocks only) is each key's age for each query, as `mask`."""
        keys: list[Tensor] = []
        values: list[Tensor] = []
        weights = None
        last = len(self.blocks) - 1
        for layer, block in enumerate(self.blocks):
            past = None if cache is None else (cache.keys[layer], cache.values[layer])
            x, k, v, weights = block(x, cos, sin, past, mask, age, need_weights and layer == last)
            if keep:
                keys.append(k)
                values.append(v)
        return self.user_vectors(self.norm(x)), keys, values, weights

    # --- full pass ----------------------------------------------------------------------------
    def _full(
        self, events: EventInputs, keep_cache: bool
    ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """Left-padded sequences with no past; the sliding-window mask over them."""
        cfg = self.config
        items = events.items
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
        age = distance.clamp(0, cfg.window - 1).unsqueeze(0) if cfg.block == "hstu" else None
        x = self.embed(events)
        hidden, keys, values, _ = self._layers(x, cos, sin, None, mask, age, keep_cache)
        return hidden, keys, values

    def forward(self, items: Tensor, event_types: Tensor, times: Tensor | None = None) -> Tensor:
        """Hidden states [B, T, d] of left-padded (0 = pad) sequences; pad rows are garbage."""
        hidden, _, _ = self._full(EventInputs(items, event_types, times), keep_cache=False)
        return hidden

    def encode(
        self, items: Tensor, event_types: Tensor, times: Tensor | None = None
    ) -> tuple[Tensor, KVCache]:
        """User vectors at each row's last event [B, d] and the cache that continues from it;
        a row with no events gets an empty cache (and a meaningless vector)."""
        return self._encode(EventInputs(items, event_types, times))

    def _encode(self, events: EventInputs) -> tuple[Tensor, KVCache]:
        hidden, layer_keys, layer_values = self._full(events, keep_cache=True)
        cfg = self.config
        items = events.items
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
        keys = torch.stack([torch.gather(k, 2, gather) * keep for k in layer_keys])
        values = torch.stack([torch.gather(v, 2, gather) * keep for v in layer_values])
        return hidden[:, -1], KVCache(keys, values, lengths.clone())

    # --- new events against the cache ----------------------------------------------------------
    def extend(
        self,
        cache: KVCache,
        items: Tensor,
        event_types: Tensor,
        counts: Tensor,
        return_attention: bool = False,
        times: Tensor | None = None,
    ) -> tuple[Tensor, KVCache, Tensor | None]:
        """Advance user b by its `counts[b]` new events `items[b, :counts[b]]` (right-padded,
        1 <= counts[b] <= T <= W) in one pass: user vectors after each new event [B, T, d]
        (garbage past counts[b]), a new cache (the given one is left as it was) and optionally
        the last layer's attention after each new event [B, T, W], averaged over heads, by
        age (index 0 = that event; zero before the user's first event).

        A chunked prefill against the rolling cache: equal to `counts[b]` calls of `step`."""
        new = self._extend(cache, EventInputs(items, event_types, times), counts, return_attention)
        new_cache = KVCache(
            cache.keys.scatter(3, new.index, new.keys),
            cache.values.scatter(3, new.index, new.values),
            cache.positions + counts,
        )
        return new.hidden, new_cache, new.attention

    def extend_into(
        self,
        pool: KVCache,
        pool_vectors: Tensor,
        slots: Tensor,
        events: EventInputs,
        counts: Tensor,
        return_attention: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """`extend` of the users whose caches are rows `slots` of `pool` (a cache of many
        users: a slab), written back in place (`KVCache.write_new`), and the user vector after
        each user's last new event into `pool_vectors` [S, d]. Returns the vectors [B, T, d]
        and attention [B, T, W] as `extend` does; the result equals `extend` of the gathered
        caches scattered back (the same arithmetic)."""
        new = self._extend(pool.rows(slots), events, counts, return_attention)
        pool.write_new(slots, new, counts)
        last = new.hidden[torch.arange(len(counts), device=counts.device), counts - 1]
        pool_vectors.index_copy_(0, slots, last.to(pool_vectors.dtype))
        return new.hidden, new.attention

    def encode_into(
        self, pool: KVCache, pool_vectors: Tensor, slots: Tensor, events: EventInputs
    ) -> Tensor:
        """`encode` of left-padded histories, written into rows `slots` of `pool` (cache) and
        `pool_vectors` (the vector after each row's last event); returns the vectors [B, d]."""
        vectors, cache = self._encode(events)
        pool.write_rows(slots, cache)
        pool_vectors.index_copy_(0, slots, vectors.to(pool_vectors.dtype))
        return vectors

    def _extend(
        self, cache: KVCache, events: EventInputs, counts: Tensor, return_attention: bool
    ) -> _NewEvents:
        """The pass `extend` and `extend_into` share: the new events' outputs, keys and values
        (padding's replaced by what its slot held), where they go, the attention."""
        cfg = self.config
        batch, length = events.shape
        window = cfg.window
        if length > window:
            raise ValueError(f"extend takes at most W={window} new events per user, got {length}")
        device = events.items.device
        start = cache.positions  # [B]: position of each user's first new event
        offsets = torch.arange(length, device=device)
        positions = start.view(-1, 1) + offsets.view(1, -1)  # [B, T]
        real = offsets.view(1, -1) < counts.view(-1, 1)  # [B, T]
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_base)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, T, D/2]
        slots = torch.arange(window, device=device)
        # slot s holds position start - 1 - age[b, s], or nothing where age >= start; new event t
        # sees it while t + 1 + age < W
        age = torch.remainder(start.view(-1, 1) - 1 - slots.view(1, -1), window)  # [B, W]
        cached_distance = offsets.view(1, -1, 1) + 1 + age.view(batch, 1, window)  # [B, T, W]
        sees_cached = (cached_distance < window) & (age < start.view(-1, 1)).view(batch, 1, window)
        if length == 1:  # every user's one event is real, and sees itself
            sees_new = real.view(batch, 1, 1)
        else:  # each new event sees the real new events up to itself (T <= W); padding itself
            causal = offsets.view(-1, 1) >= offsets.view(1, -1)
            sees_new = causal.view(1, length, length) & real.view(batch, 1, length)
            # the diagonal (padding sees itself), as a comparison: ONNX has no boolean EyeLike
            sees_new = sees_new | (offsets.view(-1, 1) == offsets.view(1, -1)).view(1, length, length)
        mask = torch.cat([sees_cached, sees_new], dim=-1).unsqueeze(1)  # [B, 1, T, W + T]
        key_age = None
        if cfg.block == "hstu":  # new event t comes t - t' after new event t'
            new_distance = (offsets.view(-1, 1) - offsets.view(1, -1)).expand(batch, length, length)
            key_age = torch.cat([cached_distance, new_distance], dim=-1).clamp(0, window - 1)
        x = self.embed(events)  # [B, T, d]
        hidden, layer_keys, layer_values, probabilities = self._layers(
            x, cos, sin, cache, mask, key_age, keep=True, need_weights=return_attention
        )
        # each new event's key and value go to its slot p % W (T <= W: distinct slots)
        slot = torch.remainder(positions, window).view(1, batch, 1, length, 1)
        index = slot.expand(cfg.n_layers, batch, cfg.n_heads, length, cfg.head_dim)
        new_keys, new_values = torch.stack(layer_keys), torch.stack(layer_values)
        if length > 1:  # padding rewrites what its slot holds (with T = 1 every event is real)
            write = real.view(1, batch, 1, length, 1)
            new_keys = torch.where(write, new_keys, cache.keys.gather(3, index))
            new_values = torch.where(write, new_values, cache.values.gather(3, index))
        attention = None
        if probabilities is not None:
            by_key = probabilities.mean(dim=1)  # [B, T, W + T]
            ages = torch.arange(window, device=device)
            key_offset = offsets.view(1, -1, 1) - ages.view(1, 1, -1)  # [1, T, W]: t - age
            key_position = positions.view(batch, length, 1) - ages.view(1, 1, -1)
            by_age = torch.where(
                key_offset >= 0, window + key_offset, torch.remainder(key_position, window)
            )  # where the key of that age is: a new event, else its cached slot
            attention = torch.gather(by_key, 2, by_age) * (key_position >= 0)
        return _NewEvents(hidden, new_keys, new_values, positions, index, attention)

    def step(
        self,
        cache: KVCache,
        items: Tensor,
        event_types: Tensor,
        return_attention: bool = False,
        times: Tensor | None = None,
    ) -> tuple[Tensor, KVCache, Tensor | None]:
        """Advance every user by one event (items, event_types [B], times [B] or None):
        `extend` with T = 1.

        User vectors [B, d], a new cache, and optionally the last layer's attention [B, W]
        averaged over heads, by age: index 0 = this event, 1 = the event before, ...; zero
        where the user has fewer events."""
        hidden, new_cache, attention = self.extend(
            cache,
            items.view(-1, 1),
            event_types.view(-1, 1),
            torch.ones_like(cache.positions),
            return_attention,
            times.view(-1, 1) if times is not None else None,
        )
        return hidden[:, 0], new_cache, attention[:, 0] if attention is not None else None
