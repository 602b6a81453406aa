"""`kvrec bench reference`: the public reference, SASRec with full cross-entropy, run here.

    kvrec bench reference --data amazon-beauty --format sequences --threads 1 \\
        --json bench/results/quality-amazon-beauty-reference.json

SASRec (Kang & McAuley 2018) as pmixer/SASRec.pytorch builds it, trained with the full-softmax
cross-entropy of SASRec+ (Klenitskiy & Vasilev, RecSys 2023) instead of one sampled negative
with BCE. Written here from the papers and a reading of the public code (none of it copied):

- item embeddings scaled by sqrt(d), plus learned absolute positional embeddings; positions
  are counted as in a sequence left-padded to `max_len`, so the newest event always has
  position `max_len`; dropout on the sum;
- `blocks` pre-LayerNorm blocks (pmixer's `--norm_first`): x + causal self-attention(LN(x)),
  then x + FFN(LN(x)), FFN = Linear, dropout, ReLU, Linear, dropout (pmixer's order), dropout
  on the attention weights; a final LayerNorm; LayerNorm eps 1e-8;
- scores = the last position's vector . item embeddings (tied, as in SASRec);
- Xavier-normal initialisation of every matrix, padding rows zero; Adam, betas (0.9, 0.98),
  no weight decay (pmixer's `--l2_emb 0`);
- batches of `batch_size` users drawn uniformly at random (pmixer's sampler: with
  replacement, users with at least 2 training events), ceil(users / batch_size) batches an
  epoch; each user's last `max_len` training events; the loss at every non-padding position is
  the cross-entropy of the next item over the whole catalog (the padding index excluded).

Padding: padding keys are masked out of attention (pmixer lets a real position attend to the
zero-embedded padding before it; a padded position here attends only to itself), so a real
position's output does not depend on its row's padding; a batch is therefore run as chunks of
users of similar length (`batch_step`), with the loss and gradient of the whole batch.

Settings (defaults, pmixer's for this model family): d 50, 2 blocks, 1 head, max_len 200,
dropout 0.2, lr 1e-3, batch 128. The epoch budget, the same rule for every dataset: at most
`--epochs` 200, validation NDCG@10 after every epoch, stop after `--patience` 10 epochs without
a better one (kvrec train's rule), keep the best weights (pmixer trains a fixed 1,000
epochs and reports the best figures it saw; early stopping on validation is the SASRec+
protocol and picks nothing by test).
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

CHUNK_POSITIONS = 2048  # padded positions per forward pass within a batch (`batch_step`)
SOURCE = "pmixer/SASRec.pytorch python/model.py (norm_first) + full CE (Klenitskiy & Vasilev 2023)"


@dataclass
class ReferenceSettings:
    """pmixer/SASRec.pytorch's defaults (python/main.py), pre-LN, with full cross-entropy."""

    hidden: int = 50
    blocks: int = 2
    heads: int = 1
    max_len: int = 200
    dropout: float = 0.2
    lr: float = 1e-3
    batch_size: int = 128
    epochs: int = 200
    patience: int = 10
    seed: int = 0
    time_limit_s: float = 0.0  # 0 = none


class Block(nn.Module):
    def __init__(self, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(hidden, eps=1e-8)
        self.attention = nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True)
        self.ffn_norm = nn.LayerNorm(hidden, eps=1e-8)
        self.ffn = nn.Sequential(
            nn.Linear(hidden, hidden), nn.Dropout(dropout), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor, blocked: torch.Tensor) -> torch.Tensor:
        normed = self.attention_norm(x)
        attended, _ = self.attention(normed, normed, normed, attn_mask=blocked, need_weights=False)
        x = x + attended
        return x + self.ffn(self.ffn_norm(x))


