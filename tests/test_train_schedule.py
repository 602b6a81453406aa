"""The learning-rate schedule, length-grouped batches and length-sorted evaluation."""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import replace

import pytest
import torch

from kvrec.model.config import ModelConfig
from kvrec.model.encoder import Encoder
from kvrec.model.evaluate import Split, evaluate_split
from kvrec.model.train import TrainSettings, length_grouped_batches, lr_factor, random_batches


def test_cosine_warms_up_then_decays_to_the_floor() -> None:
    settings = TrainSettings(epochs=10, lr_schedule="cosine", warmup_epochs=2, min_lr_ratio=0.1)
    assert lr_factor(0.5, settings) == pytest.approx(0.25)  # a quarter into the warm-up
    assert lr_factor(2.0, settings) == pytest.approx(1.0)  # the peak, where the decay starts
    assert lr_factor(6.0, settings) == pytest.approx(0.55)  # halfway: (1 + 0.1) / 2
    assert lr_factor(10.0, settings) == pytest.approx(0.1)  # the last step
    assert lr_factor(12.0, settings) == pytest.approx(0.1)  # never below the floor
    steps = [lr_factor(2 + 8 * i / 100, settings) for i in range(101)]
    assert all(a >= b for a, b in itertools.pairwise(steps))  # monotone decay


def test_constant_schedule_keeps_the_peak_after_warm_up() -> None:
    settings = TrainSettings(epochs=10, lr_schedule="constant", warmup_epochs=1)
    assert lr_factor(0.5, settings) == pytest.approx(0.5)
    assert lr_factor(1.0, settings) == 1.0 and lr_factor(9.9, settings) == 1.0
    assert lr_factor(0.1, replace(settings, warmup_epochs=0.0)) == 1.0


def _lengths(count: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [min(100, int(rng.paretovariate(1.2))) for _ in range(count)]  # long tail, like clicks


def test_length_batches_hold_every_user_once_with_little_padding() -> None:
    lengths = _lengths(5000, seed=1)
    batches = length_grouped_batches(lengths, batch_size=64, rng=random.Random(0))
    assert sorted(u for b in batches for u in b) == list(range(len(lengths)))

    def padded(batch_list: list[list[int]]) -> int:
        return sum(len(b) * max(lengths[u] for u in b) for b in batch_list)

    shuffled = random_batches(len(lengths), 64, random.Random(0))
    assert padded(batches) < 0.5 * padded(shuffled)  # random batches pad to their longest user
    # about as many steps as random batches, each about 64 x (mean length) positions
    assert abs(len(batches) - len(shuffled)) <= 0.1 * len(shuffled)
    budget = 64 * sum(lengths) / len(lengths)
    assert all(sum(lengths[u] for u in b) <= budget or len(b) == 1 for b in batches)


def test_length_batches_change_from_epoch_to_epoch_and_repeat_with_the_seed() -> None:
    lengths = _lengths(2000, seed=2)
    rng_a, rng_b = random.Random(5), random.Random(5)
    first_a = length_grouped_batches(lengths, 32, rng_a)
    assert first_a == length_grouped_batches(lengths, 32, rng_b)
    assert length_grouped_batches(lengths, 32, rng_a) != first_a


def test_evaluation_does_not_depend_on_the_order_of_users() -> None:
    torch.manual_seed(0)
    encoder = Encoder(ModelConfig(n_items=40, d_model=16, n_heads=2, window=4)).eval()
    rng = random.Random(3)
    inputs = [[rng.randint(1, 40) for _ in range(rng.randint(1, 30))] for _ in range(300)]
    targets = [rng.randint(1, 40) for _ in inputs]
    split = Split([str(u) for u in range(300)], inputs, [[1] * len(i) for i in inputs], targets)
    order = list(range(300))
    rng.shuffle(order)
    shuffled = Split(
        [split.users[u] for u in order], [inputs[u] for u in order],
        [split.input_types[u] for u in order], [targets[u] for u in order],
    )
    first = evaluate_split(encoder, split, max_len=20, batch_size=64)
    second = evaluate_split(encoder, shuffled, max_len=20, batch_size=64)
    assert first == pytest.approx(second, abs=1e-12)
    assert not math.isnan(first["ndcg@10"])
