"""The offline reference the worker's output is checked against.

For every event, the model's answer is defined as the full forward pass over the user's known
items up to and including that event, with the sliding-window mask (no cache anywhere), and
exact brute-force top-k over every item, leaving out the items of the user's stored window.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from kvrec.model.artifact import Artifact


@dataclass(frozen=True)
class ReferenceEvent:
    user_id: str
    item_id: str
    event_type: int  # 1-based index


@dataclass(frozen=True)
class ReferenceRecommendation:
    user_id: str
    item_ids: list[str]
    scores: list[float]
    cold_start: bool


def reference_recommendations(
    artifact: Artifact,
    events: Iterable[ReferenceEvent],
    *,
    k: int,
    window_capacity: int,
    exclude_seen: bool = True,
) -> list[ReferenceRecommendation]:
    encoder = artifact.encoder.eval()
    item_vectors = encoder.item_embeddings().detach().float().numpy()
    history: dict[str, list[ReferenceEvent]] = defaultdict(list)
    results = []
    for event in events:
        history[event.user_id].append(event)
        window = history[event.user_id][-window_capacity:]
        known = [
            (artifact.item_index[e.item_id], e.event_type)
            for e in history[event.user_id]
            if e.item_id in artifact.item_index
        ]
        if not known:
            results.append(ReferenceRecommendation(event.user_id, [], [], True))
            continue
        items = torch.tensor([[i for i, _ in known]])
        types = torch.tensor([[t for _, t in known]])
        with torch.no_grad():
            vector = encoder(items, types)[0, -1].float().numpy()
        scores = item_vectors @ vector
        scores[0] = -np.inf
        if exclude_seen:
            for e in window:
                if e.item_id in artifact.item_index:
                    scores[artifact.item_index[e.item_id]] = -np.inf
        top = np.argsort(-scores, kind="stable")[:k]
        results.append(
            ReferenceRecommendation(
                event.user_id,
                [artifact.item_ids[int(i)] for i in top],
                [float(scores[int(i)]) for i in top],
                False,
            )
        )
    return results


def assert_same_ranking(
    got_items: list[str], got_scores: list[float], want: ReferenceRecommendation, atol: float = 1e-3
) -> None:
    """Scores equal within `atol`; item ids equal except where neighbouring scores tie."""
    assert len(got_items) == len(want.item_ids), (got_items, want.item_ids)
    np.testing.assert_allclose(got_scores, want.scores, atol=atol)
    for position, (got, expected) in enumerate(zip(got_items, want.item_ids, strict=True)):
        if got != expected:
            tie = abs(got_scores[position] - want.scores[position]) <= atol
            assert tie and expected in got_items, (position, got_items, want.item_ids)


def assert_matches_reference(got: list, events: list[ReferenceEvent], artifact: Artifact,
                             capacity: int, k: int = 5) -> None:
    """One recommendation per event, each the offline full-forward reference's (same user,
    same cold start, same ranking up to ties)."""
    want = reference_recommendations(artifact, events, k=k, window_capacity=capacity)
    assert len(got) == len(want) == len(events)
    for g, w in zip(got, want, strict=True):
        assert g.user_id == w.user_id
        assert g.cold_start == w.cold_start
        if not w.cold_start:
            assert_same_ranking([i for i, _ in g.items], [s for _, s in g.items], w)
