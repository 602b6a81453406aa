"""The cache invariant: `step` equals the full sliding-window forward pass, and so does a
cache refilled with `encode` from the last N*(W-1)+1 events (fp32, 1e-4)."""

from __future__ import annotations

import copy

import pytest
import torch

from kvrec.model.config import ModelConfig
from kvrec.model.encoder import Encoder, KVCache

TOLERANCE = 1e-4


def _encoder(
    layers: int, window: int, seed: int, similarity: str = "dot", block: str = "transformer"
) -> Encoder:
    torch.manual_seed(seed)
    config = ModelConfig(
        n_items=40, n_event_types=4, d_model=16, n_layers=layers, n_heads=2, window=window,
        dropout=0.0, similarity=similarity, block=block,
    )
    encoder = Encoder(config).eval()
    if block == "hstu":  # a bias by age as large as the scores, so a wrong age shows
        with torch.no_grad():
            for layer in encoder.blocks:
                layer.age_bias.normal_(std=1.0)
    return encoder


def _sequences(lengths: list[int], seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randint(1, 41, (n,), generator=generator),
            torch.randint(1, 5, (n,), generator=generator),
        )
        for n in lengths
    ]


def _left_pad(rows: list[torch.Tensor]) -> torch.Tensor:
    length = max(1, max(len(r) for r in rows))
    out = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        if len(row):
            out[i, length - len(row) :] = row
    return out


def _full_forward_last(encoder: Encoder, sequences) -> torch.Tensor:
    items = _left_pad([s[0] for s in sequences])
    types = _left_pad([s[1] for s in sequences])
    return encoder(items, types)[:, -1]


def _step_batched(encoder: Encoder, sequences, cache: KVCache | None = None) -> torch.Tensor:
    """Step all users together, one event per step; users stop when their sequence ends."""
    batch = len(sequences)
    cache = cache or KVCache.empty(encoder.config, batch, device=sequences[0][0].device)
    per_user = [c for c in cache.split()]
    vectors: list[torch.Tensor | None] = [None] * batch
    for t in range(max(len(s[0]) for s in sequences)):
        active = [b for b in range(batch) if t < len(sequences[b][0])]
        stepped = KVCache.cat([per_user[b] for b in active])
        items = torch.stack([sequences[b][0][t] for b in active])
        types = torch.stack([sequences[b][1][t] for b in active])
        out, stepped, _ = encoder.step(stepped, items, types)
        for slot, (b, user_cache) in enumerate(zip(active, stepped.split(), strict=True)):
            per_user[b] = user_cache
            vectors[b] = out[slot]
    return torch.stack(vectors)  # type: ignore[arg-type]


@pytest.mark.parametrize("block", ["transformer", "hstu"])
@pytest.mark.parametrize("similarity", ["dot", "cosine"])
@pytest.mark.parametrize(("layers", "window", "seed"), [(2, 4, 0), (2, 7, 1), (3, 5, 2), (1, 6, 3)])
@torch.no_grad()
def test_step_equals_full_sliding_window_forward(
    layers: int, window: int, seed: int, similarity: str, block: str
) -> None:
    encoder = _encoder(layers, window, seed, similarity, block)
    lengths = [1, 2, window, 3 * window + 1, 5 * window - 2]  # mixed, several times W
    sequences = _sequences(lengths, seed)
    stepped = _step_batched(encoder, sequences)
    full = _full_forward_last(encoder, sequences)
    assert (stepped - full).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize(("layers", "window", "seed", "similarity", "block"),
                         [(2, 4, 4, "dot", "transformer"), (3, 6, 5, "dot", "transformer"),
                          (2, 5, 6, "cosine", "transformer"), (3, 5, 8, "dot", "hstu")])
@torch.no_grad()
def test_refill_from_last_history_needed_events_is_exact(
    layers: int, window: int, seed: int, similarity: str, block: str
) -> None:
    encoder = _encoder(layers, window, seed, similarity, block)
    needed = encoder.config.history_needed
    sequences = _sequences([needed * 3, needed + 2, 4 * window, 2], seed)
    full = _full_forward_last(encoder, sequences)
    # refill with the last N*(W-1) events before the newest one (users with fewer: all of them;
    # a user with one event gets an empty cache), then step the newest event
    prefixes = [(s[0][:-1][-(needed - 1) :], s[1][:-1][-(needed - 1) :]) for s in sequences]
    _, cache = encoder.encode(_left_pad([p[0] for p in prefixes]), _left_pad([p[1] for p in prefixes]))
    newest = [(s[0][-1:], s[1][-1:]) for s in sequences]
    refilled = _step_batched(encoder, newest, cache)
    assert (refilled - full).abs().max().item() <= TOLERANCE
    # and encode over the last N*(W-1)+1 events gives the user vector directly
    tails = [(s[0][-needed:], s[1][-needed:]) for s in sequences]
    vectors, _ = encoder.encode(_left_pad([t[0] for t in tails]), _left_pad([t[1] for t in tails]))
    assert (vectors - full).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("block", ["transformer", "hstu"])
@torch.no_grad()
def test_a_shorter_refill_is_not_exact(block: str) -> None:
    """N*(W-1)+1 is the least: one event fewer changes the answer (so the test above can fail)."""
    encoder = _encoder(2, 4, 6, block=block)
    needed = encoder.config.history_needed
    sequences = _sequences([needed * 3], 6)
    full = _full_forward_last(encoder, sequences)
    short = [(s[0][-(needed - 1) :], s[1][-(needed - 1) :]) for s in sequences]
    vectors, _ = encoder.encode(_left_pad([short[0][0]]), _left_pad([short[0][1]]))
    assert (vectors - full).abs().max().item() > 10 * TOLERANCE


