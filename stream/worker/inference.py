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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from model.artifact import Artifact, event_type_map
from model.backends import StepBackend
from model.batching import group_by_length, pad_left, pad_right
from model.encoder import KVCache
from model.errors import ArtifactError
from model.retrieval import Retriever
from state.kvcache import LruByteCache
from state.window import WindowEvent, WindowSnapshot
from stream.worker.because import Because, event_type_name


@dataclass
class KnownEvents:
    """A user's events whose item the model knows, oldest first: the only ones it encodes."""

    at: list[int] = field(default_factory=list)  # index of each in the user's whole history
    items: list[int] = field(default_factory=list)  # its item index in the model's vocabulary
    types: list[int] = field(default_factory=list)  # its event type index in the model's
    events: list[WindowEvent] = field(default_factory=list)

    def add(self, at: int, item: int, event_type: int, event: WindowEvent) -> None:
        self.at.append(at)
        self.items.append(item)
        self.types.append(event_type)
        self.events.append(event)

    def __add__(self, other: KnownEvents) -> KnownEvents:
        return KnownEvents(self.at + other.at, self.items + other.items, self.types + other.types,
                           self.events + other.events)

    def __getitem__(self, part: slice) -> KnownEvents:
        return KnownEvents(self.at[part], self.items[part], self.types[part], self.events[part])

    def __len__(self) -> int:
        return len(self.at)

    def first_from(self, at: int) -> int:
        """Position of the first of them at history index `at` or later."""
        return bisect_left(self.at, at)


@dataclass
class CacheEntry:
    """What the worker keeps in memory for a user between waves: the key/value cache after
    the user's last known event, and the window's known events, so that the next wave needs no
    pass over the stored window."""

    kv: KVCache  # batch of one
    vector: torch.Tensor  # [d]: the user vector after the last known event
    window_end_offset: int  # input offset of the window's newest event when this was made
    known: KnownEvents  # the window's known events

    def nbytes(self) -> int:
        vector = self.vector.numel() * self.vector.element_size()
        return self.kv.nbytes() + vector + 256 + 120 * len(self.known)


@dataclass
class Scored:
    """One event's recommendation, before it is put on the wire."""

    user_id: str
    items: list[tuple[str, float]]
    because: list[Because] = field(default_factory=list)
    cold_start: bool = False
    unknown_item: bool = False


