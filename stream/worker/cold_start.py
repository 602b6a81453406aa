"""Cold-start mode: the worker serves with no model at all (none announced, none given).

Every event gets the most popular items among the events this worker has seen (counted live,
most recent catalog first), marked `cold_start`, with `model_version` "none". The worker says
so in its log and in `kvrec_model_info{version="none"}`, and swaps to the first model that
is announced and passes its checks.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Iterable, Sequence

from kvrec.stream.worker.inference import RecommendCounters, ScoredBatch, WaveInput

NO_MODEL = "none"


class NoCache:
    """The cache of a recommender that keeps nothing per user."""

    bytes_used = 0


class PopularRecommender:
    """A `WaveRecommender` (stream/worker/protocols.py) without a model: live popularity. Its
    `ScoredBatch`'s catalog is the call's listed items (row 0: none)."""

    version = NO_MODEL
    max_events_per_user = 64
    max_tracked_items = 100_000  # the counts of the rarest half are dropped beyond this
    refresh_s = 1.0  # how often the top list is recomputed

    def __init__(self, k: int, exclude_seen: bool = True) -> None:
        self.k = k
        self.exclude_seen = exclude_seen
        self.cache = NoCache()
        self.counts: dict[str, int] = {}
        self._top: list[tuple[str, int]] = []
        self._top_due = 0.0

    def forget(self, user_ids: Iterable[str]) -> None:
        return None

    def recommend(self, wave: Sequence[WaveInput]) -> tuple[ScoredBatch, RecommendCounters]:
        for user in wave:
            for event in user.events:
                self.counts[event.item_id] = self.counts.get(event.item_id, 0) + 1
        self._refresh()
        top = self._top
        item_ids = ["", *(item for item, _ in top)]
        batch = ScoredBatch(item_ids, (), {item: i for i, item in enumerate(item_ids) if i})
        for user in wave:
            seen = {event.item_id for event in user.previous} if self.exclude_seen else set()
            for event in user.events:
                if self.exclude_seen:
                    seen.add(event.item_id)
                listed = [i for i, (item, _) in enumerate(top, start=1) if item not in seen][: self.k]
                batch.user_ids.append(user.user_id)
                batch.items.append(listed)
                batch.scores.append([float(top[i - 1][1]) for i in listed])
                batch.because.append([])
                batch.cold_start.append(True)
                batch.unknown_item.append(True)
        return batch, RecommendCounters(0, 0, sum(len(user.events) for user in wave))

    def _refresh(self) -> None:
        now = time.monotonic()
        if now < self._top_due and len(self._top) >= self.k:
            return
        self._top_due = now + self.refresh_s
        if len(self.counts) > self.max_tracked_items:
            keep = heapq.nlargest(self.max_tracked_items // 2, self.counts.items(), key=_count)
            self.counts = dict(keep)
        # k plus a margin, so that a user's own seen items can be left out
        self._top = heapq.nlargest(self.k * 4 + 16, self.counts.items(), key=_count)


def _count(entry: tuple[str, int]) -> int:
    return entry[1]
