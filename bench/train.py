"""`kvrec bench train`: trained model artifacts side by side.

    kvrec bench train --models artifacts/ce artifacts/bce artifacts/sampled \\
        --json bench/results/train-2core.json --plot bench/results/train-2core.png

Reads what each `kvrec train` run recorded in its artifact (every artifact is verified against
its manifest first): the loss and the model's shape, the best epoch, the training time, the
validation curve and the full-ranking test metrics with the popularity baseline. Writes one
JSON object, and a plot of validation NDCG@10 against epochs and against training seconds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench.machine import machine_info
from model.artifact import load_artifact


def summarise(path: str) -> dict[str, Any]:
    artifact = load_artifact(path)
    training = json.loads((artifact.path / "config.json").read_text()).get("training", {})
    metrics = artifact.metrics
    return {
        "model": str(path),
        "model_version": artifact.version,
        "loss": training.get("loss"),
        "config": artifact.config.to_dict(),
        "training": training,
        "best_epoch": metrics["best_epoch"],
        "epochs_run": metrics["epochs_run"],
        "train_seconds": metrics["train_seconds"],
        "validation": metrics["validation"],
        "test": metrics["test"],
        "popularity_test": metrics["popularity_test"],
        "users": metrics["users"],
        "curve": [
            {"epoch": h["epoch"], "seconds": h["seconds"], "val_ndcg@10": h["val_ndcg@10"]}
            for h in metrics["history"]
            if "val_ndcg@10" in h
        ],
    }


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_epoch, by_time) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for run in runs:
        label = (
            f"{run['loss']} d={run['config']['d_model']}: "
            f"test NDCG@10 {run['test']['ndcg@10']:.4f}"
        )
        epochs = [point["epoch"] for point in run["curve"]]
        seconds = [point["seconds"] for point in run["curve"]]
        ndcg = [point["val_ndcg@10"] for point in run["curve"]]
        by_epoch.plot(epochs, ndcg, marker="o", markersize=2, label=label)
        by_time.plot(seconds, ndcg, marker="o", markersize=2, label=label)
    popularity = runs[0]["popularity_test"]["ndcg@10"]
    for axis in (by_epoch, by_time):
        axis.axhline(popularity, color="grey", linestyle=":", label="popularity (test)")
        axis.grid(alpha=0.3)
    by_epoch.set_xlabel("epoch")
    by_time.set_xlabel("training seconds")
    by_epoch.set_ylabel("validation NDCG@10 (full ranking)")
    by_time.legend(fontsize=8, loc="lower right")
    figure.suptitle("kvrec: the losses side by side")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", required=True, help="model artifact directories")
    parser.add_argument("--json", required=True, help="write the comparison here")
    parser.add_argument("--plot", default=None, help="PNG of the validation curves")


def main(args: argparse.Namespace) -> int:
    runs = [summarise(path) for path in args.models]
    result = {"benchmark": "train", "machine": machine_info(), "runs": runs}
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    if args.plot:
        plot(runs, Path(args.plot))
    for run in runs:
        print(
            f"{run['loss']:8s} d={run['config']['d_model']:<4d} "
            f"test NDCG@10 {run['test']['ndcg@10']:.4f} HR@10 {run['test']['hr@10']:.4f}  "
            f"best epoch {run['best_epoch']}/{run['epochs_run']}  {run['train_seconds']:.0f} s"
        )
    return 0
