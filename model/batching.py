"""Which users share an `extend` call: `group_by_length`, so that one user with many new
events does not pad everyone else's. (The padded tensors themselves are made from the wave's
columns, stream/worker/inference.py `_padded`: histories padded on the left for `encode`, new
events on the right, with their counts, for `extend`.)
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence


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
