"""`kvrec bench reference`: the SASRec + full-CE baseline and its batching."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from kvrec.bench.reference_sasrec import (
    ReferenceSASRec,
    ReferenceSettings,
    UserSampler,
    batch_step,
    full_ce_loss,
    training_batch,
)
from kvrec.stream.cli import main as kvrec


def _model(seed: int = 0) -> ReferenceSASRec:
    torch.manual_seed(seed)
    return ReferenceSASRec(30, ReferenceSettings(hidden=8, heads=2, max_len=12, dropout=0.3)).eval()


def test_the_defaults_are_the_public_runs_settings() -> None:
    settings = ReferenceSettings()
    assert (settings.max_len, settings.hidden, settings.blocks, settings.heads) == (50, 50, 2, 1)
    assert (settings.dropout, settings.lr, settings.batch_size) == (0.5, 1e-3, 128)


def test_every_input_is_padded_to_max_len_and_cut_to_its_newest_events() -> None:
    model = _model()
    items = torch.tensor([[3, 4, 5, 6]])
    padded = torch.tensor([[0, 0, 0, 3, 4, 5, 6]])
    with torch.no_grad():
        assert model(items).shape == (1, 12, 8)
        torch.testing.assert_close(model(items), model(padded))
        long = torch.arange(1, 21).view(1, -1)
        torch.testing.assert_close(model(long), model(long[:, -12:]))


def test_padding_rows_are_zero_after_the_embedding_and_every_block() -> None:
    """pmixer's timeline mask: padding rows stay zero, so a real position attending to them
    sees only the projections' biases."""
    model = _model()
    seen: list[torch.Tensor] = []
    for block in model.blocks:
        block.register_forward_hook(lambda _m, _i, out: seen.append(out))
    with torch.no_grad():
        model(torch.tensor([[3, 4, 5], [7, 8, 9]]))
    assert len(seen) == 2
    for out in seen:
        assert torch.count_nonzero(out[:, :9]) == 0 and torch.count_nonzero(out[:, 9:]) > 0


def _blocks_output(model: ReferenceSASRec, items: torch.Tensor, mask_padding_keys: bool) -> torch.Tensor:
    """The blocks run on the model's own embedding, with or without padding keys masked."""
    real = (items != 0).unsqueeze(-1)
    positions = torch.arange(1, model.max_len + 1) * real.squeeze(-1)
    x = model.item_embedding(items) * model.item_embedding.embedding_dim ** 0.5
    x = (x + model.position_embedding(positions)) * real
    blocked = ~torch.ones(model.max_len, model.max_len, dtype=torch.bool).tril()
    if mask_padding_keys:
        blocked = (blocked | ~real.squeeze(-1)[:, None, :]) & ~torch.eye(model.max_len, dtype=torch.bool)
        blocked = blocked.repeat_interleave(2, dim=0)  # heads
    for block in model.blocks:
        x = block(x, blocked, real)
    return model.last_norm(x)


def test_real_positions_attend_to_the_padding_before_them() -> None:
    """Unmasked padding keys (as in pmixer): a short history's output is not what it would be
    with padding keys masked out; a full window has no padding, so the two agree."""
    model = _model()
    short = torch.tensor([[0] * 9 + [3, 4, 5]])
    full = torch.arange(1, 13).view(1, -1)
    with torch.no_grad():
        torch.testing.assert_close(model(short), _blocks_output(model, short, False))
        assert not torch.allclose(model(short)[:, -1], _blocks_output(model, short, True)[:, -1])
        torch.testing.assert_close(model(full), _blocks_output(model, full, True))


def test_the_sampler_takes_every_user_once_a_pass_and_skips_short_ones() -> None:
    sequences = [[1, 2], [3], [4, 5, 6], [7, 8], [9, 10]]
    sampler = UserSampler(sequences, np.random.default_rng(0))
    first = sampler.batch(5)
    assert all(len(sequences[u]) >= 2 for u in first)
    assert {0, 2, 3, 4} <= set(first.tolist())  # one pass: each user once, 1 replaced
    second = sampler.batch(5)
    assert {0, 2, 3, 4} <= set(second.tolist())


def test_training_batch_is_the_last_max_len_events_and_their_next_items() -> None:
    inputs, targets = training_batch([[1, 2, 3], list(range(1, 21))], np.array([0, 1]), 12)
    assert inputs.shape == targets.shape == (2, 12)
    assert inputs[0].tolist() == [0] * 10 + [1, 2] and targets[0].tolist() == [0] * 10 + [2, 3]
    assert inputs[1].tolist() == list(range(8, 20)) and targets[1].tolist() == list(range(9, 21))


def test_the_batch_step_gradient_is_the_mean_cross_entropy_over_real_positions() -> None:
    rng = np.random.default_rng(3)
    sequences = [list(rng.integers(1, 31, n)) for n in (2, 3, 5, 9, 14, 20, 4, 2)]
    chosen = np.array([0, 5, 2, 2, 7, 4, 1, 6, 3])
    whole, stepped = _model(), _model()
    inputs, targets = training_batch(sequences, chosen, 12)
    full_ce_loss(whole, whole(inputs), targets).backward()
    batch_step(stepped, sequences, chosen, 12)
    for (name, a), (_, b) in zip(whole.named_parameters(), stepped.named_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=name, atol=1e-6, rtol=1e-5)


def test_bench_reference_writes_its_result(tmp_path: Path) -> None:
    out = tmp_path / "reference.json"
    code = kvrec([
        "bench", "reference", "--format", "synthetic", "--synthetic-users", "300",
        "--synthetic-items", "60", "--synthetic-events", "4000", "--seed", "1", "--hidden", "16",
        "--max-len", "20", "--batch-size", "16", "--epochs", "6", "--patience", "6", "--dropout", "0.1",
        "--json", str(out),
    ])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["settings"]["hidden"] == 16 and result["settings"]["epochs"] == 6
    assert 1 <= result["best_epoch"] <= result["epochs_run"] <= 6
    assert len(result["history"]) == result["epochs_run"]
    best = max(result["history"], key=lambda h: h["val_ndcg@10"])
    assert result["validation"]["ndcg@10"] == best["val_ndcg@10"]
    for split in ("test", "validation", "popularity_test"):
        assert 0.0 <= result[split]["ndcg@10"] <= result[split]["hr@10"] <= 1.0
    assert result["machine"]["cores"] >= 1 and result["train_seconds"] > 0
    # the synthetic data follows item successors: the sequence model beats popularity
    assert result["test"]["ndcg@10"] > result["popularity_test"]["ndcg@10"]
