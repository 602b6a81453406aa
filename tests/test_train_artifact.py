"""Training, evaluation and the model artifact (small synthetic data, seconds)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kvrec.errors import ArtifactError, ConfigError
from kvrec.model.artifact import load_artifact
from kvrec.model.datasets import SyntheticSpec, generate_synthetic
from kvrec.model.evaluate import metrics_from_ranks, rank_targets
from kvrec.model.train import TrainSettings, train

SMALL = {"d_model": 32, "n_layers": 2, "n_heads": 2, "window": 8, "dropout": 0.1}
FLAT = {"lr_schedule": "constant", "warmup_epochs": 0.0}  # a few epochs: no warm-up, no decay


def _train(out: Path, seed: int = 0, epochs: int = 4) -> dict:
    data = generate_synthetic(SyntheticSpec(users=300, items=120, events=6000, seed=1))
    settings = TrainSettings(
        epochs=epochs, batch_size=64, max_len=30, seed=seed, patience=10, **FLAT
    )
    plot = out.parent / f"{out.name}.png"
    return train(data, SMALL, settings, out, plot_path=plot, progress=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("train") / "model"
    return out, _train(out)


def test_model_beats_popularity_on_sequential_data(trained: tuple[Path, dict]) -> None:
    _, metrics = trained
    assert metrics["test"]["ndcg@10"] > 1.5 * metrics["popularity_test"]["ndcg@10"]


def test_training_writes_a_complete_artifact_and_a_curve(trained: tuple[Path, dict]) -> None:
    out, metrics = trained
    artifact = load_artifact(out)
    assert artifact.config.window == 8 and artifact.version
    assert (out.parent / "model.png").stat().st_size > 1000
    assert artifact.metrics["test"] == metrics["test"]
    assert len(artifact.item_ids) == artifact.config.n_items + 1 and artifact.item_ids[0] == ""


def test_same_seed_gives_identical_weights(tmp_path: Path) -> None:
    first = load_artifact(_train(tmp_path / "a", seed=3, epochs=1) and tmp_path / "a")
    second = load_artifact(_train(tmp_path / "b", seed=3, epochs=1) and tmp_path / "b")
    for (name, a), (_, b) in zip(
        first.encoder.state_dict().items(), second.encoder.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_tampered_weights_are_refused(trained: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = trained
    copy = tmp_path / "copy"
    copy.mkdir()
    for file in out.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    weights = copy / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256 does not match"):
        load_artifact(copy)
    weights.write_bytes((out / "weights.safetensors").read_bytes())
    (copy / "vocab.json").unlink()
    with pytest.raises(ArtifactError) as refused:
        load_artifact(copy)
    assert str(refused.value) == (
        f"{copy}: vocab.json is missing, so this is not a whole model artifact: copy the whole "
        "directory again, or write a new one with `kvrec train --out DIR` (`kvrec export` "
        "writes only an ONNX file)"
    )
    (copy / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match=r"manifest\.json is missing"):
        load_artifact(copy)


def test_cli_refuses_a_bad_model_in_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kvrec.stream.cli", "eval", "--model", str(tmp_path), "--format",
         "synthetic"],
        capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("kvrec: error:") and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_eval_cli_prints_the_documented_json(trained: tuple[Path, dict]) -> None:
    out, _ = trained
    result = subprocess.run(
        [sys.executable, "-m", "kvrec.stream.cli", "eval", "--model", str(out), "--format", "synthetic",
         "--synthetic-users", "300", "--synthetic-items", "120", "--synthetic-events", "6000",
         "--seed", "1", "--json"],
        capture_output=True, text=True, check=True,
    )
    report = json.loads(result.stdout)
    for key in ("hr@10", "ndcg@10", "hr@20", "ndcg@20"):
        assert 0.0 <= report[key] <= 1.0 and key in report["popularity"]
    assert report["users"] > 0


def test_full_ranking_excludes_history_but_never_the_target() -> None:
    # 6 items (index 0 = padding). Scores rise with the index.
    scores = torch.tensor([[0.0, 1, 2, 3, 4, 5, 6]] * 3)
    histories = [[6, 5], [3, 6], []]
    targets = torch.tensor([4, 6, 1])
    ranks = rank_targets(scores, histories, targets)
    # user 0: 6 and 5 left out, target 4 is best -> rank 0
    # user 1: target 6 is also in the history but never left out -> rank 0
    # user 2: nothing left out; items 2..6 beat item 1 -> rank 5
    assert ranks.tolist() == [0, 0, 5]
    metrics = metrics_from_ranks(np.array([0, 0, 5, 30]))
    assert metrics["hr@10"] == 0.75
    assert metrics["ndcg@10"] == pytest.approx((1 + 1 + 1 / np.log2(7)) / 4)


def test_max_len_shorter_than_the_model_reach_is_refused(tmp_path: Path) -> None:
    data = generate_synthetic(SyntheticSpec(users=20, items=10, events=200, seed=1))
    settings = TrainSettings(epochs=1, max_len=10)  # 2 layers x (8 - 1) + 1 = 15 > 10
    with pytest.raises(ConfigError, match="--max-len 15"):
        train(data, SMALL, settings, tmp_path / "m", progress=False)


def test_init_from_continues_from_the_earlier_weights(trained: tuple[Path, dict], tmp_path: Path) -> None:
    out, metrics = trained
    data = generate_synthetic(SyntheticSpec(users=300, items=120, events=6000, seed=1))
    frozen = TrainSettings(epochs=1, batch_size=64, max_len=30, lr=0.0, init_from=out, **FLAT)
    again = train(data, SMALL, frozen, tmp_path / "again", progress=False)
    assert again["test"] == metrics["test"]  # lr 0: exactly the earlier model
    assert again["train_seconds_with_earlier_runs"] > metrics["train_seconds"]
    other = generate_synthetic(SyntheticSpec(users=300, items=150, events=6000, seed=2))
    train(other, SMALL, frozen, tmp_path / "other", progress=False)  # a grown catalog
    earlier_ids = load_artifact(out).item_ids
    assert load_artifact(tmp_path / "other").item_ids[: len(earlier_ids)] == earlier_ids
    with pytest.raises(ConfigError, match="model shape differs \\(d_model\\)"):
        train(data, {**SMALL, "d_model": 16}, frozen, tmp_path / "shape", progress=False)
    with pytest.raises(ConfigError, match="model shape differs \\(similarity\\)"):
        train(data, {**SMALL, "similarity": "cosine"}, frozen, tmp_path / "scoring", progress=False)
    with pytest.raises(ConfigError, match="model shape differs \\(block\\)"):
        train(data, {**SMALL, "block": "hstu"}, frozen, tmp_path / "block", progress=False)


def test_sigterm_stops_training_and_still_publishes_the_best_weights(tmp_path: Path) -> None:
    import signal
    import time

    out = tmp_path / "model"
    process = subprocess.Popen(
        [sys.executable, "-m", "kvrec.stream.cli", "train", "--format", "synthetic",
         "--synthetic-users", "300", "--synthetic-items", "120", "--synthetic-events", "6000",
         "--d-model", "16", "--window", "8", "--max-len", "30", "--epochs", "500",
         "--patience", "500", "--threads", "1", "--out", str(out)],
        cwd=Path(__file__).parent.parent, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        text=True,
    )
    deadline = time.monotonic() + 120
    lines = []
    while time.monotonic() < deadline:  # wait for the first validated epoch
        line = process.stdout.readline()
        lines.append(line)
        if "val_ndcg@10" in line or not line:
            break
    process.send_signal(signal.SIGTERM)
    rest, _ = process.communicate(timeout=120)
    output = "".join(lines) + rest
    assert process.returncode == 0, output
    assert "interrupted: stopping early" in output
    summary = json.loads(output.strip().splitlines()[-1])
    assert summary["best_epoch"] >= 1 and load_artifact(out).metrics["epochs_run"] < 500