@torch.no_grad()
def test_split_and_cat_round_trip_is_lossless() -> None:
    encoder = _encoder(2, 5, 7)
    sequences = _sequences([3, 9, 14], 7)
    _, cache = encoder.encode(_left_pad([s[0] for s in sequences]), _left_pad([s[1] for s in sequences]))
    again = KVCache.cat(cache.split())
    assert torch.equal(again.keys, cache.keys) and torch.equal(again.values, cache.values)
    assert torch.equal(again.positions, cache.positions)
    assert again.nbytes() == cache.nbytes()


@pytest.mark.parametrize("damage", ["shifted_position", "wrong_slot"])
@torch.no_grad()
def test_a_broken_cache_is_detected(damage: str) -> None:
    encoder = _encoder(2, 4, 8)
    sequences = _sequences([20, 13], 8)
    full = _full_forward_last(encoder, sequences)
    prefixes = [(s[0][:-1], s[1][:-1]) for s in sequences]
    _, cache = encoder.encode(_left_pad([p[0] for p in prefixes]), _left_pad([p[1] for p in prefixes]))
    if damage == "shifted_position":
        cache = KVCache(cache.keys, cache.values, cache.positions + 1)
    else:
        cache = KVCache(cache.keys.roll(1, dims=3), cache.values.roll(1, dims=3), cache.positions)
    items = torch.stack([s[0][-1] for s in sequences])
    types = torch.stack([s[1][-1] for s in sequences])
    vectors, _, _ = encoder.step(cache, items, types)
    assert (vectors - full).abs().max().item() > 10 * TOLERANCE


@torch.no_grad()
def test_huge_positions_keep_float32_precision() -> None:
    """A long-lived cache: positions near 10**7 give the same vectors as positions from 0."""
    encoder = _encoder(2, 4, 9)
    sequences = _sequences([17], 9)
    full = _full_forward_last(encoder, sequences)
    start = KVCache.empty(encoder.config, 1)
    start = KVCache(start.keys, start.values, start.positions + 10_000_019)
    far = _step_batched(encoder, sequences, start)
    assert (far - full).abs().max().item() <= TOLERANCE


@torch.no_grad()
def test_attention_weights_are_a_distribution_over_real_events() -> None:
    encoder = _encoder(2, 6, 10)
    sequences = _sequences([2, 9], 10)
    prefixes = [(s[0][:-1], s[1][:-1]) for s in sequences]
    _, cache = encoder.encode(_left_pad([p[0] for p in prefixes]), _left_pad([p[1] for p in prefixes]))
    items = torch.stack([s[0][-1] for s in sequences])
    types = torch.stack([s[1][-1] for s in sequences])
    _, _, attention = encoder.step(cache, items, types, return_attention=True)
    assert attention is not None and attention.shape == (2, 6)
    torch.testing.assert_close(attention.sum(dim=1), torch.ones(2))
    assert torch.all(attention[0, 2:] == 0)  # the user with 2 events: ages 0 and 1 only
    assert torch.all(attention[1] > 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@torch.no_grad()
def test_step_on_cuda_equals_full_forward() -> None:
    cpu_encoder = _encoder(2, 8, 11)
    sequences = _sequences([1, 8, 30, 45], 11)
    want = _full_forward_last(cpu_encoder, sequences)
    encoder = copy.deepcopy(cpu_encoder).cuda()
    torch.backends.cuda.matmul.allow_tf32 = False
    stepped = _step_batched(encoder, [(i.cuda(), t.cuda()) for i, t in sequences])
    assert (stepped.cpu() - want).abs().max().item() <= TOLERANCE


def test_cosine_scores_are_cosines_over_the_temperature_and_old_configs_score_by_dot() -> None:
    encoder = _encoder(2, 4, 7, "cosine")
    items, types = _left_pad([s[0] for s in _sequences([9], 7)]), torch.ones(1, 9, dtype=torch.long)
    with torch.no_grad():
        vectors = encoder(items, types)[:, -1]
        scores = encoder.score(vectors)[0, 1:]
    rows = encoder.item_embedding.weight[1:]
    assert torch.allclose(vectors.norm(dim=-1), torch.tensor([1 / 0.05]), rtol=1e-5)
    direction = vectors[0] / vectors[0].norm()
    expected = (rows @ direction) / rows.norm(dim=-1) / 0.05
    assert torch.allclose(scores, expected, atol=1e-4)
    config = ModelConfig(n_items=40).to_dict()
    del config["similarity"]
    assert ModelConfig.from_dict(config).similarity == "dot"


@torch.no_grad()
def test_the_hstu_bias_by_age_takes_part_in_both_passes() -> None:
    """The bias changes the output (so the hstu cases above test it) and a bias that moved one
    age over (what an off-by-one age in `extend` would read) breaks step = full pass."""
    encoder = _encoder(2, 4, 9, block="hstu")
    sequences = _sequences([3, 9, 14], 9)
    full = _full_forward_last(encoder, sequences)
    shifted = copy.deepcopy(encoder)
    for layer in shifted.blocks:
        layer.age_bias.copy_(layer.age_bias.roll(1, dims=-1))
    assert (_full_forward_last(shifted, sequences) - full).abs().max().item() > 10 * TOLERANCE
    assert (_step_batched(shifted, sequences) - full).abs().max().item() > 10 * TOLERANCE


def test_configs_without_a_block_read_as_the_transformer_and_unknown_blocks_are_refused() -> None:
    from kvrec.errors import ConfigError

    old = ModelConfig(n_items=5).to_dict()
    del old["block"]  # an artifact written before the field
    assert ModelConfig.from_dict(old).block == "transformer"
    with pytest.raises(ConfigError, match="block must be one of"):
        ModelConfig.from_dict({**old, "block": "mamba"})
