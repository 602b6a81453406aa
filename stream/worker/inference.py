"""Micro-batched inference: windows + new events in, recommendations out.

For each event of a wave (at most one event per user), the user's key/value cache is looked
up by (user, model version). A cache entry is valid only if it was built from exactly the
events now in the window before the new one (it records the input offset of the last event it
encoded); anything else is a miss. A miss refills the cache with `encode` over the window's
last N*(W-1) known events, which is exact, so a user's recommendation is the same whether the
cache was warm or refilled. Then one batched `step` advances every user of the wave by its new
event, and one batched retrieval finds each user's top-k.

Events whose item the model does not know (a new product) stay in the window but are skipped
by the encoder: the user's recommendation is the one of its latest known event. A user with no
known event at all gets the artifact's popular items, marked `cold_start`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from model.artifact import Artifact
from model.backends import StepBackend
from model.encoder import KVCache
from model.retrieval import Retriever
from state.kvcache import LruByteCache
from state.window import Window, WindowEvent


@dataclass
class CacheEntry:
    """What the worker keeps in memory for a user between events."""

    kv: KVCache  # batch of one
    vector: torch.Tensor  # [d]: the user vector after the last encoded event
    encoded_offset: int  # input offset of the last event encoded into `kv`
    attention: torch.Tensor | None  # [W] last layer's attention of that step (index 0 = newest)

    def nbytes(self) -> int:
        return self.kv.nbytes() + self.vector.numel() * self.vector.element_size() + 256


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
class WaveInput:
    user_id: str
    window: Window  # already holds `event` as its newest entry
    event: WindowEvent


class Recommender:
    """Runs `step` and retrieval for waves of events against one model artifact."""

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
    ) -> None:
        self.artifact = artifact
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

    def _known(self, events: Sequence[WindowEvent]) -> list[tuple[WindowEvent, int]]:
        index = self.artifact.item_index
        return [(e, index[e.item_id]) for e in events if e.item_id in index]

    def recommend(self, wave: Sequence[WaveInput]) -> list[Scored]:
        """Recommendations for a wave of events, at most one per user, in the wave's order."""
        results: list[Scored | None] = [None] * len(wave)
        steps: list[int] = []  # positions in `wave` that run `step`
        step_caches: list[KVCache] = []
        refill_rows: list[tuple[int, list[int], list[int]]] = []  # (step slot, items, types)
        vectors_no_step: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        histories: dict[int, list[tuple[WindowEvent, int]]] = {}

        for position, entry_input in enumerate(wave):
            known = self._known(entry_input.window.events)
            histories[position] = known
            new_is_known = bool(known) and known[-1][0] is entry_input.event
            previous = known[:-1] if new_is_known else known
            previous_offset = previous[-1][0].offset if previous else -1
            cached = self.cache.get(entry_input.user_id, self.version)
            if cached is not None and cached.encoded_offset != previous_offset:
                cached = None  # built from other events (e.g. before a rebalance): refill
            if not new_is_known:
                self.unknown_items += 1
                if not previous:
                    results[position] = self._cold_start(entry_input.user_id, unknown=True)
                elif cached is not None:
                    vectors_no_step[position] = (cached.vector, cached.attention)
                else:  # refill: the vector at the last known event, exact from N*(W-1)+1 events
                    tail = previous[-self.history :]
                    vector, kv = self._encode([[i for _, i in tail]], [[e.event_type for e, _ in tail]])
                    self.cache.put(
                        entry_input.user_id,
                        self.version,
                        CacheEntry(kv.split()[0], vector[0], previous_offset, None),
                    )
                    vectors_no_step[position] = (vector[0], None)
                continue
            slot = len(steps)
            steps.append(position)
            if cached is not None:
                step_caches.append(cached.kv)
            else:
                tail = previous[-(self.history - 1) :] if self.history > 1 else []
                step_caches.append(None)  # type: ignore[arg-type]  # filled below
                refill_rows.append((slot, [i for _, i in tail], [e.event_type for e, _ in tail]))

        self._refill(refill_rows, step_caches)
        vectors: list[torch.Tensor] = []
        attentions: list[torch.Tensor | None] = []
        order: list[int] = []
        if steps:
            items = torch.tensor([histories[p][-1][1] for p in steps], dtype=torch.long)
            types = torch.tensor([wave[p].event.event_type for p in steps], dtype=torch.long)
            step_vectors, new_cache, attention = self.backend.step(
                KVCache.cat(step_caches), items, types, return_attention=True
            )
            for slot, (position, kv) in enumerate(zip(steps, new_cache.split(), strict=True)):
                row_attention = attention[slot] if attention is not None else None
                self.cache.put(
                    wave[position].user_id,
                    self.version,
                    CacheEntry(kv, step_vectors[slot], wave[position].event.offset, row_attention),
                )
                vectors.append(step_vectors[slot])
                attentions.append(row_attention)
                order.append(position)
        for position, (vector, attention) in vectors_no_step.items():
            vectors.append(vector)
            attentions.append(attention)
            order.append(position)
        if order:
            self._retrieve(wave, order, vectors, attentions, histories, results)
        return [r for r in results if r is not None]

    def _encode(self, items: list[list[int]], types: list[list[int]]) -> tuple[torch.Tensor, KVCache]:
        length = max(len(row) for row in items)
        padded_items = torch.zeros((len(items), length), dtype=torch.long)
        padded_types = torch.zeros((len(items), length), dtype=torch.long)
        for row, (row_items, row_types) in enumerate(zip(items, types, strict=True)):
            if row_items:
                padded_items[row, length - len(row_items) :] = torch.tensor(row_items)
                padded_types[row, length - len(row_types) :] = torch.tensor(row_types)
        return self.backend.encode(padded_items, padded_types)

    def _refill(self, rows: list[tuple[int, list[int], list[int]]], caches: list[KVCache]) -> None:
        """Fill the missing caches of a wave: one batched `encode` for all users with history."""
        with_history = [row for row in rows if row[1]]
        for slot, items, _ in rows:
            if not items:  # the new event is the user's first known one
                caches[slot] = KVCache.empty(self.artifact.config, 1)
        if with_history:
            _, kv = self._encode([r[1] for r in with_history], [r[2] for r in with_history])
            for (slot, _, _), user_kv in zip(with_history, kv.split(), strict=True):
                caches[slot] = user_kv

    def _retrieve(
        self,
        wave: Sequence[WaveInput],
        order: list[int],
        vectors: list[torch.Tensor],
        attentions: list[torch.Tensor | None],
        histories: dict[int, list[tuple[WindowEvent, int]]],
        results: list[Scored | None],
    ) -> None:
        queries = torch.stack(vectors).float().cpu().numpy()
        exclude = [[i for _, i in histories[p]] for p in order] if self.exclude_seen else None
        found = self.retriever.search(queries, self.k, exclude=exclude)
        item_ids = self.artifact.item_ids
        for row, position in enumerate(order):
            items = [
                (item_ids[int(i)], float(s))
                for i, s in zip(found.indices[row], found.scores[row], strict=True)
                if i > 0
            ]
            results[position] = Scored(
                user_id=wave[position].user_id,
                items=items,
                because=self._because(attentions[row], histories[position], wave[position].event),
                unknown_item=histories[position][-1][0] is not wave[position].event
                if histories[position]
                else True,
            )

    def _because(
        self,
        attention: torch.Tensor | None,
        known: list[tuple[WindowEvent, int]],
        event: WindowEvent,
    ) -> list[Because]:
        """The recent events that weighed most in the last layer's attention (index 0 = newest)."""
        if attention is None or self.because_count <= 0:
            return []
        newest_first = known[::-1]
        if not newest_first or newest_first[0][0] is not event:
            return []  # attention belongs to an earlier step; do not misattribute it
        weights = attention[: len(newest_first)].float().cpu()
        top = torch.argsort(weights, descending=True)[: self.because_count]
        names = self.artifact.event_types
        return [
            Because(
                item_id=newest_first[int(i)][0].item_id,
                event_type=_event_type_name(names, newest_first[int(i)][0].event_type),
                weight=round(float(weights[int(i)]), 4),
            )
            for i in top
            if float(weights[int(i)]) > 0.0
        ]

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
