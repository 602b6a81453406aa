"""Training: next-item prediction at every position, early stopping on validation NDCG@10.

    kvrec train --data ../shared/datasets/amazon-games.txt --format sasrec --out artifacts/games

The defaults are the measured recipe (docs/history/quality.md): full cross-entropy, d_model 128,
2 layers, 2 heads, W 50, max-len 100, dropout 0.5, batch 128, lr 1e-3 with a one-epoch warm-up
and a cosine decay over 30 epochs, patience 10, seed 0.

Losses (`--loss`):
    ce       full-softmax cross-entropy over the whole catalog (the default; what makes SASRec
             strong, Klenitskiy & Vasilev 2023); logits only at non-padding positions, a block
             of rows at a time (model/losses.py)
    bce      SASRec's original loss: one uniformly sampled negative per position
    sampled  sampled softmax: `--negatives` uniform negatives shared by the batch, for
             catalogs too large for the full softmax

Learning rate (`--lr-schedule`): a cosine decay from `--lr` to `--min-lr-ratio` x `--lr` over
`--epochs` (the default), or constant, either after a linear `--warmup-epochs`. Batches
(`--batching`): users of similar length together with a fixed budget of positions (the
default; little padding), or shuffled users.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvrec.errors import ConfigError, DataError
from kvrec.model.artifact import save_artifact
from kvrec.model.averaging import WeightAverage
from kvrec.model.config import ModelConfig
from kvrec.model.datasets import EVENT_TYPES, dataset_from_args
from kvrec.model.encoder import Encoder
from kvrec.model.evaluate import Prepared, evaluate_popularity, evaluate_split, left_pad, prepare
from kvrec.model.memory import release_free_memory
from kvrec.model.objectives import (
    contrastive_loss,
    replace_items,
    same_target_partners,
    seen_items,
    sequences_by_last_item,
    target_distribution,
    training_loss,
)
from kvrec.model.owned import check_replaceable
from kvrec.model.progress import progress_bar, progress_line
from kvrec.model.schedule import length_grouped_batches, lr_factor, random_batches
from kvrec.model.train_command import (  # noqa: F401 - this module's names, as before
    TrainSettings,
    add_arguments,
    add_training_arguments,
    settings_from_args,
    shape_from_args,
)
from kvrec.model.warm_start import grown_vocabulary, load_earlier, warm_start

TRIM_EVERY_STEPS = 50  # hand freed heap memory back to the OS this often (model/memory.py)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class _Data:
    """What the epochs read: the prepared splits and each training sequence."""

    prepared: Prepared
    sequences: list[tuple[list[int], list[int], list[int]]]  # (items, types, time codes),
    # at most max_len + 1 each
    lengths: list[int]  # positions with a target
    last_items: list[int]  # each sequence's last training target
    by_last_item: dict[int, list[int]]  # for same-target contrastive positives


@dataclass
class _Fit:
    """The state of a run across epochs."""

    encoder: Encoder
    optimizer: torch.optim.Optimizer
    average: WeightAverage | None
    started: float
    history: list[dict[str, float]] = field(default_factory=list)
    best_ndcg: float = -1.0
    best_state: dict[str, torch.Tensor] | None = None
    best_epoch: int = 0
    waited: int = 0


def train(
    interactions: list,
    config_overrides: dict[str, Any],
    settings: TrainSettings,
    out_dir: Path,
    plot_path: Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    seed_everything(settings.seed)
    earlier = load_earlier(settings.init_from) if settings.init_from is not None else None
    item_ids, event_types = grown_vocabulary(
        interactions,
        earlier.item_ids if earlier else [""],
        earlier.event_types if earlier else list(EVENT_TYPES),
    )
    item_index = {item: i for i, item in enumerate(item_ids) if i > 0}
    type_index = {name: i + 1 for i, name in enumerate(event_types)}
    prepared = prepare(interactions, item_index, type_index)
    if not prepared.validation.targets:
        raise DataError("no user has 3 or more events: nothing to validate on")
    config = ModelConfig(
        n_items=len(item_ids) - 1, n_event_types=len(event_types), **config_overrides
    ).validate()
    _check_max_len(config, settings)
    device = torch.device(settings.device)
    encoder = Encoder(config)
    earlier_seconds = warm_start(encoder, earlier) if earlier is not None else 0.0
    encoder = encoder.to(device)
    optimizer = torch.optim.AdamW(
        encoder.parameters(), lr=settings.lr, weight_decay=settings.weight_decay
    )
    data = _training_data(prepared, settings)
    average = WeightAverage(encoder, settings.ema_decay) if settings.ema_decay else None
    fit = _Fit(encoder, optimizer, average, time.perf_counter())
    _run_epochs(fit, data, config, settings, device, progress)
    if fit.best_state is None:
        raise ConfigError("training stopped before the first validation: nothing to save")
    train_seconds = time.perf_counter() - fit.started
    encoder.load_state_dict(fit.best_state)
    encoder = encoder.cpu().eval()
    metrics = _final_metrics(encoder, fit, prepared, settings, train_seconds, earlier_seconds)
    training = {
        **vars(settings),
        "init_from": str(settings.init_from) if settings.init_from else None,
        "torch_threads": torch.get_num_threads(),
    }
    save_artifact(
        out_dir,
        encoder,
        item_ids=item_ids,
        event_types=event_types,
        popularity=prepared.popularity,
        metrics=metrics,
        settings=training,
    )
    if plot_path is not None:
        plot_training_curve(fit.history, plot_path)
    return metrics


def _check_max_len(config: ModelConfig, settings: TrainSettings) -> None:
    reach = config.history_needed
    if settings.max_len < reach:
        raise ConfigError(
            f"--max-len {settings.max_len} is shorter than the history the model can use "
            f"({config.n_layers} layers x (window {config.window} - 1) + 1 = {reach} events): "
            f"use --max-len {reach} or more, or a smaller --window"
        )


def _training_data(prepared: Prepared, settings: TrainSettings) -> _Data:
    sequences = [
        (items[-(settings.max_len + 1) :], types[-(settings.max_len + 1) :],
         times[-(settings.max_len + 1) :])
        for items, types, times in zip(prepared.train_items, prepared.train_types,
                                       prepared.train_times, strict=True)
        if len(items) >= 2
    ]
    last_items = [items[-1] for items, _, _ in sequences]
    by_last_item = (sequences_by_last_item(last_items)
                    if settings.contrastive_positives == "same-target" else {})
    return _Data(prepared, sequences, [len(items) - 1 for items, _, _ in sequences], last_items,
                 by_last_item)


def _run_epochs(fit: _Fit, data: _Data, config: ModelConfig, settings: TrainSettings,
                device: torch.device, progress: bool) -> None:
    """Train and validate epoch after epoch until patience runs out; Ctrl-C stops early and
    keeps the best weights so far."""
    rng = random.Random(settings.seed)
    try:
        for epoch in range(1, settings.epochs + 1):
            loss = _train_epoch(fit, data, config, settings, device, progress, epoch, rng)
            record = {
                "epoch": epoch,
                "loss": loss,
                "lr": fit.optimizer.param_groups[0]["lr"],
                "seconds": time.perf_counter() - fit.started,
            }
            if epoch % settings.eval_every == 0 or epoch == settings.epochs:
                _validate(fit, data, settings, device, epoch, record)
            fit.history.append(record)
            if progress:
                shown = ", ".join(
                    f"{k} {v:.4f}" for k, v in record.items() if k not in ("epoch", "seconds", "lr")
                )
                progress_line(f"epoch {epoch:3d} ({record['seconds']:.0f}s): {shown}")
            if fit.waited >= settings.patience:
                break
    except KeyboardInterrupt:
        progress_line("interrupted: stopping early with the best weights so far")


def _train_epoch(fit: _Fit, data: _Data, config: ModelConfig, settings: TrainSettings,
                 device: torch.device, progress: bool, epoch: int, rng: random.Random) -> float:
    """One pass over the training sequences; the mean loss per target."""
    fit.encoder.train()
    if settings.batching == "length":
        batches = length_grouped_batches(data.lengths, settings.batch_size, rng)
    else:
        batches = random_batches(len(data.sequences), settings.batch_size, rng)
    total, count = 0.0, 0
    bar = progress_bar(batches, enabled=progress, desc=f"epoch {epoch}", leave=False, unit="batch")
    for batch_number, batch in enumerate(bar, start=1):
        done = epoch - 1 + batch_number / len(batches)
        for group in fit.optimizer.param_groups:
            group["lr"] = settings.lr * lr_factor(done, settings)
        loss, targets = _batch_loss(fit.encoder, data, batch, config, settings, device, rng)
        fit.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        fit.optimizer.step()
        if fit.average is not None:
            fit.average.update()
        total += loss.item() * targets
        count += targets
        bar.set_postfix(loss=f"{total / max(count, 1):.4f}")
        if batch_number % TRIM_EVERY_STEPS == 0:
            release_free_memory()
    return total / max(count, 1)


def _batch_loss(encoder: Encoder, data: _Data, batch: list[int], config: ModelConfig,
                settings: TrainSettings, device: torch.device, rng: random.Random
                ) -> tuple[torch.Tensor, int]:
    """The loss of one batch of sequences (every position with a target, and the
    regularisers), and how many targets it has."""
    chosen = [data.sequences[i] for i in batch]
    items = left_pad([s[0][:-1] for s in chosen], settings.max_len).to(device)
    types = left_pad([s[1][:-1] for s in chosen], settings.max_len).to(device)
    times = _times(chosen, config, settings, device)
    targets = left_pad([s[0][1:] for s in chosen], settings.max_len).to(device)
    real = targets != 0
    seen = seen_items(items)[real] if settings.exclude_seen else None
    if settings.item_noise:  # the inputs only: targets and seen items stay true
        items = replace_items(items, settings.item_noise, config.n_items)
    hidden = encoder(items, types, times)
    if settings.future_weight or settings.last_target_weight != 1.0:
        distribution, weights = target_distribution(targets, settings)
        loss = training_loss(encoder, hidden[real], distribution[real], settings, seen,
                             weights[real])
    else:
        loss = training_loss(encoder, hidden[real], targets[real], settings, seen)
    if settings.contrastive_weight:
        same = None
        if settings.contrastive_positives == "same-target":
            partners = [data.sequences[i] for i in
                        same_target_partners(data.last_items, data.by_last_item, batch, rng)]
            other_view = encoder(
                left_pad([s[0][:-1] for s in partners], settings.max_len).to(device),
                left_pad([s[1][:-1] for s in partners], settings.max_len).to(device),
                _times(partners, config, settings, device))
            last = targets[:, -1]
            same = last.view(-1, 1) == last.view(1, -1)
        else:
            other_view = encoder(items, types, times)  # other dropout masks
        loss = loss + settings.contrastive_weight * contrastive_loss(
            hidden[:, -1], other_view[:, -1], settings.contrastive_temperature, same)
    return loss, int(real.sum())


def _times(chosen: list, config: ModelConfig, settings: TrainSettings,
           device: torch.device) -> torch.Tensor | None:
    """The inputs' time codes, for a model with time features (else None)."""
    if not config.time_features:
        return None
    return left_pad([s[2][:-1] for s in chosen], settings.max_len).to(device)


