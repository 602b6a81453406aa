"""Per-user key/value caches for the tests' reference runs: one user's cache cut out of a
batch's (`split`) and batches put together from users' (`cat`). The worker never does this: its
users' caches are rows of one pool (state/kvpool.py)."""

from __future__ import annotations

import torch

from kvrec.model.encoder import KVCache


def split(cache: KVCache) -> list[KVCache]:
    """One cache per user, each with its own storage (so it can be kept alone)."""
    return [
        KVCache(
            cache.keys[:, b : b + 1].clone(),
            cache.values[:, b : b + 1].clone(),
            cache.positions[b : b + 1].clone(),
        )
        for b in range(cache.batch_size)
    ]


def cat(caches: list[KVCache]) -> KVCache:
    return KVCache(
        torch.cat([c.keys for c in caches], dim=1),
        torch.cat([c.values for c in caches], dim=1),
        torch.cat([c.positions for c in caches]),
    )
