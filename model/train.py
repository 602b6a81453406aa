"""Training: next-item prediction at every position, early stopping on validation NDCG@10.

    kvrec train --data ../shared/datasets/amazon-games.txt --format sasrec --out artifacts/games

The defaults are the measured recipe (docs/quality.md): full cross-entropy, d_model 128,
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
import math
import random
import signal
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from kvrec.errors import ConfigError, DataError
from kvrec.model.artifact import Artifact, save_artifact
from kvrec.model.averaging import WeightAverage
from kvrec.model.config import ModelConfig
from kvrec.model.datasets import EVENT_TYPES, dataset_from_args
from kvrec.model.encoder import Encoder
from kvrec.model.evaluate import evaluate_popularity, evaluate_split, left_pad, prepare
from kvrec.model.losses import softmax_cross_entropy
from kvrec.model.memory import release_free_memory
from kvrec.model.owned import check_replaceable
from kvrec.model.progress import progress_bar, progress_line
from kvrec.model.train_command import (  # noqa: F401 - this module's names, as before
    TrainSettings,
    add_arguments,
    add_training_arguments,
    settings_from_args,
    shape_from_args,
)

TRIM_EVERY_STEPS = 50  # hand freed heap memory back to the OS this often (model/memory.py)


def length_grouped_batches(
    lengths: list[int], batch_size: int, rng: random.Random, pool_batches: int = 50
) -> list[list[int]]:
    """Batches of users of similar length, each about `batch_size` x (mean length) positions.

    The users are shuffled, taken `pool_batches` batches' worth at a time, sorted by length
    within that pool and cut into batches of a fixed budget of positions; the batches are then
    shuffled. A batch is then mostly real events, not padding (the transformer costs half as
    much on this data), while each position keeps about the weight it has in random batches of
    `batch_size` users and an epoch takes about as many steps."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    budget = batch_size * sum(lengths) / max(1, len(lengths))
    batches: list[list[int]] = []
    pool_size = batch_size * pool_batches
    for pool_start in range(0, len(order), pool_size):
        pool = sorted(order[pool_start : pool_start + pool_size], key=lengths.__getitem__)
        batch: list[int] = []
        positions = 0
        for user in pool:
            if batch and positions + lengths[user] > budget:
                batches.append(batch)
                batch, positions = [], 0
            batch.append(user)
            positions += lengths[user]
        if batch:
            batches.append(batch)
    rng.shuffle(batches)
    return batches


def random_batches(count: int, batch_size: int, rng: random.Random) -> list[list[int]]:
    order = list(range(count))
    rng.shuffle(order)
    return [order[start : start + batch_size] for start in range(0, count, batch_size)]


def lr_factor(epochs_done: float, settings: TrainSettings) -> float:
    """The learning rate, as a fraction of `settings.lr`, for the step that ends `epochs_done`
    epochs into training (fractional): a linear warm-up over `warmup_epochs`, then constant,
    or a cosine decay that reaches `min_lr_ratio` at the end of the last epoch."""
    if epochs_done < settings.warmup_epochs:
        return epochs_done / settings.warmup_epochs
    if settings.lr_schedule == "constant":
        return 1.0
    decay_epochs = settings.epochs - settings.warmup_epochs
    progress = min(1.0, (epochs_done - settings.warmup_epochs) / max(decay_epochs, 1e-9))
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return settings.min_lr_ratio + (1.0 - settings.min_lr_ratio) * cosine


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def replace_items(items: torch.Tensor, probability: float, n_items: int) -> torch.Tensor:
    """`items` with each real (non-zero) entry replaced, with `probability`, by an item drawn
    uniformly from 1..n_items (padding stays padding)."""
    replaced = (torch.rand(items.shape, device=items.device) < probability) & (items != 0)
    drawn = torch.randint(1, n_items + 1, items.shape, device=items.device)
    return torch.where(replaced, drawn, items)


def seen_items(items: torch.Tensor) -> torch.Tensor:
    """[B, T, T]: at (b, t), the items of row b up to and including position t (0 after)."""
    length = items.shape[1]
    earlier = torch.ones(length, length, dtype=torch.bool, device=items.device).tril()
    return items.unsqueeze(1) * earlier