def _validate(fit: _Fit, data: _Data, settings: TrainSettings, device: torch.device,
              epoch: int, record: dict[str, float]) -> None:
    """Validation NDCG@10 (with the averaged weights, if any) into `record`; the best
    weights kept, patience counted."""
    with fit.average.swapped_in() if fit.average else nullcontext():
        validation = evaluate_split(
            fit.encoder, data.prepared.validation, max_len=settings.max_len, device=str(device)
        )
        improved = validation["ndcg@10"] > fit.best_ndcg
        if improved:
            fit.best_state = {k: v.detach().clone() for k, v in fit.encoder.state_dict().items()}
    record.update({f"val_{k}": v for k, v in validation.items()})
    release_free_memory()
    if improved:
        fit.best_ndcg, fit.best_epoch, fit.waited = validation["ndcg@10"], epoch, 0
    else:
        fit.waited += 1


def _final_metrics(encoder: Encoder, fit: _Fit, prepared: Prepared, settings: TrainSettings,
                   train_seconds: float, earlier_seconds: float) -> dict[str, Any]:
    return {
        "validation": {k.removeprefix("val_"): v for k, v in fit.history[fit.best_epoch - 1].items()
                       if k.startswith("val_")},
        "test": evaluate_split(encoder, prepared.test, max_len=settings.max_len),
        "popularity_test": evaluate_popularity(prepared.popularity, prepared.test),
        "best_epoch": fit.best_epoch,
        "epochs_run": len(fit.history),
        "train_seconds": round(train_seconds, 1),
        "train_seconds_with_earlier_runs": round(train_seconds + earlier_seconds, 1),
        "init_from": str(settings.init_from) if settings.init_from else None,
        "history": fit.history,
        "users": len(prepared.test.targets),
    }


