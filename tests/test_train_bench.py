"""`kvrec bench train`: artifacts side by side (small synthetic models, seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvrec.bench.train import kvrec_run, summarise
from kvrec.errors import ArtifactError, DataError
from kvrec.model.datasets import SyntheticSpec, generate_synthetic
from kvrec.model.train import TrainSettings, train
from kvrec.stream.cli import main as kvrec

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


def test_datasets_side_by_side(two_models: list[tuple[Path, dict]], tmp_path: Path) -> None:
    reference = tmp_path / "reference.json"
    assert kvrec([
        "bench", "reference", "--format", "synthetic", "--synthetic-users", "200",
        "--synthetic-items", "60", "--synthetic-events", "3000", "--seed", "2", "--hidden", "16",
        "--max-len", "20", "--epochs", "2", "--json", str(reference),
    ]) == 0
    ce, ce_metrics = two_models[0]
    one_run = tmp_path / "ce.json"
    assert kvrec(["bench", "train", "--models", str(ce), "--json", str(one_run)]) == 0
    out = tmp_path / "datasets.json"
    assert kvrec([
        "bench", "train", "--json", str(out),
        "--dataset", "syn-a", str(ce), str(reference),
        "--dataset", "syn-b", f"{one_run}@{ce}", "-",
        "--dataset", "syn-c", "-", str(reference),
    ]) == 0
    result = json.loads(out.read_text())
    a, b, c = result["datasets"]
    ref = json.loads(reference.read_text())
    assert a["kvrec"]["test_ndcg@10"] == ce_metrics["test"]["ndcg@10"]
    assert a["kvrec"]["train_seconds"] == ce_metrics["train_seconds"]
    assert a["kvrec"]["val_test_gap_ndcg@10"] == pytest.approx(
        ce_metrics["validation"]["ndcg@10"] - ce_metrics["test"]["ndcg@10"]
    )
    assert a["reference"]["test_hr@10"] == ref["test"]["hr@10"]
    assert a["kvrec_over_reference_ndcg@10"] == pytest.approx(
        ce_metrics["test"]["ndcg@10"] / ref["test"]["ndcg@10"]
    )
    # the same split: popularity measured by kvrec train and by the reference agree
    assert ref["popularity_test"] == ce_metrics["popularity_test"] and a["popularity_agrees"]
    assert b["kvrec"] == {**a["kvrec"], "source": f"{one_run}@{ce}"} and b["reference"] is None
    assert c["kvrec"] is None and c["popularity"]["test_ndcg@10"] == ref["popularity_test"]["ndcg@10"]
    assert "| syn-b |" in result["table"] and result["table"].count("\n") == 4
    with pytest.raises(DataError):
        kvrec_run(f"{one_run}@elsewhere")
    assert kvrec(["bench", "train", "--json", str(out)]) == 2  # neither --models nor --dataset


def test_the_reference_is_the_candidate_best_on_validation(tmp_path: Path) -> None:
    runs = []
    for name, epochs, dropout in (("short", "1", "0.0"), ("long", "3", "0.2")):
        runs.append(tmp_path / f"{name}.json")
        assert kvrec([
            "bench", "reference", "--format", "synthetic", "--synthetic-users", "200",
            "--synthetic-items", "60", "--synthetic-events", "3000", "--seed", "2", "--hidden",
            "16", "--max-len", "20", "--epochs", epochs, "--dropout", dropout,
            "--json", str(runs[-1]),
        ]) == 0
    recorded = [json.loads(run.read_text()) for run in runs]
    validation = [r["validation"]["ndcg@10"] for r in recorded]
    assert validation[0] != validation[1]
    best = max(range(2), key=validation.__getitem__)
    out = tmp_path / "datasets.json"
    for order in (runs, runs[::-1]):
        assert kvrec(["bench", "train", "--json", str(out),
                      "--dataset", "syn", "-", ",".join(map(str, order))]) == 0
        row = json.loads(out.read_text())["datasets"][0]
        assert row["reference"]["source"] == str(runs[best])
        assert row["reference"]["test_ndcg@10"] == recorded[best]["test"]["ndcg@10"]
        assert row["reference"]["settings"]["dropout"] == recorded[best]["settings"]["dropout"]
        assert [c["val_ndcg@10"] for c in row["reference_candidates"]] == [
            json.loads(run.read_text())["validation"]["ndcg@10"] for run in order]
