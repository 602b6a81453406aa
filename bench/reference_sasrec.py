"""`kvrec bench reference`: the public reference, SASRec with full cross-entropy, run here.

    kvrec bench reference --data amazon-beauty --format sequences --threads 1 \\
        --json bench/results/quality-amazon-beauty-reference.json

SASRec (Kang & McAuley 2018) as pmixer/SASRec.pytorch builds it (python/model.py, the layout
that repository had from 2020 until its 2025 pre-/post-LN rework, and that SASRec+ was measured
with), trained with the full-softmax cross-entropy of SASRec+ (Klenitskiy & Vasilev, RecSys
2023) instead of one sampled negative with BCE. Written here from the papers and a reading of
the public code (none of it copied); line by line:

- every sequence is left-padded to `max_len` (the newest event last, at position `max_len`;
  padding at position 0); item embeddings scaled by sqrt(d), plus learned absolute positional
  embeddings, dropout on the sum, then padding rows zeroed (pmixer's timeline mask);
- `blocks` blocks, each: q = LN(x); x = q + causal-attention(query q, keys and values x)
  (only the query is normalised, and the residual is added to it); x = LN(x); x = x + FFN(x),
  FFN = Linear, dropout, ReLU, Linear, dropout; padding rows zeroed again; dropout on the
  attention weights; a final LayerNorm; every LayerNorm eps 1e-8;
- padding keys are not masked: a real position attends to the zeroed padding rows before it
  (their keys and values are the projections' biases), as pmixer's does, so a short history's
  output depends on `max_len`; this is why every sequence is padded to `max_len`;
- scores = the last position's vector . item embeddings (tied, as in SASRec);
- Xavier-normal initialisation of every matrix (biases and LayerNorm as torch leaves them),
  padding rows of both embeddings zero; Adam, betas (0.9, 0.98), no weight decay;
- pmixer's sampler: the users in a random order, reshuffled after each pass over them,
  batches of `batch_size`, ceil(users / batch_size) batches an epoch; a user with fewer than 2
  training events is replaced by a random user; each user's last `max_len` + 1 training
  events give `max_len` inputs and their next items; the loss at every non-padding position
  is the cross-entropy of the next item over the whole catalog (the padding index excluded),
  averaged over the batch's positions.

Settings (defaults): the issue's public run, which are the original SASRec paper's for the
Amazon data: max_len 50, d 50, 2 blocks, 1 head, dropout 0.5, lr 1e-3, batch 128. The epoch
budget, the same rule for every dataset: at most `--epochs` 200, validation NDCG@10 after every
epoch, stop after `--patience` 10 epochs without a better one (kvrec train's rule), keep the
best weights (the checkpoint with the best validation NDCG@10).
`--time-limit-s` stops training early (a safety for a shared machine; the JSON says so).

Split and metric are `kvrec eval`'s: leave-one-out via `model.evaluate.prepare`, the target
ranked against every item with the user's history excluded and ties counted against the target
(`model.evaluate.rank_split` / `rank_targets`), popularity over the training events.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from kvrec.bench.machine import machine_info
from kvrec.errors import ConfigError
from kvrec.flags import integer, number
from kvrec.model.checksums import file_sha256
from kvrec.model.datasets import Interaction, add_dataset_arguments, dataset_from_args
from kvrec.model.evaluate import Prepared, evaluate_popularity, metrics_from_ranks, prepare, rank_split
from kvrec.model.named_datasets import NAMED_DATASETS, resolve_named

SOURCE = "pmixer/SASRec.pytorch python/model.py (2020-2025 layout) + full CE (Klenitskiy & Vasilev 2023)"


@dataclass
class ReferenceSettings:
    """The issue's public run of pmixer/SASRec.pytorch, with full cross-entropy."""

    hidden: int = 50
    blocks: int = 2
    heads: int = 1
    max_len: int = 50
    dropout: float = 0.5
    lr: float = 1e-3
    batch_size: int = 128
    epochs: int = 200
    patience: int = 10
    seed: int = 0
    time_limit_s: float = 0.0  # 0 = none


