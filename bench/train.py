"""`kvrec bench train`: trained model artifacts side by side, or datasets side by side.

    kvrec bench train --models artifacts/ce artifacts/bce artifacts/sampled \\
        --json bench/results/train-2core.json --plot bench/results/train-2core.png

Reads what each `kvrec train` run recorded in its artifact (every artifact is verified against
its manifest first): the loss and the model's shape, the best epoch, the training time, the
validation curve and the full-ranking test metrics with the popularity baseline. Writes one
JSON object, and a plot of validation NDCG@10 against epochs and against training seconds.

    kvrec bench train --dataset amazon-beauty artifacts/beauty \\
            bench/results/quality-amazon-beauty-reference.json \\
        --dataset amazon-games bench/results/train-2core.json@artifacts/ce-d128-cos \\
            bench/results/quality-amazon-games-reference.json \\
        --json bench/results/quality-datasets.json

Datasets side by side (`--dataset NAME KVREC REFERENCE`, once per dataset): for each, test
NDCG@10 and HR@10 of kvrec, of the reference SASRec + full CE (`kvrec bench reference`) and
of popularity, kvrec / reference, training seconds, best and last epoch, and the
validation-test gap (validation NDCG@10 at the chosen epoch minus test NDCG@10). KVREC is an
artifact directory, a JSON written by `--models` for one artifact, or such a JSON's run
`FILE.json@MODEL` (its `model` field); REFERENCE is a `kvrec bench reference` JSON, or several
separated by commas (runs with different settings): the one with the best validation NDCG@10
is the reference, the rule applied to every dataset alike (test never chooses), and the row
lists every candidate. Either may be `-` when that run has no result; the table then says so.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from kvrec.bench.machine import machine_info, machine_line
from kvrec.errors import ConfigError, DataError
from kvrec.model.artifact import load_artifact


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
            f"{Path(run['model']).name} ({run['loss']} d={run['config']['d_model']}): "
            f"val {run['validation']['ndcg@10']:.4f}, test {run['test']['ndcg@10']:.4f}"
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
    by_time.legend(fontsize=7, loc="lower right")
    figure.suptitle(f"kvrec: training runs side by side; {machine_line(machine_info())}",
                    fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def kvrec_run(source: str) -> dict[str, Any]:
    """A kvrec run's summary from an artifact directory, a one-run `--models` JSON, or
    `FILE.json@MODEL`."""
    file, _, model = source.partition("@")
    if Path(file).is_dir():
        return summarise(file)
    try:
        recorded = json.loads(Path(file).read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{file}: cannot read a kvrec run ({exc})") from None
    runs = recorded.get("runs", [recorded])
    chosen = [run for run in runs if not model or run.get("model") == model]
    if len(chosen) != 1:
        raise DataError(f"{source}: name exactly one run (FILE.json@MODEL)")
    return {**chosen[0], "source": source}


def _system(test: dict[str, Any], validation: dict[str, Any] | None, **rest: Any) -> dict[str, Any]:
    row = {"test_ndcg@10": test["ndcg@10"], "test_hr@10": test["hr@10"], **rest}
    if validation is not None:
        row["val_ndcg@10"] = validation["ndcg@10"]
        row["val_test_gap_ndcg@10"] = validation["ndcg@10"] - test["ndcg@10"]
    return row


def dataset_row(name: str, kvrec_source: str, reference_source: str) -> dict[str, Any]:
    row: dict[str, Any] = {"dataset": name, "kvrec": None, "reference": None, "popularity": None}
    if kvrec_source != "-":
        run = kvrec_run(kvrec_source)
        row["kvrec"] = _system(
            run["test"], run["validation"], train_seconds=run["train_seconds"],
            best_epoch=run["best_epoch"], epochs_run=run["epochs_run"],
            source=kvrec_source, model_version=run.get("model_version"),
        )
        row["popularity"] = _system(run["popularity_test"], None)
    if reference_source != "-":
        candidates = [_reference_run(source) for source in reference_source.split(",")]
        chosen = max(candidates, key=lambda run: run["val_ndcg@10"])
        reference = chosen.pop("recorded")
        row["reference"] = chosen
        if len(candidates) > 1:
            row["reference_candidates"] = [
                {key: run[key] for key in ("source", "settings", "val_ndcg@10", "test_ndcg@10",
                                            "stopped_by")}
                for run in candidates
            ]
        popularity = _system(reference["popularity_test"], None)
        if row["popularity"] is not None:  # both measured it: the same split gives the same
            row["popularity_agrees"] = row["popularity"] == popularity
        row["popularity"] = popularity
    if row["kvrec"] and row["reference"]:
        row["kvrec_over_reference_ndcg@10"] = (
            row["kvrec"]["test_ndcg@10"] / row["reference"]["test_ndcg@10"]
        )
    return row


def _reference_run(source: str) -> dict[str, Any]:
    """One `kvrec bench reference` JSON as a row's system (its whole record under
    "recorded")."""
    try:
        recorded = json.loads(Path(source).read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{source}: cannot read a reference run ({exc})") from None
    return {
        **_system(
            recorded["test"], recorded["validation"], train_seconds=recorded["train_seconds"],
            best_epoch=recorded["best_epoch"], epochs_run=recorded["epochs_run"],
            stopped_by=recorded["stopped_by"], settings=recorded["settings"], source=source,
        ),
        "recorded": recorded,
    }


def _cell(system: dict[str, Any] | None, key: str, fmt: str) -> str:
    return "-" if system is None or key not in system else format(system[key], fmt)


def datasets_table(rows: list[dict[str, Any]]) -> str:
    """The side by side as a Markdown table."""
    lines = [
        "| dataset | kvrec NDCG@10 | HR@10 | reference NDCG@10 | HR@10 | popularity NDCG@10 "
        "| HR@10 | kvrec / reference | kvrec s (best/last epoch) | reference s (best/last epoch) "
        "| val-test gap kvrec | reference |",
        "|" + " --- |" * 12,
    ]
    for row in rows:
        kv, ref, pop = row["kvrec"], row["reference"], row["popularity"]
        ratio = row.get("kvrec_over_reference_ndcg@10")
        seconds = [
            "-" if s is None else f"{s['train_seconds']:,.0f} ({s['best_epoch']}/{s['epochs_run']})"
            + (", stopped by time" if s.get("stopped_by") == "time limit" else "")
            for s in (kv, ref)
        ]
        lines.append(
            f"| {row['dataset']} | {_cell(kv, 'test_ndcg@10', '.4f')} "
            f"| {_cell(kv, 'test_hr@10', '.4f')} | {_cell(ref, 'test_ndcg@10', '.4f')} "
            f"| {_cell(ref, 'test_hr@10', '.4f')} | {_cell(pop, 'test_ndcg@10', '.4f')} "
            f"| {_cell(pop, 'test_hr@10', '.4f')} | {'-' if ratio is None else f'{ratio:.3f}x'} "
            f"| {seconds[0]} | {seconds[1]} | {_cell(kv, 'val_test_gap_ndcg@10', '+.4f')} "
            f"| {_cell(ref, 'val_test_gap_ndcg@10', '+.4f')} |"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", default=None, help="model artifact directories")
    parser.add_argument(
        "--dataset", nargs=3, action="append", default=None,
        metavar=("NAME", "KVREC", "REFERENCE"),
        help="datasets side by side (repeat): kvrec's artifact or run JSON, the reference JSON "
             "(or several, comma-separated: the best on validation is the reference)",
    )
    parser.add_argument("--json", required=True, help="write the comparison here")
    parser.add_argument("--plot", default=None, help="PNG of the validation curves (--models)")


def main(args: argparse.Namespace) -> int:
    if (args.models is None) == (args.dataset is None):
        raise ConfigError("give --models or --dataset (not both)")
    if args.dataset is not None:
        return compare_datasets(args.dataset, Path(args.json))
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


def compare_datasets(datasets: list[list[str]], out: Path) -> int:
    rows = [dataset_row(name, kvrec, reference) for name, kvrec, reference in datasets]
    table = datasets_table(rows)
    result = {"benchmark": "train-datasets", "machine": machine_info(), "datasets": rows,
              "table": table}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(table)
    return 0
