"""`kvrec bench train`: artifacts side by side (small synthetic models, seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.train import summarise
from model.datasets import SyntheticSpec, generate_synthetic
from model.errors import ArtifactError
from model.train import TrainSettings, train
from stream.cli import main as kvrec

SMALL = {"d_model": 16, "n_layers": 1, "n_heads": 2, "window": 8, "dropout": 0.1}


@pytest.fixture(scope="module")
def two_models(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, dict]]:
    data = generate_synthetic(SyntheticSpec(users=200, items=60, events=3000, seed=2))
    root = tmp_path_factory.mktemp("bench-train")
    models = []
    for loss, epochs in (("ce", 3), ("bce", 2)):
        settings = TrainSettings(
            loss=loss, epochs=epochs, batch_size=32, max_len=20, patience=5,
            lr_schedule="constant", warmup_epochs=0.0,
        )
        metrics = train(data, SMALL, settings, root / loss, progress=False)
        models.append((root / loss, metrics))
    return models


def test_side_by_side_reports_what_each_run_recorded(
    two_models: list[tuple[Path, dict]], tmp_path: Path
) -> None:
    out, png = tmp_path / "train.json", tmp_path / "train.png"
    args = ["bench", "train", "--models", *(str(p) for p, _ in two_models)]
    assert kvrec([*args, "--json", str(out), "--plot", str(png)]) == 0
    result = json.loads(out.read_text())
    assert result["machine"]["cores"] and png.stat().st_size > 5000
    assert [run["loss"] for run in result["runs"]] == ["ce", "bce"]
    for run, (_, metrics) in zip(result["runs"], two_models, strict=True):
        assert run["test"] == metrics["test"]
        assert run["train_seconds"] == metrics["train_seconds"]
        assert run["best_epoch"] == metrics["best_epoch"]
        assert [p["epoch"] for p in run["curve"]] == list(range(1, metrics["epochs_run"] + 1))
        assert run["popularity_test"] == metrics["popularity_test"]


def test_a_tampered_artifact_is_refused(two_models: list[tuple[Path, dict]], tmp_path: Path) -> None:
    path, _ = two_models[0]
    copy = tmp_path / "copy"
    copy.mkdir()
    for file in path.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    metrics = json.loads((copy / "metrics.json").read_text())
    metrics["test"]["ndcg@10"] = 0.99
    (copy / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(ArtifactError, match=r"metrics\.json"):
        summarise(str(copy))
