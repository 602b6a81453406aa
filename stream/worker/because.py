"""`because`: the recent events that weighed most in the last layer's attention when the model
answered an event (age 0 = the event itself), averaged over heads. The recommender computes it
for a whole wave at once (`Recommender._explain`: one top-k over the stacked attention rows)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Because:
    item_id: str
    event_type: str
    weight: float


def event_type_name(names: Sequence[str], index: int) -> str:
    """The deployment's name of a 1-based event type index ("unknown" outside them)."""
    return names[index - 1] if 0 < index <= len(names) else "unknown"
