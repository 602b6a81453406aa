"""The order and pace of training: which users share a batch (`--batching`) and the
learning rate at each step (`--lr-schedule`, `--warmup-epochs`). Tested by
tests/test_train_schedule.py; model/train.py uses them.
"""

from __future__ import annotations

import math
import random

from kvrec.model.train_command import TrainSettings


def length_grouped_batches(
    lengths: list[int], batch_size: int, rng: random.Random, pool_batches: int = 50
) -> list[list[int]]:
    """Batches of users of similar length, each about `batch_size` x (mean length) positions.

    The users are shuffled, taken `pool_batches` batches' worth at a time, sorted by length
    within that pool and cut into batches of a fixed budget of positions; the batches are then
    shuffled. A batch is then mostly real events, not padding (the transformer costs half as
    much on this data), while each position keeps about the weight it has in random batches of
    `batch_size` users and an epoch takes about as many steps."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    budget = batch_size * sum(lengths) / max(1, len(lengths))
    batches: list[list[int]] = []
    pool_size = batch_size * pool_batches
    for pool_start in range(0, len(order), pool_size):
        pool = sorted(order[pool_start : pool_start + pool_size], key=lengths.__getitem__)
        batch: list[int] = []
        positions = 0
        for user in pool:
            if batch and positions + lengths[user] > budget:
                batches.append(batch)
                batch, positions = [], 0
            batch.append(user)
            positions += lengths[user]
        if batch:
            batches.append(batch)
    rng.shuffle(batches)
    return batches


def random_batches(count: int, batch_size: int, rng: random.Random) -> list[list[int]]:
    order = list(range(count))
    rng.shuffle(order)
    return [order[start : start + batch_size] for start in range(0, count, batch_size)]


def lr_factor(epochs_done: float, settings: TrainSettings) -> float:
    """The learning rate, as a fraction of `settings.lr`, for the step that ends `epochs_done`
    epochs into training (fractional): a linear warm-up over `warmup_epochs`, then constant,
    or a cosine decay that reaches `min_lr_ratio` at the end of the last epoch."""
    if epochs_done < settings.warmup_epochs:
        return epochs_done / settings.warmup_epochs
    if settings.lr_schedule == "constant":
        return 1.0
    decay_epochs = settings.epochs - settings.warmup_epochs
    progress = min(1.0, (epochs_done - settings.warmup_epochs) / max(decay_epochs, 1e-9))
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return settings.min_lr_ratio + (1.0 - settings.min_lr_ratio) * cosine