class ScoredBatch(Sequence[Scored]):
    """The recommendations of a wave as columns, one entry per event (users in the wave's order,
    each user's events in order): model item indices, scores rounded to 6 places, and `because`
    as (item index, the deployment's event type, weight). Indexing gives a `Scored` (ids as
    strings), for callers that want objects; the worker encodes the columns directly."""

    def __init__(self, item_ids: Sequence[str], event_types: Sequence[str]) -> None:
        self.item_ids = item_ids
        self.event_types = event_types
        self.user_ids: list[str] = []
        self.items: list[list[int]] = []
        self.scores: list[list[float]] = []
        self.because: list[list[tuple[int, int, float]]] = []
        self.cold_start: list[bool] = []
        self.unknown_item: list[bool] = []

    def __len__(self) -> int:
        return len(self.user_ids)

    def item_id_rows(self) -> list[list[str]]:
        """Each event's recommended item ids, best first."""
        ids = self.item_ids
        return [[ids[i] for i in row] for row in self.items]

    def _row(self, e: int) -> Scored:
        ids, names = self.item_ids, self.event_types
        return Scored(
            self.user_ids[e],
            [(ids[i], s) for i, s in zip(self.items[e], self.scores[e], strict=True)],
            [Because(ids[i], event_type_name(names, t), w) for i, t, w in self.because[e]],
            self.cold_start[e],
            self.unknown_item[e],
        )

    def __getitem__(self, e):  # type: ignore[no-untyped-def,override]
        if isinstance(e, slice):
            return [self._row(i) for i in range(*e.indices(len(self)))]
        if e < 0:
            e += len(self)
        if not 0 <= e < len(self):
            raise IndexError(e)
        return self._row(e)


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

    known: KnownEvents  # before the wave, then the wave's
    n_previous: int  # how many of them come before the wave
    answered_by: list[int]  # per new event: index into the new known events, -1 = before them
    kv: KVCache | None = None  # cache before the new known events (None: refill)
    vectors: Sequence[torch.Tensor] | None = None  # per new known event: [d], after `extend`
    attention: Sequence[torch.Tensor] | None = None  # per new known event: [W]
    previous_vector: torch.Tensor | None = None  # the answer before the wave's known events

    @property
    def new_count(self) -> int:
        return len(self.known) - self.n_previous

    @property
    def previous(self) -> KnownEvents:
        return self.known[: self.n_previous]

    @property
    def new(self) -> KnownEvents:
        return self.known[self.n_previous :]


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
        event_types: Sequence[str] | None = None,
    ) -> None:
        """`event_types`: the deployment's (`--event-types`), whose 1-based positions the
        windows store; each is mapped to the model's own index by name (default: the model's).
        `reuse_cache=False` is the no-cache baseline: every event is its own wave entry and
        re-encodes the user's stored window (same answers, the cost a cache saves)."""
        self.artifact = artifact
        self.event_types = list(event_types if event_types is not None else artifact.event_types)
        self.type_map = event_type_map(self.event_types, artifact.event_types)
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
        self._popular_items = self._popular[: self.k]
        self._popular_item_scores = [float(self._popular_scores[i]) for i in self._popular_items]
        self._unknown_items = 0

    @property
    def version(self) -> str:
        return self.artifact.version

    @property
    def max_events_per_user(self) -> int:
        """How many events of one user a wave may hold (what one `extend` advances)."""
        if not self.reuse_cache:
            return 1
        return min(self.backend.max_extend or self.artifact.config.window,
                   self.artifact.config.window)

    def _type(self, event: WindowEvent) -> int:
        """The model's index of the event's type (the window stores the deployment's)."""
        return self.type_map[event.event_type] if event.event_type < len(self.type_map) else 0

    def prewarm(self, windows: Sequence[tuple[str, WindowSnapshot]], batch: int = 256) -> int:
        """Fill the cache of these users from their stored windows (batched `encode`), as a
        refill would: exact, and valid only while the window still ends at the same offset.
        Runs before the model serves (off the hot path); returns how many users it warmed."""
        index = self.artifact.item_index
        ready: list[tuple[str, KnownEvents, int]] = []
        for user_id, window in windows:
            known = KnownEvents()
            for at, event in enumerate(window.events, start=window.first_index):
                item = index.get(event.item_id)
                if item is not None:
                    known.add(at, item, self._type(event), event)
            if len(known) and window.events:
                ready.append((user_id, known, window.events[-1].offset))
        for start in range(0, len(ready), batch):
            part = ready[start : start + batch]
            stored = [known[-self.history :] for _, known, _ in part]
            vectors, kv = self.backend.encode(*pad_left([s.items for s in stored],
                                                        [s.types for s in stored]))
            for (user_id, known, end), user_kv, vector in zip(part, kv.split(), vectors, strict=True):
                self.cache.put(user_id, self.version, CacheEntry(user_kv, vector, end, known))
        return len(ready)

    def smoke_check(self) -> None:
        """A few events through the backend and retrieval before the model serves: the step must
        equal the full pass, and every output and score must be finite. ArtifactError if not."""
        items = self._popular[: min(3, len(self._popular))]
        if not items:
            raise ArtifactError(f"model {self.version}: smoke inference: the catalog is empty")
        types = [self.type_map[1] if len(self.type_map) > 1 else 0] * len(items)
        full, _ = self.backend.encode(torch.tensor([items]), torch.tensor([types]))
        if len(items) > 1:
            _, kv = self.backend.encode(torch.tensor([items[:-1]]), torch.tensor([types[:-1]]))
            stepped, _, _ = self.backend.step(kv, torch.tensor(items[-1:]), torch.tensor(types[-1:]))
        else:
            stepped = full
        full_vector, stepped_vector = full[0].float().cpu(), stepped[0].float().cpu()
        if not bool(torch.isfinite(full_vector).all()):
            raise ArtifactError(f"model {self.version}: smoke inference gave non-finite outputs")
        if not torch.allclose(full_vector, stepped_vector, rtol=1e-3, atol=1e-4):
            gap = float((full_vector - stepped_vector).abs().max())
            raise ArtifactError(
                f"model {self.version}: smoke inference: the cached step differs from the full "
                f"pass by {gap:.3g}"
            )
        found = self.retriever.search(full_vector[None].numpy(), min(self.k, self.artifact.config.n_items))
        valid = found.indices > 0
        if not valid.any() or not np.isfinite(found.scores[valid]).all():
            raise ArtifactError(f"model {self.version}: smoke inference: retrieval found nothing finite")

    def forget(self, user_ids: Iterable[str]) -> None:
        """Drop the users' caches (after a failed wave): their next wave refills exactly."""
        for user_id in user_ids:
            self.cache.discard(user_id, self.version)

    def recommend(self, wave: Sequence[WaveInput]) -> tuple[ScoredBatch, RecommendCounters]:
        """One recommendation per event: users in the wave's order, each user's in order."""
        hits, misses, unknown = self.cache.stats.hits, self.cache.stats.misses, self._unknown_items
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
        scored = self._retrieve(wave, plans)
        return scored, RecommendCounters(
            self.cache.stats.hits - hits, self.cache.stats.misses - misses,
            self._unknown_items - unknown,
        )

    def _plan(self, user: WaveInput) -> _UserPlan:
        index = self.artifact.item_index
        start = user.first_index + len(user.previous)  # history index of the wave's first event
        cached = self.cache.get(user.user_id, self.version) if self.reuse_cache else None
        window_end = user.previous[-1].offset if user.previous else -1
        if cached is not None and cached.window_end_offset == window_end:
            previous = cached.known
        else:  # a cold or stale cache: one pass over the stored window
            if cached is not None:
                self.cache.count_stale()
            cached = None
            previous = KnownEvents()
            for at, event in enumerate(user.previous, start=user.first_index):
                item = index.get(event.item_id)
                if item is not None:
                    previous.add(at, item, self._type(event), event)
        new, answered_by = KnownEvents(), []
        for at, event in enumerate(user.events, start=start):
            item = index.get(event.item_id)
            if item is not None:
                new.add(at, item, self._type(event), event)
            answered_by.append(len(new) - 1)
        self._unknown_items += len(user.events) - len(new)
        plan = _UserPlan(previous + new, len(previous), answered_by)
        if cached is not None:
            plan.kv, plan.previous_vector = cached.kv, cached.vector
        elif not len(previous):
            plan.kv = KVCache.empty(self.artifact.config, 1)  # the user's first known events
        return plan

    def _keep(self, user: WaveInput, plan: _UserPlan) -> None:
        """Cache what the user's next wave needs, trimmed to the window after this one."""
        vector = plan.vectors[-1] if plan.vectors is not None else plan.previous_vector
        if vector is None or plan.kv is None:
            return  # no known event yet: nothing to continue from
        if vector._base is not None:  # a view: keep its own copy, not the wave's whole tensor
            vector = vector.clone()
        total = user.first_index + len(user.previous) + len(user.events)
        first = total - min(user.capacity, len(user.previous) + len(user.events))
        self.cache.put(user.user_id, self.version, CacheEntry(
            plan.kv, vector, user.events[-1].offset, plan.known[plan.known.first_from(first) :],
        ))

    def _refill_caches(self, plans: list[_UserPlan]) -> None:
        """Rebuild missing caches from the stored events: one batched `encode`."""
        if not plans:
            return
        stored = [plan.previous[-(self.history - 1) :] for plan in plans]
        vectors, kv = self.backend.encode(*pad_left([s.items for s in stored],
                                                    [s.types for s in stored]))
        for plan, user_kv, vector in zip(plans, kv.split(), vectors, strict=True):
            plan.kv, plan.previous_vector = user_kv, vector

    def _refill_previous_vectors(self, plans: list[_UserPlan]) -> None:
        """Users whose wave has no known item before some event, with a cold cache: their
        answer there is the vector after their last stored known event (exact from N*(W-1)+1)."""
        for plan in plans:
            stored = plan.previous[-self.history :]
            vector, kv = self.backend.encode(*pad_left([stored.items], [stored.types]))
            plan.previous_vector = vector[0]
            if not plan.new_count:
                plan.kv = kv.split()[0]  # kept for the next wave (a stepped one replaces it)

    def _advance(self, plans: list[_UserPlan]) -> None:
        """Run the new known events through the model: `step` where each user of a group has
        one, `extend` where some have more (groups from `model.batching.group_by_length`)."""
        for indices in group_by_length([plan.new_count for plan in plans]):
            group = [plans[i] for i in indices]
            caches = KVCache.cat([plan.kv for plan in group])  # type: ignore[misc]
            new = [plan.new for plan in group]
            if max(plan.new_count for plan in group) == 1:
                vectors, new_cache, attention = self.backend.step(
                    caches,
                    torch.tensor([n.items[0] for n in new], dtype=torch.long),
                    torch.tensor([n.types[0] for n in new], dtype=torch.long),
                    return_attention=True,
                )
                vectors = vectors.unsqueeze(1)
                attention = attention.unsqueeze(1) if attention is not None else None
            else:
                items, types, counts = pad_right([n.items for n in new], [n.types for n in new])
                vectors, new_cache, attention = self.backend.extend(
                    caches, items, types, counts, return_attention=True
                )
            # rows as lists of views, one C call each: no tensor indexing per user or event
            width = vectors.shape[1]
            vector_rows = vectors.reshape(-1, vectors.shape[-1]).unbind(0)
            attention_rows = (attention.reshape(-1, attention.shape[-1]).unbind(0)
                              if attention is not None else None)
            for r, (plan, kv) in enumerate(zip(group, new_cache.split(), strict=True)):
                first = r * width
                plan.kv = kv
                plan.vectors = vector_rows[first : first + plan.new_count]
                if attention_rows is not None:
                    plan.attention = attention_rows[first : first + plan.new_count]

    def _retrieve(self, wave: Sequence[WaveInput], plans: list[_UserPlan]) -> ScoredBatch:
        """One batched search for every event with a user vector; the rest get popular items.
        Results stay columns of item indices (`ScoredBatch`): no object per item or event."""
        batch = ScoredBatch(self.artifact.item_ids, self.event_types)
        users, cold, unknown = batch.user_ids, batch.cold_start, batch.unknown_item
        queries: list[torch.Tensor] = []
        exclude: list[list[int]] = []
        query_events: list[int] = []  # per query: the event (position in the batch) it answers
        explained: list[tuple[int, torch.Tensor, list[int], list[WindowEvent], int]] = []
        for user, plan in zip(wave, plans, strict=True):
            start = user.first_index + len(user.previous)  # history index of the first event
            known = plan.known
            known_at, known_items = known.at, known.items
            n_previous, vectors = plan.n_previous, plan.vectors
            user_id, capacity = user.user_id, user.capacity
            for offset, j in enumerate(plan.answered_by):
                at = start + offset
                # this event's item is known: the newest known event is the event itself
                own = j >= 0 and known_at[n_previous + j] == at
                users.append(user_id)
                unknown.append(not own)
                if j >= 0 and vectors is not None:
                    vector = vectors[j]
                elif plan.previous_vector is not None:
                    vector = plan.previous_vector
                else:  # no known event at all yet: popular items
                    cold.append(True)
                    continue
                cold.append(False)
                upto = n_previous + j + 1  # known events up to this one
                first = bisect_left(known_at, at + 1 - capacity)  # its stored window
                exclude.append(known_items[first:upto])
                queries.append(vector)
                query_events.append(len(users) - 1)
                if own and plan.attention is not None:
                    explained.append((len(users) - 1, plan.attention[j], known_items,
                                      known.events, upto))
        size = len(users)
        batch.items = [self._popular_items] * size
        batch.scores = [self._popular_item_scores] * size
        batch.because = [[] for _ in range(size)]
        if not queries:
            return batch
        found = self.retriever.search(
            torch.stack(queries).float().cpu().numpy(),
            self.k,
            exclude=exclude if self.exclude_seen else None,
        )
        scores = np.round(found.scores.astype(np.float64), 6)
        indices = found.indices
        complete = bool((indices > 0).all())
        items_rows, score_rows = indices.tolist(), scores.tolist()
        if not complete:  # fewer than k items left: drop the -1 slots
            valid = (indices > 0).tolist()
            items_rows = [[i for i, v in zip(r, m, strict=True) if v]
                          for r, m in zip(items_rows, valid, strict=True)]
            score_rows = [[s for s, v in zip(r, m, strict=True) if v]
                          for r, m in zip(score_rows, valid, strict=True)]
        for event, row, row_scores in zip(query_events, items_rows, score_rows, strict=True):
            batch.items[event] = row
            batch.scores[event] = row_scores
        self._explain(batch, explained)
        return batch

    def _explain(
        self, batch: ScoredBatch,
        explained: list[tuple[int, torch.Tensor, list[int], list[WindowEvent], int]],
    ) -> None:
        """`because` (see `stream.worker.because`) of the events whose own item was encoded: one
        top-k over their stacked attention rows."""
        count = self.because_count
        if not explained or count <= 0:
            return
        weights = torch.stack([row for _, row, _, _, _ in explained]).float().cpu()
        top = torch.topk(weights, min(count, weights.shape[1]), dim=1)
        for (event, _, items, events, upto), values, ages in zip(
            explained, top.values.tolist(), top.indices.tolist(), strict=True
        ):
            batch.because[event] = [
                (items[upto - 1 - a], events[upto - 1 - a].event_type, round(w, 4))
                for w, a in zip(values, ages, strict=True)
                if w > 0.0 and a < upto
            ]