def contrastive_loss(first: torch.Tensor, second: torch.Tensor, temperature: float,
                     same: torch.Tensor | None = None) -> torch.Tensor:
    """InfoNCE between two views [B, d] of the same users: each row's positive is its own
    other view, the batch's other users are the negatives (both directions), except those
    `same` [B, B] marks as positives too (e.g. the same next item)."""
    first, second = F.normalize(first, dim=-1), F.normalize(second, dim=-1)
    logits = first @ second.T / temperature
    labels = torch.arange(first.shape[0], device=first.device)
    if same is not None:
        others = same & ~torch.eye(len(labels), dtype=torch.bool, device=same.device)
        logits = logits.masked_fill(others, float("-inf"))
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def sequences_by_last_item(last_items: list[int]) -> dict[int, list[int]]:
    """The sequences (indices into `last_items`) that end on each item."""
    by_item: dict[int, list[int]] = {}
    for index, item in enumerate(last_items):
        by_item.setdefault(item, []).append(index)
    return by_item


def same_target_partners(last_items: list[int], by_item: dict[int, list[int]],
                         batch: list[int], rng: random.Random) -> list[int]:
    """For each sequence of `batch`, another sequence whose last item is the same (drawn at
    random from `by_item`, `sequences_by_last_item(last_items)`), or itself when no other has
    it (DuoRec's supervised positives)."""
    partners = []
    for index in batch:
        sharing = by_item[last_items[index]]
        if len(sharing) == 1:
            partners.append(index)
            continue
        partner = index
        while partner == index:
            partner = sharing[rng.randrange(len(sharing))]
        partners.append(partner)
    return partners