class Block(nn.Module):
    """q = LN(x); x = q + attention(q, x, x); x = LN(x); x = x + FFN(x); padding rows zeroed."""

    def __init__(self, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(hidden, eps=1e-8)
        self.attention = nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True)
        self.ffn_norm = nn.LayerNorm(hidden, eps=1e-8)
        self.ffn = nn.Sequential(
            nn.Linear(hidden, hidden), nn.Dropout(dropout), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor, blocked: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        query = self.attention_norm(x)
        attended, _ = self.attention(query, x, x, attn_mask=blocked, need_weights=False)
        x = self.ffn_norm(query + attended)
        return (x + self.ffn(x)) * real


class ReferenceSASRec(nn.Module):
    """`forward(items, types)` -> [B, max_len, d] (types ignored: SASRec has none; the input
    left-padded or cut to `max_len`); `score(v)` -> [B, n_items + 1], the interface
    `model.evaluate.rank_split` ranks with."""

    def __init__(self, n_items: int, settings: ReferenceSettings) -> None:
        super().__init__()
        self.max_len = settings.max_len
        self.item_embedding = nn.Embedding(n_items + 1, settings.hidden, padding_idx=0)
        self.position_embedding = nn.Embedding(settings.max_len + 1, settings.hidden, padding_idx=0)
        self.embedding_dropout = nn.Dropout(settings.dropout)
        self.blocks = nn.ModuleList(
            Block(settings.hidden, settings.heads, settings.dropout) for _ in range(settings.blocks)
        )
        self.last_norm = nn.LayerNorm(settings.hidden, eps=1e-8)
        for parameter in self.parameters():
            if parameter.dim() >= 2:
                nn.init.xavier_normal_(parameter)
        with torch.no_grad():
            self.item_embedding.weight[0].zero_()
            self.position_embedding.weight[0].zero_()

    def forward(self, items: torch.Tensor, types: torch.Tensor | None = None) -> torch.Tensor:
        items = F.pad(items[:, -self.max_len :], (self.max_len - min(items.shape[1], self.max_len), 0))
        real = (items != 0).unsqueeze(-1)
        positions = torch.arange(1, self.max_len + 1, device=items.device) * real.squeeze(-1)
        x = self.item_embedding(items) * math.sqrt(self.item_embedding.embedding_dim)
        x = self.embedding_dropout(x + self.position_embedding(positions)) * real
        blocked = ~torch.ones(self.max_len, self.max_len, dtype=torch.bool, device=items.device).tril()
        for block in self.blocks:
            x = block(x, blocked, real)
        return self.last_norm(x)

    def score(self, vectors: torch.Tensor) -> torch.Tensor:
        return vectors @ self.item_embedding.weight.T


def item_vocabulary(interactions: list[Interaction]) -> dict[str, int]:
    """Item id -> index 1..n, in order of first appearance in replay order."""
    index: dict[str, int] = {}
    for interaction in interactions:
        index.setdefault(interaction.item_id, len(index) + 1)
    return index


def training_batch(
    sequences: list[list[int]], chosen: np.ndarray, max_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-item targets, each user's last `max_len` + 1 events, left-padded to
    `max_len`."""
    inputs = torch.zeros((len(chosen), max_len), dtype=torch.long)
    targets = torch.zeros((len(chosen), max_len), dtype=torch.long)
    for i, user in enumerate(chosen):
        row = sequences[user][-(max_len + 1) :]
        n = len(row) - 1
        inputs[i, max_len - n :] = torch.tensor(row[:-1])
        targets[i, max_len - n :] = torch.tensor(row[1:])
    return inputs, targets


class UserSampler:
    """pmixer's sampler: users in a random order, reshuffled after each pass; a user with fewer
    than 2 training events is replaced by a random user until one has 2."""

    def __init__(self, sequences: list[list[int]], rng: np.random.Generator) -> None:
        self.sequences = sequences
        self.rng = rng
        self.order = rng.permutation(len(sequences))
        self.counter = 0
        if not any(len(s) >= 2 for s in sequences):
            raise ConfigError("no user has 2 training events: nothing to train on")

    def batch(self, size: int) -> np.ndarray:
        chosen = np.empty(size, dtype=np.int64)
        for i in range(size):
            if self.counter % len(self.order) == 0:
                self.rng.shuffle(self.order)
            user = int(self.order[self.counter % len(self.order)])
            self.counter += 1
            while len(self.sequences[user]) < 2:
                user = int(self.rng.integers(0, len(self.sequences)))
            chosen[i] = user
        return chosen


def full_ce_loss(
    model: ReferenceSASRec, hidden: torch.Tensor, targets: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """Cross-entropy of the next item over the whole catalog at every non-padding position."""
    keep = targets != 0
    logits = model.score(hidden[keep])
    logits[:, 0] = float("-inf")  # the padding index is not an item
    return F.cross_entropy(logits, targets[keep], reduction=reduction)


def batch_step(
    model: ReferenceSASRec, sequences: list[list[int]], chosen: np.ndarray, max_len: int
) -> float:
    """Accumulate the gradient of the batch's mean cross-entropy over its non-padding positions."""
    inputs, targets = training_batch(sequences, chosen, max_len)
    loss = full_ce_loss(model, model(inputs), targets)
    loss.backward()
    return float(loss.item())


def evaluate(model: ReferenceSASRec, prepared: Prepared, split: str, max_len: int) -> dict[str, float]:
    chosen = prepared.validation if split == "validation" else prepared.test
    return metrics_from_ranks(rank_split(model, chosen, max_len=max_len))


def _epoch(model: ReferenceSASRec, optimizer: torch.optim.Optimizer, sequences: list[list[int]],
           sampler: UserSampler, batches: int, settings: ReferenceSettings) -> float:
    """`batches` steps on the sampler's batches of users (pmixer's order); the summed loss."""
    model.train()
    total = 0.0
    for _ in range(batches):
        chosen = sampler.batch(settings.batch_size)
        optimizer.zero_grad(set_to_none=True)
        total += batch_step(model, sequences, chosen, settings.max_len)
        optimizer.step()
    return total


def _stop_reason(settings: ReferenceSettings, epochs_since_best: int, train_seconds: float) -> str | None:
    if epochs_since_best >= settings.patience:
        return "patience"
    if settings.time_limit_s and train_seconds >= settings.time_limit_s:
        return "time limit"
    return None


def train_reference(
    interactions: list[Interaction], settings: ReferenceSettings, log: Any = print
) -> dict[str, Any]:
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    item_index = item_vocabulary(interactions)
    prepared = prepare(interactions, item_index, {"purchase": 1})
    sequences = prepared.train_items
    sampler = UserSampler(sequences, rng)
    model = ReferenceSASRec(len(item_index), settings)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr, betas=(0.9, 0.98))
    batches = math.ceil(len(sequences) / settings.batch_size)
    best: dict[str, Any] = {"ndcg@10": -1.0}
    best_state: dict[str, torch.Tensor] = {}
    history: list[dict[str, Any]] = []
    stopped_by, train_seconds, epoch = "epochs", 0.0, 0
    for epoch in range(1, settings.epochs + 1):
        started = time.perf_counter()
        total = _epoch(model, optimizer, sequences, sampler, batches, settings)
        validation = evaluate(model, prepared, "validation", settings.max_len)
        train_seconds += time.perf_counter() - started
        point = {
            "epoch": epoch, "seconds": round(train_seconds, 1), "loss": total / batches,
            "val_ndcg@10": validation["ndcg@10"], "val_hr@10": validation["hr@10"],
        }
        history.append(point)
        improved = validation["ndcg@10"] > best["ndcg@10"]
        if improved:
            best = {**validation, "epoch": epoch}
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        log(f"epoch {epoch} loss {point['loss']:.4f} val NDCG@10 {validation['ndcg@10']:.4f} "
            f"HR@10 {validation['hr@10']:.4f}{' *' if improved else ''} {train_seconds:.0f} s")
        if reason := _stop_reason(settings, epoch - best["epoch"], train_seconds):
            stopped_by = reason
            break
    model.load_state_dict(best_state)
    test = evaluate(model, prepared, "test", settings.max_len)
    log(f"best epoch {best['epoch']}: test NDCG@10 {test['ndcg@10']:.4f} HR@10 {test['hr@10']:.4f}")
    validation_best = {k: v for k, v in best.items() if k != "epoch"}
    return {
        "system": "reference SASRec + full CE",
        "source": SOURCE,
        "settings": asdict(settings),
        "optimizer": "Adam, betas (0.9, 0.98), no weight decay",
        "users_evaluated": len(prepared.test.targets),
        "items": len(item_index),
        "interactions": len(interactions),
        "epochs_run": epoch,
        "best_epoch": best["epoch"],
        "stopped_by": stopped_by,
        "train_seconds": round(train_seconds, 1),
        "validation": validation_best,
        "test": test,
        "validation_test_gap_ndcg@10": validation_best["ndcg@10"] - test["ndcg@10"],
        "popularity_test": evaluate_popularity(prepared.popularity, prepared.test),
        "popularity_validation": evaluate_popularity(prepared.popularity, prepared.validation),
        "history": history,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataset_arguments(parser)
    defaults = ReferenceSettings()
    parser.add_argument("--hidden", type=integer(1), default=defaults.hidden)
    parser.add_argument("--blocks", type=integer(1), default=defaults.blocks)
    parser.add_argument("--heads", type=integer(1), default=defaults.heads)
    parser.add_argument("--max-len", type=integer(1), default=defaults.max_len)
    parser.add_argument("--dropout", type=number(0.0, 0.99), default=defaults.dropout)
    parser.add_argument("--lr", type=number(0.0), default=defaults.lr)
    parser.add_argument("--batch-size", type=integer(1), default=defaults.batch_size)
    parser.add_argument("--epochs", type=integer(1), default=defaults.epochs)
    parser.add_argument("--patience", type=integer(1), default=defaults.patience)
    parser.add_argument(
        "--time-limit-s", type=number(0.0), default=defaults.time_limit_s,
        help="stop training after this many seconds (0 = none); the JSON records it",
    )
    parser.add_argument("--threads", type=integer(0), default=1, help="torch threads (0 = default)")
    parser.add_argument("--json", required=True, help="write the result here")


def main(args: argparse.Namespace) -> int:
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    settings = ReferenceSettings(
        hidden=args.hidden, blocks=args.blocks, heads=args.heads, max_len=args.max_len,
        dropout=args.dropout, lr=args.lr, batch_size=args.batch_size, epochs=args.epochs,
        patience=args.patience, seed=args.seed, time_limit_s=args.time_limit_s,
    )
    if settings.hidden % settings.heads:
        raise ConfigError("--hidden must be a multiple of --heads")
    interactions = dataset_from_args(args)
    result = train_reference(interactions, settings, log=lambda line: print(line, flush=True))
    data: dict[str, Any] = {"format": args.format, "data": args.data}
    if args.data is not None:
        file = resolve_named(args.data, args.format)
        data["sha256"] = file_sha256(file)
        data["named"] = args.data if args.data in NAMED_DATASETS else None
    out = {"benchmark": "reference", "dataset": data, **result, "machine": machine_info()}
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    return 0
