"""`extend` (several new events per user in one pass) equals the full sliding-window forward
pass after every event, and leaves the same cache and attention as one `step` per event."""

from __future__ import annotations

import pytest
import torch

from kvrec.model.encoder import Encoder, KVCache
from tests.test_encoder_exactness import TOLERANCE, _encoder, _sequences


def _forward_at_every_position(encoder: Encoder, items: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
    return encoder(items.view(1, -1), types.view(1, -1))[0]  # [T, d], no padding


def _extend_in_chunks(
    encoder: Encoder, sequences, chunks: list[int]
) -> tuple[list[torch.Tensor], KVCache, list[torch.Tensor]]:
    """Feed every user its events `chunks[i]` at a time (users mixed in one batch, each with
    its own count, right-padded), collecting the vector and attention after every event."""
    batch = len(sequences)
    cache = KVCache.empty(encoder.config, batch)
    done = [0] * batch
    vectors: list[list[torch.Tensor]] = [[] for _ in range(batch)]
    attentions: list[list[torch.Tensor]] = [[] for _ in range(batch)]
    round_ = 0
    while any(done[b] < len(sequences[b][0]) for b in range(batch)):
        size = chunks[round_ % len(chunks)]
        round_ += 1
        counts = [min(size, len(sequences[b][0]) - done[b]) for b in range(batch)]
        active = [b for b in range(batch) if counts[b] > 0]
        length = max(counts[b] for b in active)
        items = torch.zeros((len(active), length), dtype=torch.long)
        types = torch.zeros((len(active), length), dtype=torch.long)
        for row, b in enumerate(active):
            items[row, : counts[b]] = sequences[b][0][done[b] : done[b] + counts[b]]
            types[row, : counts[b]] = sequences[b][1][done[b] : done[b] + counts[b]]
        per_user = cache.split()
        out, stepped, attention = encoder.extend(
            KVCache.cat([per_user[b] for b in active]), items, types,
            torch.tensor([counts[b] for b in active]), return_attention=True,
        )
        for row, (b, user_cache) in enumerate(zip(active, stepped.split(), strict=True)):
            per_user[b] = user_cache
            vectors[b].extend(out[row, : counts[b]])
            attentions[b].extend(attention[row, : counts[b]])
            done[b] += counts[b]
        cache = KVCache.cat(per_user)
    return [torch.stack(v) for v in vectors], cache, [torch.stack(a) for a in attentions]


@pytest.mark.parametrize(
    ("layers", "window", "seed", "chunks", "block"),
    [(2, 4, 0, [4], "transformer"), (2, 7, 1, [3, 1, 7, 2], "transformer"),
     (3, 5, 2, [5, 2], "transformer"), (1, 6, 3, [1], "transformer"),
     (2, 7, 1, [3, 1, 7, 2], "hstu"), (3, 5, 2, [5, 2], "hstu")],
)
@torch.no_grad()
def test_extend_equals_full_forward_after_every_event(layers, window, seed, chunks, block) -> None:
    encoder = _encoder(layers, window, seed, block=block)
    sequences = _sequences([1, 2, window, 3 * window + 1, 5 * window - 2], seed)
    vectors, _, _ = _extend_in_chunks(encoder, sequences, chunks)
    for (items, types), got in zip(sequences, vectors, strict=True):
        expected = _forward_at_every_position(encoder, items, types)
        assert (got - expected).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("block", ["transformer", "hstu"])
@torch.no_grad()
def test_extend_leaves_the_cache_and_attention_of_one_step_per_event(block: str) -> None:
    encoder = _encoder(2, 5, 7, block=block)
    sequences = _sequences([3, 11, 17, 6], 7)
    _, extended_cache, extended_attention = _extend_in_chunks(encoder, sequences, [4, 5, 2])
    _, stepped_cache, stepped_attention = _extend_in_chunks(encoder, sequences, [1])
    assert torch.equal(extended_cache.positions, stepped_cache.positions)
    assert (extended_cache.keys - stepped_cache.keys).abs().max().item() <= TOLERANCE
    assert (extended_cache.values - stepped_cache.values).abs().max().item() <= TOLERANCE
    for got, expected in zip(extended_attention, stepped_attention, strict=True):
        assert (got - expected).abs().max().item() <= TOLERANCE
    # and `step` itself agrees with extend by one event
    cache = KVCache.empty(encoder.config, 1)
    for t in range(len(sequences[1][0])):
        _, cache, attention = encoder.step(
            cache, sequences[1][0][t : t + 1], sequences[1][1][t : t + 1], return_attention=True
        )
        assert (attention[0] - stepped_attention[1][t]).abs().max().item() <= TOLERANCE


@torch.no_grad()
def test_a_wrong_start_position_breaks_extend() -> None:
    encoder = _encoder(2, 4, 5)
    (items, types), = _sequences([10], 5)
    _, cache = encoder.encode(items[:6].view(1, -1), types[:6].view(1, -1))
    shifted = KVCache(cache.keys, cache.values, cache.positions + 1)
    out, _, _ = encoder.extend(shifted, items[6:].view(1, -1), types[6:].view(1, -1), torch.tensor([4]))
    expected = _forward_at_every_position(encoder, items, types)[6:]
    assert (out[0] - expected).abs().max().item() > 1e-3


def test_extend_refuses_more_new_events_than_the_window() -> None:
    encoder = _encoder(1, 3, 0)
    with pytest.raises(ValueError, match="at most W=3"):
        encoder.extend(KVCache.empty(encoder.config, 1), torch.ones(1, 4, dtype=torch.long),
                       torch.ones(1, 4, dtype=torch.long), torch.tensor([4]))
