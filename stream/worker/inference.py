"""Micro-batched inference: windows + new events in, recommendations out.

A wave holds, for each of its users, the stored window before the wave and the user's new
events (up to W of them, in order). The user's key/value cache is looked up by (user, model
version); it is valid only if it was built from exactly the known events before the new ones
(it records the input offset of the last event it encoded); anything else is a miss. A miss
refills the cache with `encode` over the last N*(W-1) known events before the new ones, which
is exact, so a recommendation is the same whether the cache was warm or refilled. Then
`extend` advances every user by all its new events in one pass (users grouped by how many
they have; `step` where each has one), and one batched retrieval finds the top-k of every
event: one recommendation per event, as if the events had come one by one.

Events whose item the model does not know (a new product) stay in the window but are skipped
by the encoder: the recommendation is the one of the user's latest known event. A user with no
known event at all gets the artifact's popular items, marked `cold_start`.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from model.artifact import Artifact
from model.backends import StepBackend
from model.encoder import KVCache
from model.retrieval import Retriever
from state.kvcache import LruByteCache
from state.window import WindowEvent


@dataclass
class CacheEntry:
    """What the worker keeps in memory for a user between waves: the key/value cache after
    the user's last known event, and the window's known events with their item indices, so
    that the next wave needs no pass over the stored window."""

    kv: KVCache  # batch of one
    vector: torch.Tensor  # [d]: the user vector after the last known event
    window_end_offset: int  # input offset of the window's newest event when this was made
    known_at: list[int]  # the window's known events: their index in the user's whole history
    known_items: list[int]  # ... their item indices
    known_events: list[WindowEvent]  # ... the events

    def nbytes(self) -> int:
        vector = self.vector.numel() * self.vector.element_size()
        return self.kv.nbytes() + vector + 256 + 120 * len(self.known_at)


@dataclass(frozen=True)
class Because:
    item_id: str
    event_type: str
    weight: float


@dataclass
class Scored:
    """One event's recommendation, before it is put on the wire."""

    user_id: str
    items: list[tuple[str, float]]
    because: list[Because] = field(default_factory=list)
    cold_start: bool = False
    unknown_item: bool = False


@dataclass(frozen=True)
class RecommendCounters:
    """What one `recommend` call saw, for the worker's metrics."""

    cache_hits: int
    cache_misses: int
    unknown_items: int


@dataclass(frozen=True)
class WaveInput:
    """One user's new events of a wave, with the window as it was before them."""

    user_id: str
    previous: list[WindowEvent]  # the stored window before this wave's events, oldest first
    events: list[WindowEvent]  # this wave's events of the user, oldest first
    capacity: int  # the stored window's capacity (a recommendation leaves out what is in it)
    first_index: int  # index of previous[0] in the user's whole history (events ever seen)


@dataclass
class _UserPlan:
    """What one user of a wave needs: its known events and where each answer comes from."""

    known_at: list[int]  # known events of previous + events: index in the user's history
    known_items: list[int]  # ... their item indices
    known_events: list[WindowEvent]  # ... the events
    n_previous: int  # how many of them come before the wave
    answered_by: list[int]  # per new event: index into the new known events, -1 = before them
    kv: KVCache | None = None  # cache before the new known events (None: refill)
    vectors: torch.Tensor | None = None  # [new known, d], after `extend`
    attention: torch.Tensor | None = None  # [new known, W]
    previous_vector: torch.Tensor | None = None  # the answer before the wave's known events

    @property
    def new_count(self) -> int:
        return len(self.known_at) - self.n_previous


