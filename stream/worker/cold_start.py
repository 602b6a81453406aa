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

from kvrec.state.kvcache import LruByteCache
from kvrec.stream.worker.inference import RecommendCounters, Scored, WaveInput

NO_MODEL = "none"


class PopularRecommender:
    """The `Recommender` interface without a model: live popularity."""

    version = NO_MODEL
    max_events_per_user = 64
    max_tracked_items = 100_000  # the counts of the rarest half are dropped beyond this
    refresh_s = 1.0  # how often the top list is recomputed

    def __init__(self, k: int, exclude_seen: bool = True) -> None:
        self.k = k
        self.exclude_seen = exclude_seen
        self.cache: LruByteCache[object] = LruByteCache(1)  # nothing to cache; for the metrics
        self.counts: dict[str, int] = {}
        self._top: list[tuple[str, int]] = []
        self._top_due = 0.0

    def forget(self, user_ids: Iterable[str]) -> None:
        return None

    def recommend(self, wave: Sequence[WaveInput]) -> tuple[list[Scored], RecommendCounters]:
        for user in wave:
            for event in user.events:
                self.counts[event.item_id] = self.counts.get(event.item_id, 0) + 1
        self._refresh()
        results = []
        for user in wave:
            seen = {event.item_id for event in user.previous} if self.exclude_seen else set()
            for event in user.events:
                if self.exclude_seen:
                    seen.add(event.item_id)
                items = [(item, float(count)) for item, count in self._top if item not in seen]
                results.append(Scored(user.user_id, items[: self.k], cold_start=True,
                                      unknown_item=True))
        return results, RecommendCounters(0, 0, sum(len(user.events) for user in wave))

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
