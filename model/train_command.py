"""`kvrec train`'s flags, their checks and `TrainSettings`, in a module that does not import
torch: a bad flag or a missing data file is reported before the training code (model/train.py)
loads, which takes seconds. `kvrec retrain` shares the recipe's flags
(`add_training_arguments`)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvrec.errors import ConfigError
from kvrec.flags import integer, number
from kvrec.model.config import BLOCKS, SIMILARITIES, ModelConfig
from kvrec.model.datasets import add_dataset_arguments, check_dataset_arguments
from kvrec.model.owned import check_replaceable


@dataclass
class TrainSettings:
    """How to train. The defaults, with `ModelConfig`'s, are the measured recipe
    (docs/history/quality.md), and they are `kvrec train`'s defaults (`add_arguments`)."""

    loss: str = "ce"
    epochs: int = 30
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    max_len: int = 100
    patience: int = 10
    negatives: int = 256
    seed: int = 0
    device: str = "cpu"
    eval_every: int = 1
    init_from: Path | None = None  # continue from this artifact's weights (same model shape)
    lr_schedule: str = "cosine"  # warm up, then decay to min_lr_ratio * lr; or "constant"
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01
    batching: str = "length"  # or "random": a shuffled batch_size users at a time
    # CE only: leave each position's earlier items (its input so far) out of its softmax, as
    # evaluation leaves a user's earlier items out of the ranking
    exclude_seen: bool = False
    label_smoothing: float = 0.0  # CE only: weight of the uniform target over the catalog
    # a second pass of each batch under other dropout masks; InfoNCE between the two views of
    # each user's last position (in-batch negatives), weighted by `contrastive_weight`
    contrastive_weight: float = 0.0
    contrastive_temperature: float = 0.2
    # the second view: "dropout" (the same sequence under other dropout masks: CL4SRec's
    # unsupervised positive) or "same-target" (another user's sequence whose last training item
    # is the same: DuoRec's supervised positive; the sequence itself when it has none)
    contrastive_positives: str = "dropout"
    # stochastic shared embeddings (SSE, Wu et al. 2019): each input item (never a target) is
    # replaced by a uniformly drawn item with this probability, in training
    item_noise: float = 0.0
    # validate and publish an exponential moving average of the weights (decay per step; 0 =
    # the weights themselves): the average of the last ~1 / (1 - decay) steps' models
    ema_decay: float = 0.0
    # CE only: a share of each position's target on the items after its next one (a "future"
    # target distribution: 1 - future_weight on the next item, future_weight split evenly over
    # the next `future_items` items after it that the training sequence has; all on the next
    # item where it has none)
    future_weight: float = 0.0
    future_items: int = 3
    # CE only: each sequence's last training target (its user's most recent training event)
    # counts this many times in the loss; every other position once
    last_target_weight: float = 1.0



