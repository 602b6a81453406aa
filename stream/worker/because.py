"""`because`: the recent events that weighed most in the last layer's attention when the model
answered an event (age 0 = the event itself), averaged over heads."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from state.window import WindowEvent


@dataclass(frozen=True)
class Because:
    item_id: str
    event_type: str
    weight: float


def explain(
    attentions: Sequence[torch.Tensor | None],
    history: Sequence[tuple[list[WindowEvent], int]],
    event_type_names: Sequence[str],
    count: int,
) -> list[list[Because]]:
    """For each answer: its attention over the window (None: nothing to explain, the event's
    item is unknown and the attention is an older event's) and (known events, how many of them
    up to this answer). Up to `count` events each, heaviest first."""
    out: list[list[Because]] = [[] for _ in attentions]
    rows = [q for q, a in enumerate(attentions) if a is not None]
    if not rows or count <= 0:
        return out
    weights = torch.stack([attentions[q] for q in rows]).float().cpu()  # type: ignore[misc]
    top = torch.topk(weights, min(count, weights.shape[1]), dim=1)
    for q, values, ages in zip(rows, top.values.tolist(), top.indices.tolist(), strict=True):
        events, upto = history[q]
        out[q] = [
            Because(
                events[upto - 1 - a].item_id,
                _event_type_name(event_type_names, events[upto - 1 - a].event_type),
                round(w, 4),
            )
            for w, a in zip(values, ages, strict=True)
            if w > 0.0 and a < upto
        ]
    return out


def _event_type_name(names: Sequence[str], index: int) -> str:
    return names[index - 1] if 0 < index <= len(names) else "unknown"