class Recommender:
    """Runs `extend`/`step` and retrieval for waves of events against one model artifact."""

    def __init__(
        self,
        artifact: Artifact,
        backend: StepBackend,
        retriever: Retriever,
        cache: LruByteCache[CacheEntry],
        *,
        k: int = 10,
        exclude_seen: bool = True,
        because_count: int = 3,
        reuse_cache: bool = True,
    ) -> None:
        """`reuse_cache=False` is the no-cache baseline: every event is its own wave entry and
        re-encodes the user's stored window (same answers, the cost a cache saves)."""
        self.artifact = artifact
        self.reuse_cache = reuse_cache
        self.backend = backend
        self.retriever = retriever
        self.cache = cache
        self.k = k
        self.exclude_seen = exclude_seen
        self.because_count = because_count
        self.history = artifact.config.history_needed
        popular = np.argsort(-artifact.popularity[1:], kind="stable")[: max(k, 1) * 4] + 1
        self._popular = [int(i) for i in popular]
        self._popular_scores = artifact.popularity.astype(np.float64)
        self.unknown_items = 0

    @property
    def version(self) -> str:
        return self.artifact.version

    @property
    def max_events_per_user(self) -> int:
        """How many events of one user a wave may hold (what one `extend` advances)."""
        if not self.reuse_cache or not hasattr(self.backend, "extend"):
            return 1
        return self.artifact.config.window

    def forget(self, user_ids: Iterable[str]) -> None:
        """Drop the users' caches (after a failed wave): their next wave refills exactly."""
        for user_id in user_ids:
            self.cache.discard(user_id, self.version)

    def recommend(self, wave: Sequence[WaveInput]) -> tuple[list[Scored], RecommendCounters]:
        """One recommendation per event: users in the wave's order, each user's in order."""
        hits, misses, unknown = self.cache.stats.hits, self.cache.stats.misses, self.unknown_items
        scored = self._recommend(wave)
        return scored, RecommendCounters(
            self.cache.stats.hits - hits, self.cache.stats.misses - misses,
            self.unknown_items - unknown,
        )

    def _recommend(self, wave: Sequence[WaveInput]) -> list[Scored]:
        plans = [self._plan(user) for user in wave]
        self._refill_caches([p for p in plans if p.new_count and p.kv is None])
        self._advance([p for p in plans if p.new_count])
        self._refill_previous_vectors([
            p for p in plans
            if p.n_previous and p.previous_vector is None and min(p.answered_by) < 0
        ])
        if self.reuse_cache:
            for user, plan in zip(wave, plans, strict=True):
                self._keep(user, plan)
        return self._retrieve(wave, plans)

    def _plan(self, user: WaveInput) -> _UserPlan:
        index = self.artifact.item_index
        n_window = len(user.previous)
        start = user.first_index + n_window  # history index of the wave's first event
        cached = self.cache.get(user.user_id, self.version) if self.reuse_cache else None
        window_end = user.previous[-1].offset if user.previous else -1
        if cached is not None and cached.window_end_offset == window_end:
            known_at, items = cached.known_at, cached.known_items
            events = cached.known_events
        else:  # a cold or stale cache: one pass over the stored window
            cached = None
            known_at, items, events = [], [], []
            for at, event in enumerate(user.previous, start=user.first_index):
                item = index.get(event.item_id)
                if item is not None:
                    known_at.append(at)
                    items.append(item)
                    events.append(event)
        n_previous = len(known_at)
        new_at, new_items, new_events, answered_by = [], [], [], []
        for at, event in enumerate(user.events, start=start):
            item = index.get(event.item_id)
            if item is not None:
                new_at.append(at)
                new_items.append(item)
                new_events.append(event)
            answered_by.append(len(new_at) - 1)
        self.unknown_items += len(user.events) - len(new_at)
        plan = _UserPlan(known_at + new_at, items + new_items, events + new_events, n_previous,
                         answered_by)
        if cached is not None:
            plan.kv, plan.previous_vector = cached.kv, cached.vector
        elif not n_previous:
            plan.kv = KVCache.empty(self.artifact.config, 1)  # the user's first known events
        return plan

    def _keep(self, user: WaveInput, plan: _UserPlan) -> None:
        """Cache what the user's next wave needs, trimmed to the window after this one."""
        vector = plan.vectors[-1] if plan.vectors is not None else plan.previous_vector
        if vector is None or plan.kv is None:
            return  # no known event yet: nothing to continue from
        total = user.first_index + len(user.previous) + len(user.events)
        first = total - min(user.capacity, len(user.previous) + len(user.events))
        cut = bisect_left(plan.known_at, first)
        self.cache.put(user.user_id, self.version, CacheEntry(
            plan.kv, vector, user.events[-1].offset, plan.known_at[cut:], plan.known_items[cut:],
            plan.known_events[cut:],
        ))

    def _refill_caches(self, plans: list[_UserPlan]) -> None:
        """Rebuild missing caches from the stored events: one batched `encode`."""
        if not plans:
            return
        keep = self.history - 1
        vectors, kv = self._encode(
            [p.known_items[: p.n_previous][-keep:] for p in plans],
            [[e.event_type for e in p.known_events[: p.n_previous][-keep:]] for p in plans],
        )
        for plan, user_kv, vector in zip(plans, kv.split(), vectors, strict=True):
            plan.kv, plan.previous_vector = user_kv, vector

    def _refill_previous_vectors(self, plans: list[_UserPlan]) -> None:
        """Users whose wave has no known item before some event, with a cold cache: their
        answer there is the vector after their last stored known event (exact from N*(W-1)+1)."""
        for plan in plans:
            items = plan.known_items[: plan.n_previous][-self.history :]
            types = [e.event_type for e in plan.known_events[: plan.n_previous][-self.history :]]
            vector, kv = self._encode([items], [types])
            plan.previous_vector = vector[0]
            if not plan.new_count:
                plan.kv = kv.split()[0]  # kept for the next wave (a stepped one replaces it)

    def _advance(self, plans: list[_UserPlan]) -> None:
        """Run the new known events through the model, users grouped by how many they have
        (powers of two), so that one heavy user does not pad everyone else's batch."""
        groups: dict[int, list[_UserPlan]] = defaultdict(list)
        longest = max((plan.new_count for plan in plans), default=1)
        padded = longest * len(plans)
        if longest > 1 and padded <= 2 * sum(plan.new_count for plan in plans):
            groups[longest] = list(plans)  # little padding: one call beats several
        else:
            for plan in plans:
                groups[1 << (plan.new_count - 1).bit_length()].append(plan)
        for _, group in sorted(groups.items()):
            caches = KVCache.cat([plan.kv for plan in group])  # type: ignore[misc]
            length = max(plan.new_count for plan in group)
            if length == 1 or not hasattr(self.backend, "extend"):
                items = torch.tensor([p.known_items[p.n_previous] for p in group], dtype=torch.long)
                types = torch.tensor(
                    [p.known_events[p.n_previous].event_type for p in group], dtype=torch.long
                )
                vectors, new_cache, attention = self.backend.step(
                    caches, items, types, return_attention=True
                )
                vectors = vectors.unsqueeze(1)
                attention = attention.unsqueeze(1) if attention is not None else None
            else:
                items = torch.zeros((len(group), length), dtype=torch.long)
                types = torch.zeros((len(group), length), dtype=torch.long)
                for r, plan in enumerate(group):
                    items[r, : plan.new_count] = torch.tensor(plan.known_items[plan.n_previous :])
                    types[r, : plan.new_count] = torch.tensor(
                        [e.event_type for e in plan.known_events[plan.n_previous :]]
                    )
                counts = torch.tensor([p.new_count for p in group])
                vectors, new_cache, attention = self.backend.extend(  # type: ignore[attr-defined]
                    caches, items, types, counts, return_attention=True
                )
            for r, (plan, kv) in enumerate(zip(group, new_cache.split(), strict=True)):
                count = plan.new_count
                plan.kv = kv
                plan.vectors = vectors[r, :count]
                plan.attention = attention[r, :count] if attention is not None else None

    def _retrieve(self, wave: Sequence[WaveInput], plans: list[_UserPlan]) -> list[Scored]:
        results: list[Scored] = []
        queries: list[torch.Tensor] = []
        exclude: list[list[int]] = []
        attentions: list[torch.Tensor | None] = []
        history: list[tuple[list[WindowEvent], int]] = []  # (known events, how many so far)
        query_results: list[Scored] = []
        for user, plan in zip(wave, plans, strict=True):
            start = user.first_index + len(user.previous)  # history index of the first event
            for offset, j in enumerate(plan.answered_by):
                at = start + offset
                # this event's item is known: the newest known event is the event itself
                own = j >= 0 and plan.known_at[plan.n_previous + j] == at
                if j >= 0 and plan.vectors is not None:
                    vector = plan.vectors[j]
                elif plan.previous_vector is not None:
                    vector = plan.previous_vector
                else:  # no known event at all yet: popular items
                    results.append(self._cold_start(user.user_id, unknown=True))
                    continue
                upto = plan.n_previous + j + 1  # known events up to this one
                first = bisect_left(plan.known_at, at + 1 - user.capacity)  # its stored window
                exclude.append(plan.known_items[first:upto])
                queries.append(vector)
                attentions.append(plan.attention[j] if own and plan.attention is not None else None)
                history.append((plan.known_events, upto))
                scored = Scored(user.user_id, [], unknown_item=not own)
                query_results.append(scored)
                results.append(scored)
        if not queries:
            return results
        found = self.retriever.search(
            torch.stack(queries).float().cpu().numpy(),
            self.k,
            exclude=exclude if self.exclude_seen else None,
        )
        because = self._because(attentions, history)
        item_ids = self.artifact.item_ids
        scores = np.round(found.scores.astype(np.float64), 6).tolist()
        for scored, ids, row_scores, row_because in zip(
            query_results, found.indices.tolist(), scores, because, strict=True
        ):
            scored.items = [(item_ids[i], s) for i, s in zip(ids, row_scores, strict=True) if i > 0]
            scored.because = row_because
        return results

    def _because(
        self, attentions: list[torch.Tensor | None], history: list[tuple[list[WindowEvent], int]]
    ) -> list[list[Because]]:
        """The recent events that weighed most in the last layer's attention (age 0 = the event
        itself); none when the event's item is unknown (the attention is an older one's)."""
        out: list[list[Because]] = [[] for _ in attentions]
        rows = [q for q, a in enumerate(attentions) if a is not None]
        if not rows or self.because_count <= 0:
            return out
        weights = torch.stack([attentions[q] for q in rows]).float().cpu()  # type: ignore[misc]
        top = torch.topk(weights, min(self.because_count, weights.shape[1]), dim=1)
        names = self.artifact.event_types
        for q, values, ages in zip(rows, top.values.tolist(), top.indices.tolist(), strict=True):
            events, upto = history[q]
            out[q] = [
                Because(
                    events[upto - 1 - a].item_id,
                    _event_type_name(names, events[upto - 1 - a].event_type),
                    round(w, 4),
                )
                for w, a in zip(values, ages, strict=True)
                if w > 0.0 and a < upto
            ]
        return out

    def _encode(self, items: list[list[int]], types: list[list[int]]) -> tuple[torch.Tensor, KVCache]:
        length = max(len(row) for row in items)
        padded_items = torch.zeros((len(items), length), dtype=torch.long)
        padded_types = torch.zeros((len(items), length), dtype=torch.long)
        for row, (row_items, row_types) in enumerate(zip(items, types, strict=True)):
            if row_items:
                padded_items[row, length - len(row_items) :] = torch.tensor(row_items)
                padded_types[row, length - len(row_types) :] = torch.tensor(row_types)
        return self.backend.encode(padded_items, padded_types)

    def _cold_start(self, user_id: str, *, unknown: bool) -> Scored:
        top = self._popular[: self.k]
        return Scored(
            user_id=user_id,
            items=[(self.artifact.item_ids[i], float(self._popular_scores[i])) for i in top],
            cold_start=True,
            unknown_item=unknown,
        )


def _event_type_name(names: Sequence[str], index: int) -> str:
    return names[index - 1] if 0 < index <= len(names) else "unknown"