def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The defaults are `TrainSettings`' and `ModelConfig`'s: the measured recipe."""
    add_dataset_arguments(parser)
    parser.add_argument(
        "--out", required=True,
        help="artifact directory to write: new, empty or an earlier artifact (replaced); a "
             "directory holding other files is refused",
    )
    add_training_arguments(parser)
    parser.add_argument("--plot", default=None, help="default: <out>/training_curve.png")
    parser.add_argument("--init-from", default=None,
                        help="start from this artifact's weights (same model shape; its items "
                             "keep their indices and embeddings, new items of the data get "
                             "new ones), e.g. a second phase at a lower --lr")


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """The recipe's flags (loss, schedule, model shape, device), shared by `kvrec train` and
    `kvrec retrain`; `settings_from_args` and `shape_from_args` read them back. Their defaults
    are `TrainSettings`' and `ModelConfig`'s: the measured recipe."""
    settings, shape = TrainSettings(), ModelConfig(n_items=1)
    parser.add_argument("--loss", default=settings.loss, choices=("ce", "bce", "sampled"))
    parser.add_argument("--epochs", type=integer(1), default=settings.epochs)
    parser.add_argument("--batch-size", type=integer(1), default=settings.batch_size)
    parser.add_argument("--lr", type=number(above=0), default=settings.lr, help="peak learning rate")
    parser.add_argument("--batching", default=settings.batching, choices=("length", "random"),
                        help="length: users of similar length batched together, about "
                             "--batch-size x (mean length) positions a batch (less padding); "
                             "random: --batch-size shuffled users a batch")
    parser.add_argument("--lr-schedule", default=settings.lr_schedule,
                        choices=("constant", "cosine"),
                        help="cosine: decay from --lr to --min-lr-ratio x --lr over --epochs")
    parser.add_argument("--warmup-epochs", type=number(0), default=settings.warmup_epochs,
                        help="linear learning-rate warm-up over this many epochs")
    parser.add_argument("--min-lr-ratio", type=number(0, 1), default=settings.min_lr_ratio,
                        help="the cosine schedule's final learning rate, as a fraction of --lr")
    parser.add_argument("--weight-decay", type=number(0), default=settings.weight_decay)
    parser.add_argument("--d-model", type=integer(1), default=shape.d_model)
    parser.add_argument("--layers", type=integer(1), default=shape.n_layers)
    parser.add_argument("--heads", type=integer(1), default=shape.n_heads)
    parser.add_argument("--window", type=integer(1), default=shape.window)
    parser.add_argument("--max-len", type=integer(1), default=settings.max_len,
                        help="training sequence length")
    parser.add_argument("--dropout", type=number(0, below=1), default=shape.dropout)
    parser.add_argument("--block", default=shape.block, choices=BLOCKS,
                        help="transformer: softmax attention and a feed-forward network; hstu: "
                             "HSTU's gated SiLU attention with a learned bias by key age")
    parser.add_argument("--time-features", default="off", choices=("on", "off"),
                        help="on: embed each event's hour, weekday (UTC) and log2 gap to the "
                             "user's previous event (the csv/movielens formats' times; the "
                             "sasrec formats' are synthetic). The worker and ONNX export do "
                             "not serve such models yet")
    parser.add_argument("--similarity", default=shape.similarity, choices=SIMILARITIES,
                        help="dot: score = user vector . item embedding; cosine: both "
                             "L2-normalised, divided by --temperature")
    parser.add_argument("--temperature", type=number(above=0), default=shape.temperature,
                        help="for --similarity cosine")
    parser.add_argument("--patience", type=integer(1), default=settings.patience)
    parser.add_argument("--negatives", type=integer(1), default=settings.negatives,
                        help="for --loss sampled")
    parser.add_argument("--label-smoothing", type=number(0, below=1),
                        default=settings.label_smoothing,
                        help="--loss ce: weight of a uniform target over the catalog")
    parser.add_argument("--contrastive-weight", type=number(0), default=settings.contrastive_weight,
                        help="weight of an InfoNCE term between two dropout views of each "
                             "user's last position (a second forward pass; 0 = off)")
    parser.add_argument("--contrastive-temperature", type=number(above=0),
                        default=settings.contrastive_temperature)
    parser.add_argument("--contrastive-positives", default=settings.contrastive_positives,
                        choices=("dropout", "same-target"),
                        help="the contrastive term's second view: the same sequence under other "
                             "dropout masks, or another user's sequence with the same last item "
                             "(DuoRec's supervised positive)")
    parser.add_argument("--item-noise", type=number(0, below=1), default=settings.item_noise,
                        help="replace each input item (never a target) by a random item with "
                             "this probability in training (stochastic shared embeddings)")
    parser.add_argument("--ema-decay", type=number(0, below=1), default=settings.ema_decay,
                        help="validate and publish an exponential moving average of the "
                             "weights, with this decay per step (0 = off)")
    parser.add_argument("--future-weight", type=number(0, below=1),
                        default=settings.future_weight,
                        help="--loss ce: share of each position's target spread over the "
                             "--future-items items after its next one (0 = the next item only)")
    parser.add_argument("--future-items", type=integer(1), default=settings.future_items,
                        help="how many items after the next one share --future-weight")
    parser.add_argument("--last-target-weight", type=number(above=0),
                        default=settings.last_target_weight,
                        help="--loss ce: how many times each user's most recent training target "
                             "counts in the loss (every other position once)")
    parser.add_argument("--exclude-seen", action=argparse.BooleanOptionalAction,
                        default=settings.exclude_seen,
                        help="--loss ce: leave each position's earlier items out of its softmax "
                             "(evaluation leaves them out of the ranking)")
    parser.add_argument("--eval-every", type=integer(1), default=settings.eval_every)
    parser.add_argument("--threads", type=integer(0), default=0, help="torch threads (0 = default)")
    parser.add_argument("--device", default=settings.device, choices=("cpu", "cuda"))


def settings_from_args(args: argparse.Namespace, init_from: Path | None = None) -> TrainSettings:
    """The settings of `add_training_arguments`' flags (and --seed); checks what one flag's
    type cannot (`configure_torch` in model/train.py applies --threads and --device)."""
    if args.warmup_epochs > args.epochs:  # each flag's own range is checked by its type
        raise ConfigError("--warmup-epochs must be between 0 and --epochs")
    if args.label_smoothing and args.exclude_seen:
        raise ConfigError("--label-smoothing and --exclude-seen cannot be combined: use one")
    if args.loss != "ce" and (args.label_smoothing or args.exclude_seen or args.future_weight
                              or args.last_target_weight != 1.0):
        raise ConfigError("--label-smoothing, --exclude-seen, --future-weight and "
                          "--last-target-weight apply to --loss ce only")
    return TrainSettings(
        loss=args.loss, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, max_len=args.max_len, patience=args.patience,
        negatives=args.negatives, seed=args.seed, device=args.device, eval_every=args.eval_every,
        init_from=init_from, lr_schedule=args.lr_schedule, warmup_epochs=args.warmup_epochs,
        min_lr_ratio=args.min_lr_ratio, batching=args.batching, exclude_seen=args.exclude_seen,
        label_smoothing=args.label_smoothing, contrastive_weight=args.contrastive_weight,
        contrastive_temperature=args.contrastive_temperature,
        contrastive_positives=args.contrastive_positives, item_noise=args.item_noise,
        ema_decay=args.ema_decay, future_weight=args.future_weight,
        future_items=args.future_items, last_target_weight=args.last_target_weight,
    )


def shape_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The model shape flags as `ModelConfig` overrides."""
    return {
        "d_model": args.d_model, "n_layers": args.layers, "n_heads": args.heads,
        "window": args.window, "dropout": args.dropout, "similarity": args.similarity,
        "temperature": args.temperature, "block": args.block,
        "time_features": args.time_features == "on",
    }


def main(args: argparse.Namespace) -> int:
    settings_from_args(args)  # the flags' own checks first, then the data's, then torch
    # refused now, not after training: --out must be new, empty or an earlier artifact
    check_replaceable(args.out, "--out", kind="artifact")
    check_dataset_arguments(args)
    from kvrec.model.train import main as train

    return train(args)
