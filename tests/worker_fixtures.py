"""Small real model artifacts for worker tests (random weights, no training needed)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.artifact import Artifact, load_artifact, save_artifact
from model.config import ModelConfig
from model.encoder import Encoder
from stream.worker.app import add_arguments, build_recommender, resolve_window_capacity
from stream.worker.settings import WorkerSettings

EVENT_TYPES = ["view", "click", "add_to_cart", "purchase"]


def make_artifact(
    out_dir: Path,
    *,
    n_items: int = 60,
    window: int = 4,
    layers: int = 2,
    d_model: int = 32,
    seed: int = 0,
    event_types: list[str] | None = None,
    nan_weights: bool = False,
    metrics: dict[str, Any] | None = None,
) -> Artifact:
    """`nan_weights`: a broken model that passes every file check (its outputs are NaN)."""
    torch.manual_seed(seed)
    event_types = event_types or EVENT_TYPES
    config = ModelConfig(
        n_items=n_items,
        n_event_types=len(event_types),
        d_model=d_model,
        n_layers=layers,
        n_heads=2,
        window=window,
        dropout=0.0,
    )
    encoder = Encoder(config).eval()
    if nan_weights:
        with torch.no_grad():
            list(encoder.parameters())[-1].fill_(float("nan"))  # not the item table
    item_ids = ["", *[f"sku-{i}" for i in range(1, n_items + 1)]]
    popularity = np.zeros(n_items + 1, dtype=np.int64)
    popularity[1:] = np.arange(n_items, 0, -1)
    save_artifact(
        out_dir,
        encoder,
        item_ids=item_ids,
        event_types=event_types,
        popularity=popularity,
        metrics=metrics or {"note": "random weights for tests"},
    )
    return load_artifact(out_dir)


def exact_worker_with_model(model: Path) -> tuple[Any, Any]:
    """(settings, recommender) of a worker parsed from flags as `kvrec worker` parses them:
    this model, exact retrieval, k 5, input topic `events`, no metrics port; its window
    capacity resolved against the model."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--model", str(model), "--retrieval", "exact", "--k", "5",
                              "--input-topic", "events", "--metrics-port", "-1"])
    base = WorkerSettings.from_args(args)
    recommender = build_recommender(base)
    return resolve_window_capacity(base, recommender), recommender
