"""Live quality by model version, and shadow scoring.

The prequential hit rate: an event is a hit when its item was in the list the user got last.
It is counted under the version that made that list, so each version is judged on the events
that came after its own lists, in both roles:
- `serve`: the lists the worker published;
- `shadow`: a candidate version scores the events of a sample of users (by a hash of the user
  id, so a user is in or out for good) beside the serving one; its lists are never published.
`kvrec_live_events{version,role}` and `kvrec_live_hits{version,role}` export the counts, and
the worker publishes them to the `model-live-stats` topic, where `kvrec models` sums them over
the workers.
"""

from __future__ import annotations

import logging
import zlib
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from kvrec.stream.worker.inference import Scored, ScoredBatch, WaveInput

log = logging.getLogger("kvrec.worker")

SERVE, SHADOW = "serve", "shadow"


@dataclass
class LiveHits:
    """The users' last lists (bounded, least recent out first) and the counts by version."""

    role: str
    max_users: int
    # user -> (version, its list, how to find an item id in it): model item indices and the
    # catalog's index of ids for a `ScoredBatch` (no string per listed item), else the ids
    last: OrderedDict[str, tuple[str, Sequence[object], Mapping[str, int] | None]] = field(
        default_factory=OrderedDict)
    counts: dict[tuple[str, str], list[int]] = field(default_factory=dict)  # -> [events, hits]

    def observe(self, wave: Sequence[WaveInput], scored: Sequence[Scored], version: str) -> None:
        """`scored`: one result per event of `wave`, users in order, each user's in order."""
        index: Mapping[str, int] | None
        if isinstance(scored, ScoredBatch) and scored.item_index is not None:
            lists: Iterator[Sequence[object]] = iter(scored.items)
            index = scored.item_index
        else:
            lists = iter([item for item, _ in result.items] for result in scored)
            index = None
        last, role, counted = self.last, self.role, self.counts
        for user in wave:
            user_id = user.user_id
            for event in user.events:
                before = last.pop(user_id, None)
                if before is not None:
                    counts = counted.get((before[0], role))
                    if counts is None:
                        counts = counted[(before[0], role)] = [0, 0]
                    counts[0] += 1
                    found = before[2]
                    # an item the list's catalog does not know is in none of its lists
                    counts[1] += (found.get(event.item_id, 0) if found is not None
                                  else event.item_id) in before[1]
                last[user_id] = (version, next(lists), index)
        while len(last) > self.max_users:
            last.popitem(last=False)

    def snapshot(self) -> dict[tuple[str, str], tuple[int, int]]:
        return {key: (events, hits) for key, (events, hits) in self.counts.items()}


def in_sample(user_id: str, share: float) -> bool:
    return zlib.crc32(user_id.encode("utf-8", "surrogatepass")) < share * 2**32


@dataclass
class Shadow:
    """A candidate recommender that scores the sampled users' events; nothing is published.
    Its failures never touch the serving path: they are counted and the shadow stops after
    `max_failures` in a row."""

    recommender: object  # a stream.worker.inference.Recommender
    share: float
    hits: LiveHits
    failures: int = 0
    max_failures: int = 10

    @property
    def version(self) -> str:
        return self.recommender.version  # type: ignore[attr-defined,no-any-return]

    @property
    def stopped(self) -> bool:
        return self.failures >= self.max_failures

    def score(self, wave: Sequence[WaveInput]) -> bool:
        """Score the sampled users of a wave; False if the candidate failed."""
        sampled = [user for user in wave if in_sample(user.user_id, self.share)]
        if not sampled or self.stopped:
            return True
        try:
            scored, _ = self.recommender.recommend(sampled)  # type: ignore[attr-defined]
        except Exception as exc:  # the candidate's problem, never the serving path's
            self.failures += 1
            log.warning("shadow model %s failed (%d in a row): %r", self.version, self.failures, exc)
            if self.stopped:
                log.error("shadow model %s stopped after %d failures", self.version, self.failures)
            return False
        self.failures = 0
        self.hits.observe(sampled, scored, self.version)
        return True
