"""How ragged per-user sequences become the padded tensors the backends take.

`encode` takes histories padded on the left (the newest event in the last column); `extend`
takes new events padded on the right with their counts; `group_by_length` decides which users
share an `extend` call, so that one user with many new events does not pad everyone else's.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch
from torch import Tensor


def pad_left(items: Sequence[Sequence[int]], types: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
    """Rows of item and event-type indices, right-aligned in zero padding: [B, longest]."""
    length = max(len(row) for row in items)
    padded_items = torch.zeros((len(items), length), dtype=torch.long)
    padded_types = torch.zeros((len(items), length), dtype=torch.long)
    for row, (row_items, row_types) in enumerate(zip(items, types, strict=True)):
        if row_items:
            padded_items[row, length - len(row_items) :] = torch.tensor(row_items)
            padded_types[row, length - len(row_types) :] = torch.tensor(row_types)
    return padded_items, padded_types


def pad_right(
    items: Sequence[Sequence[int]], types: Sequence[Sequence[int]]
) -> tuple[Tensor, Tensor, Tensor]:
    """Rows left-aligned in zero padding, and each row's count: [B, longest], [B, longest], [B]."""
    length = max(len(row) for row in items)
    padded_items = torch.zeros((len(items), length), dtype=torch.long)
    padded_types = torch.zeros((len(items), length), dtype=torch.long)
    for row, (row_items, row_types) in enumerate(zip(items, types, strict=True)):
        padded_items[row, : len(row_items)] = torch.tensor(row_items)
        padded_types[row, : len(row_types)] = torch.tensor(row_types)
    return padded_items, padded_types, torch.tensor([len(row) for row in items])


def group_by_length(lengths: Sequence[int]) -> list[list[int]]:
    """Indices of `lengths` in groups for one call each, shortest group first: one group when
    padding everyone to the longest at most doubles the work, else powers of two."""
    longest = max(lengths, default=1)
    if longest > 1 and longest * len(lengths) <= 2 * sum(lengths):
        return [list(range(len(lengths)))]  # little padding: one call beats several
    groups: dict[int, list[int]] = defaultdict(list)
    for index, length in enumerate(lengths):
        groups[1 << (length - 1).bit_length()].append(index)
    return [groups[bucket] for bucket in sorted(groups)]
