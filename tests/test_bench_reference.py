"""`kvrec bench reference`: the SASRec + full-CE baseline and its batching."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from kvrec.bench.reference_sasrec import (
    ReferenceSASRec,
    ReferenceSettings,
    batch_step,
    full_ce_loss,
    length_chunks,
    training_batch,
)
from kvrec.stream.cli import main as kvrec


def _model(seed: int = 0) -> ReferenceSASRec:
    torch.manual_seed(seed)
    return ReferenceSASRec(30, ReferenceSettings(hidden=8, heads=2, max_len=12, dropout=0.3)).eval()


def test_a_real_positions_output_does_not_depend_on_padding() -> None:
    model = _model()
    items = torch.tensor([[3, 4, 5, 6]])
    padded = torch.tensor([[0, 0, 0, 3, 4, 5, 6]])
    with torch.no_grad():
        torch.testing.assert_close(model(items), model(padded)[:, 3:])
        # longer than max_len: only the newest max_len events count
        long = torch.arange(1, 21).view(1, -1)
        torch.testing.assert_close(model(long)[:, -1], model(long[:, -12:])[:, -1])


def test_chunked_batch_gives_the_gradient_of_the_batch_padded_as_one() -> None:
    rng = np.random.default_rng(3)
    sequences = [list(rng.integers(1, 31, n)) for n in (2, 3, 5, 9, 14, 20, 4, 2)]
    chosen = np.array([0, 5, 2, 2, 7, 4, 1, 6, 3])
    whole, chunked = _model(), _model()
    inputs, targets = training_batch(sequences, chosen, 12)
    full_ce_loss(whole, whole(inputs), targets).backward()
    assert len(length_chunks([min(len(sequences[u]), 13) - 1 for u in chosen], budget=8)) > 1
    import kvrec.bench.reference_sasrec as reference

    original = reference.CHUNK_POSITIONS
    try:
        reference.CHUNK_POSITIONS = 8
        batch_step(chunked, sequences, chosen, 12)
    finally:
        reference.CHUNK_POSITIONS = original
    for (name, a), (_, b) in zip(whole.named_parameters(), chunked.named_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=name, atol=1e-6, rtol=1e-5)


def test_bench_reference_writes_its_result(tmp_path: Path) -> None:
    out = tmp_path / "reference.json"
    code = kvrec([
        "bench", "reference", "--format", "synthetic", "--synthetic-users", "300",
        "--synthetic-items", "60", "--synthetic-events", "4000", "--seed", "1", "--hidden", "16",
        "--max-len", "20", "--batch-size", "16", "--epochs", "6", "--patience", "6",
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