def future_targets(
    targets: torch.Tensor, horizon: int, weight: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded next-item targets [B, L] -> each position's target distribution: targets
    [B, L, 1 + horizon] (the next item, then the `horizon` items after it in the sequence, 0
    past its end) and their weights: 1 - `weight` on the next item and `weight` split evenly
    over the later items that exist; 1 on the next item where none does."""
    length = targets.shape[1]
    later = [torch.nn.functional.pad(targets[:, k:], (0, min(k, length)))[:, :length]
             for k in range(1, horizon + 1)]
    stacked = torch.stack([targets, *later], dim=-1)
    present = (stacked[..., 1:] != 0).to(torch.float32)
    count = present.sum(dim=-1, keepdim=True)
    share = torch.where(count > 0, weight / count.clamp(min=1), torch.zeros_like(count))
    next_weight = 1.0 - share * count
    return stacked, torch.cat([next_weight, present * share], dim=-1)


def target_distribution(
    targets: torch.Tensor, settings: TrainSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """`future_targets` of left-padded targets [B, L], each row's last position (its most
    recent training target) weighted `settings.last_target_weight` times. Without a future
    weight the distribution is the next item alone (no columns of zero weight)."""
    horizon = settings.future_items if settings.future_weight else 0
    distribution, weights = future_targets(targets, horizon, settings.future_weight)
    weights[:, -1] *= settings.last_target_weight
    return distribution, weights


def _loss(
    encoder: Encoder,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    settings: TrainSettings,
    seen: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """`hidden` [N, d] at non-padding positions, `targets` [N] item indices (or [N, K] with
    `weights` [N, K]: a target distribution, `--loss ce` only), `seen` [N, K] the items each
    position has seen (for `exclude_seen`)."""
    embeddings = encoder.item_embeddings()
    n_items = embeddings.shape[0] - 1
    if settings.loss == "ce":
        excluded = seen if settings.exclude_seen else None
        if weights is not None:
            weights = weights * (1.0 - settings.label_smoothing)
        return softmax_cross_entropy(hidden, embeddings, targets, excluded=excluded,
                                     smoothing=settings.label_smoothing, weights=weights)
    if settings.loss == "bce":
        negatives = torch.randint(1, n_items + 1, targets.shape, device=targets.device)
        positive = (hidden * embeddings[targets]).sum(-1)
        negative = (hidden * embeddings[negatives]).sum(-1)
        return F.binary_cross_entropy_with_logits(
            torch.cat([positive, negative]),
            torch.cat([torch.ones_like(positive), torch.zeros_like(negative)]),
        )
    # sampled softmax with shared uniform negatives (uniform proposal: logQ is a constant)
    negatives = torch.randint(1, n_items + 1, (settings.negatives,), device=targets.device)
    positive = (hidden * embeddings[targets]).sum(-1, keepdim=True)
    negative = hidden @ embeddings[negatives].T
    negative = negative.masked_fill(negatives.view(1, -1) == targets.view(-1, 1), float("-inf"))
    logits = torch.cat([positive, negative], dim=1)
    return F.cross_entropy(logits, torch.zeros_like(targets))


def train(
    interactions: list,
    config_overrides: dict[str, Any],
    settings: TrainSettings,
    out_dir: Path,
    plot_path: Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    seed_everything(settings.seed)
    earlier = _load_earlier(settings.init_from) if settings.init_from is not None else None
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
    reach = config.history_needed
    if settings.max_len < reach:
        raise ConfigError(
            f"--max-len {settings.max_len} is shorter than the history the model can use "
            f"({config.n_layers} layers x (window {config.window} - 1) + 1 = {reach} events): "
            f"use --max-len {reach} or more, or a smaller --window"
        )
    device = torch.device(settings.device)
    encoder = Encoder(config)
    earlier_seconds = 0.0
    if earlier is not None:
        earlier_seconds = warm_start(encoder, earlier)
    encoder = encoder.to(device)
    optimizer = torch.optim.AdamW(
        encoder.parameters(), lr=settings.lr, weight_decay=settings.weight_decay
    )
    sequences = [
        (items[-(settings.max_len + 1) :], types[-(settings.max_len + 1) :])
        for items, types in zip(prepared.train_items, prepared.train_types, strict=True)
        if len(items) >= 2
    ]
    lengths = [len(items) - 1 for items, _ in sequences]  # positions with a target
    last_items = [items[-1] for items, _ in sequences]  # each sequence's last training target
    by_last_item = (sequences_by_last_item(last_items)
                    if settings.contrastive_positives == "same-target" else {})
    history: list[dict[str, float]] = []
    best_ndcg, best_state, best_epoch, waited = -1.0, None, 0, 0
    average = WeightAverage(encoder, settings.ema_decay) if settings.ema_decay else None
    started = time.perf_counter()
    rng = random.Random(settings.seed)
    try:  # Ctrl-C stops training early and still publishes the best weights so far
        for epoch in range(1, settings.epochs + 1):
            encoder.train()
            if settings.batching == "length":
                batches = length_grouped_batches(lengths, settings.batch_size, rng)
            else:
                batches = random_batches(len(sequences), settings.batch_size, rng)
            total, count = 0.0, 0
            bar = progress_bar(
                batches, enabled=progress, desc=f"epoch {epoch}", leave=False, unit="batch"
            )
            for batch_number, batch in enumerate(bar, start=1):
                done = epoch - 1 + batch_number / len(batches)
                for group in optimizer.param_groups:
                    group["lr"] = settings.lr * lr_factor(done, settings)
                chosen = [sequences[i] for i in batch]
                items = left_pad([s[0][:-1] for s in chosen], settings.max_len).to(device)
                types = left_pad([s[1][:-1] for s in chosen], settings.max_len).to(device)
                targets = left_pad([s[0][1:] for s in chosen], settings.max_len).to(device)
                real = targets != 0
                seen = seen_items(items)[real] if settings.exclude_seen else None
                if settings.item_noise:  # the inputs only: targets and seen items stay true
                    items = replace_items(items, settings.item_noise, config.n_items)
                hidden = encoder(items, types)
                if settings.future_weight or settings.last_target_weight != 1.0:
                    distribution, weights = target_distribution(targets, settings)
                    loss = _loss(encoder, hidden[real], distribution[real], settings, seen,
                                 weights[real])
                else:
                    loss = _loss(encoder, hidden[real], targets[real], settings, seen)
                if settings.contrastive_weight:
                    same = None
                    if settings.contrastive_positives == "same-target":
                        partners = [sequences[i] for i in
                                    same_target_partners(last_items, by_last_item, batch, rng)]
                        other_view = encoder(
                            left_pad([s[0][:-1] for s in partners], settings.max_len).to(device),
                            left_pad([s[1][:-1] for s in partners], settings.max_len).to(device))
                        last = targets[:, -1]
                        same = last.view(-1, 1) == last.view(1, -1)
                    else:
                        other_view = encoder(items, types)  # other dropout masks
                    loss = loss + settings.contrastive_weight * contrastive_loss(
                        hidden[:, -1], other_view[:, -1], settings.contrastive_temperature, same)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if average is not None:
                    average.update()
                total += loss.item() * int(real.sum())
                count += int(real.sum())
                bar.set_postfix(loss=f"{total / max(count, 1):.4f}")
                if batch_number % TRIM_EVERY_STEPS == 0:
                    release_free_memory()
            record = {
                "epoch": epoch,
                "loss": total / max(count, 1),
                "lr": optimizer.param_groups[0]["lr"],
                "seconds": time.perf_counter() - started,
            }
            if epoch % settings.eval_every == 0 or epoch == settings.epochs:
                with average.swapped_in() if average else nullcontext():
                    validation = evaluate_split(
                        encoder, prepared.validation, max_len=settings.max_len, device=str(device)
                    )
                    improved = validation["ndcg@10"] > best_ndcg
                    if improved:
                        best_state = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
                record.update({f"val_{k}": v for k, v in validation.items()})
                release_free_memory()
                if improved:
                    best_ndcg, best_epoch, waited = validation["ndcg@10"], epoch, 0
                else:
                    waited += 1
            history.append(record)
            if progress:
                shown = ", ".join(
                    f"{k} {v:.4f}" for k, v in record.items() if k not in ("epoch", "seconds", "lr")
                )
                progress_line(f"epoch {epoch:3d} ({record['seconds']:.0f}s): {shown}")
            if waited >= settings.patience:
                break
    except KeyboardInterrupt:
        progress_line("interrupted: stopping early with the best weights so far")
    if best_state is None:
        raise ConfigError("training stopped before the first validation: nothing to save")
    train_seconds = time.perf_counter() - started
    encoder.load_state_dict(best_state)
    encoder = encoder.cpu().eval()
    test = evaluate_split(encoder, prepared.test, max_len=settings.max_len)
    metrics = {
        "validation": {k.removeprefix("val_"): v for k, v in history[best_epoch - 1].items()
                       if k.startswith("val_")},
        "test": test,
        "popularity_test": evaluate_popularity(prepared.popularity, prepared.test),
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "train_seconds": round(train_seconds, 1),
        "train_seconds_with_earlier_runs": round(train_seconds + earlier_seconds, 1),
        "init_from": str(settings.init_from) if settings.init_from else None,
        "history": history,
        "users": len(prepared.test.targets),
    }
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
        plot_training_curve(history, plot_path)
    return metrics


def grown_vocabulary(
    interactions: list, item_ids: list[str], event_types: list[str]
) -> tuple[list[str], list[str]]:
    """The item and event-type vocabularies of `interactions` grown from earlier ones: every
    earlier entry keeps its index (also one the new data lacks), new ones follow in order of
    first appearance. A fresh model starts from `[""]` (padding) and `EVENT_TYPES`."""
    item_ids, event_types = list(item_ids), list(event_types)
    known_items, known_types = set(item_ids), set(event_types)
    for interaction in interactions:
        if interaction.item_id not in known_items:
            known_items.add(interaction.item_id)
            item_ids.append(interaction.item_id)
        if interaction.event_type not in known_types:
            known_types.add(interaction.event_type)
            event_types.append(interaction.event_type)
    return item_ids, event_types


def _load_earlier(source: Path) -> Artifact:
    from kvrec.model.artifact import load_artifact

    earlier = load_artifact(source)
    if earlier.item_ids[:1] != [""]:
        raise ConfigError(f"--init-from {source}: its item vocabulary does not start with padding")
    return earlier


# the hyper-parameters that shape the weights or what they mean (how a user vector scores an
# item); dropout does not: it may differ
SHAPE_FIELDS = ("d_model", "n_layers", "n_heads", "window", "mlp_ratio", "rope_base",
                "similarity", "temperature", "block")
EMBEDDINGS = {"item_embedding.weight": "n_items", "type_embedding.weight": "n_event_types"}


def warm_start(encoder: Encoder, earlier: Artifact) -> float:
    """Start `encoder` from the weights of the earlier artifact `earlier`, whose item and event
    type vocabularies are prefixes of `encoder`'s (see `grown_vocabulary`): the embedding rows
    of known items and types are copied (the output layer is tied to the item embedding), the
    rows of new ones keep their fresh initialisation, and every other weight is copied and
    must have the same shape. Returns the earlier runs' recorded training seconds."""
    config, source = encoder.config, earlier.path
    differs = [n for n in SHAPE_FIELDS if getattr(earlier.config, n) != getattr(config, n)]
    shrunk = [n for n in EMBEDDINGS.values() if getattr(earlier.config, n) > getattr(config, n)]
    if differs or shrunk:
        raise ConfigError(
            f"--init-from {source}: model shape differs ({', '.join(differs + shrunk)}); "
            "use its flags"
        )
    state = encoder.state_dict()
    earlier_state = earlier.encoder.state_dict()
    if set(state) != set(earlier_state):
        raise ConfigError(f"--init-from {source}: its weights are not this encoder's")
    merged = {}
    for name, weights in earlier_state.items():
        if name in EMBEDDINGS:
            grown = state[name].clone()
            grown[: weights.shape[0]] = weights
            merged[name] = grown
        elif weights.shape != state[name].shape:
            raise ConfigError(f"--init-from {source}: {name} has shape {tuple(weights.shape)}, "
                              f"this model's is {tuple(state[name].shape)}")
        else:
            merged[name] = weights
    encoder.load_state_dict(merged, strict=True)
    metrics = earlier.metrics
    return float(metrics.get("train_seconds_with_earlier_runs", metrics.get("train_seconds", 0.0)))


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
