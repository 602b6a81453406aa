"""What a training step minimises: the loss of `--loss` on a target (or a target
distribution: `--future-weight`, `--last-target-weight`), and the regularisers: item noise on
the inputs (`--item-noise`) and a contrastive loss between two views of each user
(`--contrastive-weight`; DuoRec's same-target positives, `--contrastive-positives`).
model/train.py runs the steps.
"""

from __future__ import annotations

import random

import torch
from torch.nn import functional as F

from kvrec.model.encoder import Encoder
from kvrec.model.losses import softmax_cross_entropy
from kvrec.model.train_command import TrainSettings


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


def training_loss(
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
