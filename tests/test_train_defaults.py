"""`kvrec train` with no model or schedule flags trains the measured recipe (docs/quality.md)."""

from __future__ import annotations

import argparse
import itertools
import os
import re
import shlex
from pathlib import Path

import pytest

from kvrec.model.config import ModelConfig
from kvrec.model.train import TrainSettings, lr_factor

ROOT = Path(__file__).resolve().parent.parent
# the flags of the run that reached the published test NDCG@10 (README, docs/quality.md)
RECIPE = {
    "loss": "ce", "d_model": 128, "layers": 2, "heads": 2, "window": 50, "max_len": 100,
    "dropout": 0.5, "batch_size": 128, "lr": 1e-3, "lr_schedule": "cosine", "warmup_epochs": 1.0,
    "epochs": 30, "patience": 10, "seed": 0,
    # not spelled out in that command, its defaults then and now
    "format": "sasrec", "batching": "length", "min_lr_ratio": 0.01, "weight_decay": 0.0,
    "eval_every": 1, "device": "cpu",
}


def _parse(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> argparse.Namespace:
    from kvrec.stream.cli import build_parser

    for name in [n for n in os.environ if n.startswith("KVREC_TRAIN_")]:
        monkeypatch.delenv(name)  # the defaults themselves, not this machine's settings
    return build_parser(argv).parse_args(argv)


def test_the_defaults_are_the_measured_recipe(monkeypatch: pytest.MonkeyPatch) -> None:
    args = vars(_parse(["train", "--out", "o"], monkeypatch))
    assert {name: args[name] for name in RECIPE} == RECIPE
    assert args["threads"] == 0  # a machine choice, not part of the recipe


def test_the_settings_and_the_config_default_to_the_recipe_too() -> None:
    """`train()` callers that leave a setting out get what the command line gets."""
    settings, shape = TrainSettings(), ModelConfig(n_items=1)
    chosen = {
        "loss": settings.loss, "d_model": shape.d_model, "layers": shape.n_layers,
        "heads": shape.n_heads, "window": shape.window, "max_len": settings.max_len,
        "dropout": shape.dropout, "batch_size": settings.batch_size, "lr": settings.lr,
        "lr_schedule": settings.lr_schedule, "warmup_epochs": settings.warmup_epochs,
        "epochs": settings.epochs, "patience": settings.patience, "seed": settings.seed,
        "batching": settings.batching, "min_lr_ratio": settings.min_lr_ratio,
        "weight_decay": settings.weight_decay, "eval_every": settings.eval_every,
        "device": settings.device,
    }
    assert chosen == {k: v for k, v in RECIPE.items() if k != "format"}


def _documented_runs(path: Path) -> list[list[str]]:
    """The `kvrec train` commands of the published run (`--out artifacts/games-ce-d128`) in a
    document's code blocks, as argument lists."""
    text = path.read_text().replace("\\\n", " ")
    return [shlex.split(line)[1:] for line in text.splitlines()
            if re.match(r"\.venv/bin/kvrec train .*--out artifacts/games-ce-d128$", line.strip())]


def test_the_documented_commands_of_the_published_run_are_the_defaults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """README shows the plain command; docs/quality.md the plain one and the spelled-out one the
    run used. All parse to the same settings, the recipe."""
    readme, quality = _documented_runs(ROOT / "README.md"), _documented_runs(ROOT / "docs/quality.md")
    assert len(readme) == 1 and len(quality) == 2, (readme, quality)
    plain = {"--data", "--format", "--threads", "--out"}
    assert {a for a in readme[0] if a.startswith("--")} <= plain, readme[0]
    spelled = max(quality, key=len)
    assert len([a for a in spelled if a.startswith("--")]) > len(plain) + 10, spelled
    parsed = [vars(_parse(argv, monkeypatch)) for argv in [*readme, *quality]]
    assert all(args == parsed[0] for args in parsed), parsed
    assert {name: parsed[0][name] for name in RECIPE} == RECIPE


def test_the_default_schedule_warms_up_one_epoch_then_decays_to_one_percent() -> None:
    settings = TrainSettings()
    assert lr_factor(0.5, settings) == pytest.approx(0.5)  # linear warm-up over epoch 1
    assert lr_factor(1.0, settings) == pytest.approx(1.0)  # the peak, --lr
    assert lr_factor(15.5, settings) == pytest.approx(0.505)  # halfway: (1 + 0.01) / 2
    assert lr_factor(30.0, settings) == pytest.approx(0.01)  # the end of the 30th epoch
    steps = [lr_factor(1 + 29 * i / 290, settings) for i in range(291)]
    assert all(a > b for a, b in itertools.pairwise(steps))  # decays at every step
    # early stopping (patience 10) can end training before epoch 30: the decay still spans
    # --epochs, so a stopped run never reached the floor
    assert lr_factor(20.0, settings) > 0.1
