"""The training options of issue 16's recipe screens: item noise, the contrastive term, label
smoothing, future targets and cosine scoring, each recorded in the artifact it trains."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvrec.model.artifact import load_artifact
from kvrec.model.train import (
    TrainSettings,
    contrastive_loss,
    future_targets,
    replace_items,
    same_target_partners,
    sequences_by_last_item,
    target_distribution,
)
from kvrec.stream.cli import main as kvrec


def test_item_noise_replaces_real_items_at_its_rate_and_never_padding() -> None:
    torch.manual_seed(0)
    items = torch.tensor([[0, 0, 3, 4, 5, 6, 7, 8]] * 2000)
    noisy = replace_items(items, 0.3, 50)
    assert torch.equal(noisy[:, :2], items[:, :2])  # padding stays padding
    assert int(noisy.min()) >= 0 and int(noisy.max()) <= 50 and bool((noisy[:, 2:] != 0).all())
    changed = (noisy != items)[:, 2:].float().mean().item()
    assert changed == pytest.approx(0.3 * 49 / 50, abs=0.01)  # a draw may give the same item
    assert torch.equal(replace_items(items, 0.0, 50), items)


def test_contrastive_loss_is_low_for_matching_views_and_symmetric() -> None:
    generator = torch.Generator().manual_seed(1)
    first = torch.randn(32, 16, generator=generator)
    second = first + 0.01 * torch.randn(32, 16, generator=generator)
    matched = contrastive_loss(first, second, 0.2)
    shuffled = contrastive_loss(first, second[torch.randperm(32, generator=generator)], 0.2)
    assert matched.item() < 1.0 < 3.0 < shuffled.item()  # log(32) = 3.47 is chance
    assert torch.allclose(matched, contrastive_loss(second, first, 0.2))


def test_same_target_partners_share_the_last_item_and_are_other_users_where_there_are() -> None:
    import random

    last_items = [5, 7, 5, 9, 5, 7, 3]
    by_item = sequences_by_last_item(last_items)
    assert by_item == {5: [0, 2, 4], 7: [1, 5], 9: [3], 3: [6]}
    rng = random.Random(0)
    for _ in range(50):
        batch = rng.sample(range(len(last_items)), 4)
        partners = same_target_partners(last_items, by_item, batch, rng)
        for index, partner in zip(batch, partners, strict=True):
            assert last_items[partner] == last_items[index]
            assert (partner == index) == (last_items.count(last_items[index]) == 1)
    drawn = {same_target_partners(last_items, by_item, [0], rng)[0] for _ in range(100)}
    assert drawn == {2, 4}  # every other sequence with the same last item, at random


def test_contrastive_loss_leaves_rows_marked_same_out_of_the_negatives() -> None:
    generator = torch.Generator().manual_seed(2)
    first = torch.randn(8, 16, generator=generator)
    second = first.clone()
    second[1] = first[0]  # rows 0 and 1 are the same in the second view
    same = torch.zeros(8, 8, dtype=torch.bool)
    same[0, 1] = same[1, 0] = True
    assert contrastive_loss(first, second, 0.1, same) < contrastive_loss(first, second, 0.1)
    assert torch.allclose(contrastive_loss(first, first, 0.1, torch.zeros(8, 8, dtype=torch.bool)),
                          contrastive_loss(first, first, 0.1))


def test_the_options_train_and_are_recorded_in_the_artifact(tmp_path: Path) -> None:
    out = tmp_path / "model"
    assert kvrec([
        "train", "--format", "synthetic", "--synthetic-users", "150", "--synthetic-items", "40",
        "--synthetic-events", "2000", "--epochs", "2", "--d-model", "16", "--window", "4",
        "--max-len", "20", "--item-noise", "0.1", "--contrastive-weight", "0.1",
        "--label-smoothing", "0.1", "--similarity", "cosine", "--temperature", "0.1",
        "--block", "hstu", "--contrastive-positives", "same-target", "--future-weight", "0.3",
        "--future-items", "2", "--last-target-weight", "2", "--out", str(out),
    ]) == 0
    config = json.loads((out / "config.json").read_text())
    training = config["training"]
    assert (training["item_noise"], training["contrastive_weight"], training["label_smoothing"]) \
        == (0.1, 0.1, 0.1)
    assert config["model"]["similarity"] == "cosine" and config["model"]["temperature"] == 0.1
    assert config["model"]["block"] == "hstu"
    assert training["contrastive_positives"] == "same-target"
    assert (training["future_weight"], training["future_items"]) == (0.3, 2)
    assert training["last_target_weight"] == 2.0
    assert load_artifact(out).config.block == "hstu"  # and it loads as what it trained
    assert kvrec(["train", "--format", "synthetic", "--label-smoothing", "0.1", "--exclude-seen",
                  "--out", str(tmp_path / "refused")]) == 2
    assert kvrec(["train", "--format", "synthetic", "--loss", "bce", "--label-smoothing", "0.1",
                  "--out", str(tmp_path / "refused")]) == 2
    assert kvrec(["train", "--format", "synthetic", "--loss", "sampled", "--future-weight", "0.2",
                  "--out", str(tmp_path / "refused")]) == 2


def test_the_weight_average_follows_the_weights_and_swaps_in_and_out() -> None:
    from kvrec.model.averaging import WeightAverage

    model = torch.nn.Linear(3, 2)
    start = model.weight.detach().clone()
    average = WeightAverage(model, decay=0.75)
    with torch.no_grad():
        model.weight.add_(4.0)
    average.update()
    assert torch.allclose(average.averages[0], start + 1.0)  # 0.75 * w + 0.25 * (w + 4)
    with average.swapped_in():
        assert torch.allclose(model.weight, start + 1.0)
    assert torch.allclose(model.weight, start + 4.0)  # its own weights again
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(model, decay=1.0)


def test_training_with_a_weight_average_publishes_the_average(tmp_path: Path) -> None:
    """Validation, the best state and the artifact are the averaged weights: a decay near 1
    barely leaves the initial weights, so the model stays near chance."""
    common = ["train", "--format", "synthetic", "--synthetic-users", "150",
              "--synthetic-items", "40", "--synthetic-events", "2000", "--epochs", "2",
              "--d-model", "16", "--window", "4", "--max-len", "20", "--threads", "1"]
    assert kvrec([*common, "--out", str(tmp_path / "plain")]) == 0
    assert kvrec([*common, "--ema-decay", "0.9999", "--out", str(tmp_path / "slow")]) == 0
    plain = json.loads((tmp_path / "plain" / "metrics.json").read_text())
    slow = json.loads((tmp_path / "slow" / "metrics.json").read_text())
    assert json.loads((tmp_path / "slow" / "config.json").read_text())["training"]["ema_decay"] \
        == 0.9999
    assert slow["validation"]["ndcg@10"] < plain["validation"]["ndcg@10"]


@given(lengths=st.lists(st.integers(0, 9), min_size=1, max_size=6),
       horizon=st.integers(0, 12), weight=st.floats(0.0, 0.95))
@settings(max_examples=150, deadline=None)
def test_future_targets_are_the_items_that_follow_each_position_in_its_own_sequence(
    lengths: list[int], horizon: int, weight: float
) -> None:
    width = 10
    rows = [[0] * (width - n) + [100 * r + i + 1 for i in range(n)] for r, n in enumerate(lengths)]
    targets = torch.tensor(rows)
    distribution, weights = future_targets(targets, horizon, weight)
    assert distribution.shape == weights.shape == (len(rows), width, 1 + horizon)
    for r, row in enumerate(rows):
        for t in range(width):
            if row[t] == 0:
                continue  # padding positions carry no loss
            later = [item for item in row[t + 1 : t + 1 + horizon]]
            got = distribution[r, t].tolist()
            assert got[0] == row[t] and got[1 : 1 + len(later)] == later
            assert all(item == 0 for item in got[1 + len(later):])
            share = weights[r, t].tolist()
            assert abs(sum(share) - 1.0) < 1e-5
            if later:
                assert abs(share[0] - (1.0 - weight)) < 1e-6
                assert all(abs(s - weight / len(later)) < 1e-6 for s in share[1 : 1 + len(later)])
            else:
                assert share[0] == 1.0
            assert all(s == 0.0 for s in share[1 + len(later):])


def test_the_last_target_weight_scales_each_users_most_recent_position_only() -> None:
    targets = torch.tensor([[0, 0, 4, 5, 6], [1, 2, 3, 4, 5]])
    plain = target_distribution(targets, TrainSettings(future_weight=0.2, future_items=2))
    weighted = target_distribution(
        targets, TrainSettings(future_weight=0.2, future_items=2, last_target_weight=3.0))
    assert torch.equal(plain[0], weighted[0])
    assert torch.allclose(weighted[1][:, :-1], plain[1][:, :-1])
    assert torch.allclose(weighted[1][:, -1], 3.0 * plain[1][:, -1])
    assert torch.allclose(plain[1][:, -1].sum(dim=-1), torch.ones(2))  # all on the next item
    alone = target_distribution(targets, TrainSettings(last_target_weight=2.0))
    assert torch.equal(alone[0], targets.unsqueeze(-1))  # no future weight: the next item only
    assert torch.equal(alone[1][:, :-1], torch.ones(2, 4, 1))
    assert torch.equal(alone[1][:, -1], torch.full((2, 1), 2.0))