class ReferenceSASRec(nn.Module):
    """`forward(items, types)` -> [B, T, d] (types ignored: SASRec has none); `score(v)` ->
    [B, n_items + 1], the interface `model.evaluate.rank_split` ranks with."""

    def __init__(self, n_items: int, settings: ReferenceSettings) -> None:
        super().__init__()
        self.max_len = settings.max_len
        self.heads = settings.heads
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
        items = items[:, -self.max_len :]
        length = items.shape[1]
        real = items != 0
        positions = torch.arange(self.max_len - length + 1, self.max_len + 1, device=items.device)
        positions = positions.expand_as(items) * real
        x = self.item_embedding(items) * math.sqrt(self.item_embedding.embedding_dim)
        x = self.embedding_dropout(x + self.position_embedding(positions))
        causal = torch.ones(length, length, dtype=torch.bool, device=items.device).tril()
        allowed = causal & real[:, None, :]  # [B, query, key]
        allowed |= torch.eye(length, dtype=torch.bool, device=items.device)
        blocked = (~allowed).repeat_interleave(self.heads, dim=0)
        for block in self.blocks:
            x = block(x, blocked)
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
    """Inputs and next-item targets, left-padded to the batch's longest sequence."""
    rows = [sequences[u][-(max_len + 1) :] for u in chosen]
    length = max(len(r) for r in rows) - 1
    inputs = torch.zeros((len(rows), length), dtype=torch.long)
    targets = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row) - 1
        inputs[i, length - n :] = torch.tensor(row[:-1])
        targets[i, length - n :] = torch.tensor(row[1:])
    return inputs, targets


def full_ce_loss(
    model: ReferenceSASRec, hidden: torch.Tensor, targets: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """Cross-entropy of the next item over the whole catalog at every non-padding position."""
    keep = targets != 0
    logits = model.score(hidden[keep])
    logits[:, 0] = float("-inf")  # the padding index is not an item
    return F.cross_entropy(logits, targets[keep], reduction=reduction)


def length_chunks(lengths: list[int], budget: int = CHUNK_POSITIONS) -> list[list[int]]:
    """Indices sorted by length, cut into chunks of at most `budget` padded positions."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    chunks: list[list[int]] = []
    chunk: list[int] = []
    for index in order:
        if chunk and (len(chunk) + 1) * lengths[index] > budget:
            chunks.append(chunk)
            chunk = []
        chunk.append(index)
    if chunk:
        chunks.append(chunk)
    return chunks


def batch_step(
    model: ReferenceSASRec, sequences: list[list[int]], chosen: np.ndarray, max_len: int
) -> float:
    """Accumulate the gradient of the batch's mean cross-entropy over its non-padding positions.

    The batch is run as chunks of users of similar length: with padding keys masked and
    positions counted from the newest event, a position's output does not depend on how much
    padding its row has, so this is the loss and gradient of the batch padded as one, without
    running the transformer on padding (a random batch of 128 users here is mostly padding)."""
    lengths = [min(len(sequences[u]), max_len + 1) - 1 for u in chosen]
    positions = sum(lengths)
    total = 0.0
    for chunk in length_chunks(lengths):
        inputs, targets = training_batch(sequences, chosen[chunk], max_len)
        loss = full_ce_loss(model, model(inputs), targets, reduction="sum") / positions
        loss.backward()
        total += loss.item()
    return total


def evaluate(model: ReferenceSASRec, prepared: Prepared, split: str, max_len: int) -> dict[str, float]:
    chosen = prepared.validation if split == "validation" else prepared.test
    return metrics_from_ranks(rank_split(model, chosen, max_len=max_len))


def _epoch(model: ReferenceSASRec, optimizer: torch.optim.Optimizer, sequences: list[list[int]],
           batches: int, settings: ReferenceSettings, rng: np.random.Generator) -> float:
    """`batches` steps on random batches of users (with replacement, as the reference does);
    the summed loss."""
    model.train()
    total = 0.0
    for _ in range(batches):
        chosen = rng.integers(0, len(sequences), settings.batch_size)
        optimizer.zero_grad(set_to_none=True)
        total += batch_step(model, sequences, chosen, settings.max_len)
        optimizer.step()
    return total


def train_reference(
    interactions: list[Interaction], settings: ReferenceSettings, log: Any = print
) -> dict[str, Any]:
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    item_index = item_vocabulary(interactions)
    prepared = prepare(interactions, item_index, {"purchase": 1})
    sequences = [items for items in prepared.train_items if len(items) >= 2]
    model = ReferenceSASRec(len(item_index), settings)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr, betas=(0.9, 0.98))
    batches = math.ceil(len(sequences) / settings.batch_size)
    best: dict[str, Any] = {"ndcg@10": -1.0}
    best_state: dict[str, torch.Tensor] = {}
    history: list[dict[str, Any]] = []
    stopped_by, train_seconds, epoch = "epochs", 0.0, 0
    for epoch in range(1, settings.epochs + 1):
        started = time.perf_counter()
        total = _epoch(model, optimizer, sequences, batches, settings, rng)
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
        if epoch - best["epoch"] >= settings.patience:
            stopped_by = "patience"
            break
        if settings.time_limit_s and train_seconds >= settings.time_limit_s:
            stopped_by = "time limit"
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