def plot_training_curve(history: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    figure, loss_axis = plt.subplots(figsize=(7, 4))
    loss_axis.plot(epochs, [h["loss"] for h in history], color="tab:blue", label="training loss")
    loss_axis.set_xlabel("epoch")
    loss_axis.set_ylabel("training loss", color="tab:blue")
    ndcg_axis = loss_axis.twinx()
    evaluated = [h for h in history if "val_ndcg@10" in h]
    ndcg_axis.plot(
        [h["epoch"] for h in evaluated], [h["val_ndcg@10"] for h in evaluated],
        color="tab:red", marker="o", markersize=3, label="validation NDCG@10",
    )
    ndcg_axis.set_ylabel("validation NDCG@10 (full ranking)", color="tab:red")
    figure.suptitle("kvrec training curve")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def configure_torch(args: argparse.Namespace) -> None:
    """Apply --threads; refuse --device cuda without a CUDA device."""
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available")


def _stop_early(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(args: argparse.Namespace) -> int:
    # Ctrl-C, and SIGTERM (what Kubernetes and `kill` send), stop training early and still
    # publish the best weights so far; SIGINT also when a non-interactive shell started this
    # in the background with it ignored
    signal.signal(signal.SIGTERM, _stop_early)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    # refused now, not after training: --out must be new, empty or an earlier artifact
    out = check_replaceable(args.out, "--out", kind="artifact")
    settings = settings_from_args(args, Path(args.init_from) if args.init_from else None)
    configure_torch(args)
    interactions = dataset_from_args(args)
    overrides = shape_from_args(args)
    plot = Path(args.plot) if args.plot else out / "training_curve.png"
    metrics = train(interactions, overrides, settings, out, plot)
    print(json.dumps({
        "out": str(out), "test": metrics["test"], "popularity_test": metrics["popularity_test"],
        "best_epoch": metrics["best_epoch"], "train_seconds": metrics["train_seconds"],
    }))
    return 0
