"""Small real model artifacts for worker tests (random weights, no training needed)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvrec.model.artifact import Artifact, load_artifact, save_artifact
from kvrec.model.config import ModelConfig
from kvrec.model.encoder import Encoder
from kvrec.stream.worker.app import add_arguments, build_recommender, resolve_window_capacity
from kvrec.stream.worker.settings import WorkerSettings

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
    block: str = "transformer",
    far_sighted: bool = False,
    metrics: dict[str, Any] | None = None,
) -> Artifact:
    """`nan_weights`: a broken model that passes every file check (its outputs are NaN).
    `far_sighted`: weights that make the oldest event of the receptive field matter (see
    `make_far_sighted`)."""
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
        block=block,
    )
    encoder = Encoder(config).eval()
    if far_sighted:
        make_far_sighted(encoder)
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


@torch.no_grad()
def make_far_sighted(encoder: Encoder) -> None:
    """Make every layer attend to the oldest event its window holds, with values that outweigh
    the residual, so an N-layer output depends on the event N*(W-1) positions back by O(1).

    With random weights (std 0.02) attention is near uniform and each layer passes on ~1/W of an
    event: at W=50 a refill one event short differs from the full pass by ~1e-5 with two layers
    and ~1e-7 with three, below the 1e-4 the invariant is checked at, so a test on a random
    model cannot see a window that keeps one event too few. Here it differs by ~0.1-1 (checked
    by `tests/test_refill_exactness.py`), while every exact path still agrees to ~1e-6.

    Transformer: queries and keys are constants (their biases), the key rotated by (W-1) times
    each rotary frequency, so q . R(age) k peaks at age W-1 and, scaled up, the softmax puts
    all its weight there; value and output projections are scaled by 10. HSTU: a large age bias
    at W-1 and a negative one elsewhere."""
    cfg = encoder.config
    window, head_dim, d_model = cfg.window, cfg.head_dim, cfg.d_model
    for block in encoder.blocks:
        if cfg.block == "hstu":
            block.age_bias.fill_(-8.0)
            block.age_bias[:, window - 1] = 2.0 * window
            block.out.weight.mul_(20.0)
            continue
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
        angle = (window - 1) / cfg.rope_base**exponents
        scale = 40.0
        query = torch.cat([torch.full_like(angle, scale), torch.zeros_like(angle)])
        key = torch.cat([scale * torch.cos(angle), scale * torch.sin(angle)])
        qkv = block.attention.qkv
        qkv.weight[: 2 * d_model].zero_()
        qkv.bias[:d_model] = query.float().repeat(cfg.n_heads)
        qkv.bias[d_model : 2 * d_model] = key.float().repeat(cfg.n_heads)
        qkv.weight[2 * d_model :].mul_(10.0)
        block.attention.out.weight.mul_(10.0)


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
