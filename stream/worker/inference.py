"""Micro-batched inference: windows + new events in, recommendations out.

A wave holds, for each of its users, the stored window before the wave and the user's new
events (up to W of them, in order). Each user's key/value cache is a slot of the model
version's pool (state/kvpool.py), looked up for the whole wave at once; it is valid only if it
was written from exactly the known events before the new ones (the slot records the input
offset of the window's newest event); anything else is a miss. The misses are refilled in one
batched `encode` over each one's last N*(W-1)+1 known events before the new ones, written into
their slots, which is exact, so a recommendation is the same whether the cache was warm or
refilled. Then `extend_into` advances every user by all its new events in one pass per group
(users grouped by how many they have), reading and writing the pool by slot index, and one
batched retrieval finds the top-k of every event: one recommendation per event, as if the
events had come one by one.

A wave's events and known events are columns (numpy arrays), not objects: the known events of
all its users are one [4, K] array, user by user (those before the wave, then the wave's), and
the seen items each event leaves out are one CSR structure (`Exclusions.from_csr`).

Events whose item the model does not know (a new product) stay in the window but are skipped
by the encoder: the recommendation is the one of the user's latest known event. A user with no
known event at all gets the artifact's popular items, marked `cold_start`.

One file, one thing: the Recommender and the shapes of what goes in and out of it (over 400
lines because a wave's plan, refill, advance, retrieval and `because` share the `_Wave` columns,
and splitting them would pass those columns between files for no reader's gain).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple, overload

import numpy as np
import torch

from kvrec.errors import ArtifactError
from kvrec.model.artifact import Artifact, event_type_map
from kvrec.model.backends import StepBackend
from kvrec.model.batching import group_by_length
from kvrec.model.events import EventInputs
from kvrec.model.retrieval import Exclusions
from kvrec.state.kvpool import KNOWN_ROWS, KVPool
from kvrec.state.window import WindowEvent, WindowSnapshot
from kvrec.stream.worker.because import Because, event_type_name

if TYPE_CHECKING:
    from kvrec.stream.worker.protocols import ItemRetriever

AT, ITEM, TYPE, RAW_TYPE = range(KNOWN_ROWS)  # rows of a known-events array (state/kvpool.py)
_USER_KEY = 1 << 42  # (user row, history index) as one sortable int64: row * _USER_KEY + index


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

    def __init__(self, item_ids: Sequence[str], event_types: Sequence[str],
                 item_index: Mapping[str, int] | None = None) -> None:
        self.item_ids = item_ids
        self.event_types = event_types
        self.item_index = item_index  # id -> index of `item_ids` (0: none), if the caller has it
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

    def extend(self, other: ScoredBatch) -> None:
        """Append another batch's events (a wave recommended in parts)."""
        self.user_ids += other.user_ids
        self.items += other.items
        self.scores += other.scores
        self.because += other.because
        self.cold_start += other.cold_start
        self.unknown_item += other.unknown_item

    @overload
    def __getitem__(self, e: int) -> Scored: ...

    @overload
    def __getitem__(self, e: slice) -> list[Scored]: ...

    def __getitem__(self, e: int | slice) -> Scored | list[Scored]:
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


class WaveInput(NamedTuple):
    """One user's new events of a wave, with the window as it was before them (a named tuple:
    the loop makes one per user and wave; a frozen dataclass took twice as long to make)."""

    user_id: str
    previous: list[WindowEvent]  # the stored window before this wave's events, oldest first
    events: list[WindowEvent]  # this wave's events of the user, oldest first
    capacity: int  # the stored window's capacity (a recommendation leaves out what is in it)
    first_index: int  # index of previous[0] in the user's whole history (events ever seen)


@dataclass
class _Wave:
    """A wave (or part of one) as columns: per event, per user, and all known events."""

    users: Sequence[WaveInput]
    user_ids: list[str]
    event_user: np.ndarray  # [E]: the user (row) of each event
    event_at: np.ndarray  # [E]: its index in the user's whole history
    own: np.ndarray  # [E] bool: its item is known (it is encoded)
    answered_by: np.ndarray  # [E]: the user's newest new known event at or before it, -1: none
    n_events: np.ndarray  # [U]: new events
    n_previous: np.ndarray  # [U]: known events before the wave (in the stored window)
    n_new: np.ndarray  # [U]: the wave's known events
    known_base: np.ndarray  # [U]: where the user's known events start in `known`
    new_base: np.ndarray  # [U]: where its new known events start in the wave's new vectors
    known: np.ndarray  # [4, K] int64, rows AT, ITEM, TYPE, RAW_TYPE: every user's, in order
    known_keys: np.ndarray  # [K]: user row * _USER_KEY + history index (sorted)
    slots: np.ndarray  # [U]: the user's pool slot, -1 none
    hit: np.ndarray  # [U] bool: the slot held this window's cache
    previous_row: np.ndarray  # [U]: row in the previous vectors, -1 none

    @property
    def n_known(self) -> np.ndarray:
        return self.n_previous + self.n_new

    @property
    def has_previous(self) -> np.ndarray:
        """[U]: the user has a vector from before the wave (a valid cache or stored events)."""
        return self.hit | (self.n_previous > 0)

    @property
    def needs_slot(self) -> np.ndarray:
        return self.hit | (self.n_known > 0)


def _exclusive_cumsum(counts: np.ndarray) -> np.ndarray:
    out = np.zeros(len(counts), dtype=np.int64)
    if len(counts) > 1:
        np.cumsum(counts[:-1], out=out[1:])
    return out


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The ranges [starts[i], starts[i] + lengths[i]) one after another, as one index array."""
    total = int(lengths.sum())
    return np.arange(total, dtype=np.int64) + np.repeat(starts - _exclusive_cumsum(lengths), lengths)


def _padded(known: np.ndarray, starts: np.ndarray, lengths: np.ndarray, left: bool
            ) -> EventInputs:
    """The model's inputs of `known[:, starts[i] : starts[i] + lengths[i]]` as rows padded
    with 0 on the left (`encode`) or on the right (`extend`): [B, longest] each."""
    longest = int(lengths.max())
    columns = np.arange(longest, dtype=np.int64)
    shift = (longest - lengths) if left else np.zeros_like(lengths)
    source = starts[:, None] + columns[None, :] - shift[:, None]
    valid = (columns[None, :] >= shift[:, None]) & (columns[None, :] < (shift + lengths)[:, None])
    source = np.where(valid, source, 0)
    items = np.where(valid, known[ITEM][source], 0)
    types = np.where(valid, known[TYPE][source], 0)
    return EventInputs(torch.from_numpy(items), torch.from_numpy(types))


class Recommender:
    """Runs `extend`/`step` and retrieval for waves of events against one model artifact."""

    def __init__(
        self,
        artifact: Artifact,
        backend: StepBackend,
        retriever: ItemRetriever,
        cache: KVPool | int,
        *,
        k: int = 10,
        exclude_seen: bool = True,
        because_count: int = 3,
        reuse_cache: bool = True,
        event_types: Sequence[str] | None = None,
        window_capacity: int = 0,
    ) -> None:
        """`cache`: the pool of key/value caches, or its byte budget (a pool is then made on
        the backend's device, sized for `window_capacity` stored events per user, default the
        model's N*(W-1)+1). `event_types`: the deployment's (`--event-types`), whose 1-based
        positions the windows store; each is mapped to the model's own index by name (default:
        the model's). `reuse_cache=False` is the no-cache baseline: every event is its own
        wave entry and re-encodes the user's stored window (same answers, the cost a cache
        saves)."""
        if artifact.config.time_features:  # the windows do not carry time codes yet
            raise ArtifactError("the model has time features (time_features in its config.json), "
                                "which the worker does not serve yet: train it without "
                                "--time-features")
        self.artifact = artifact
        self.event_types = list(event_types if event_types is not None else artifact.event_types)
        self.type_map = event_type_map(self.event_types, artifact.event_types)
        self._type_table = np.array([*self.type_map, 0], dtype=np.int64)
        self.reuse_cache = reuse_cache
        self.backend = backend
        self.retriever = retriever
        self.history = artifact.config.history_needed
        if not isinstance(cache, KVPool):
            cache = KVPool(artifact.config, cache, device=backend.device,
                           known_per_user=max(window_capacity, self.history))
        self.cache = cache
        self.k = k
        self.exclude_seen = exclude_seen
        self.because_count = because_count
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

    def _types(self, raw: np.ndarray) -> np.ndarray:
        """The model's index of each event type (the window stores the deployment's)."""
        table = self._type_table
        return table[np.where(raw < len(table) - 1, raw, len(table) - 1)]

    def _known_of(self, events: Sequence[WindowEvent], first_at: np.ndarray, counts: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The known events among `events` (users' runs of `counts`, the run of user i
        starting at history index first_at[i]) as a [4, n] array, each user's count of them,
        and which of `events` they are (a mask)."""
        get = self.artifact.item_index.get
        total = len(events)
        items = np.fromiter((get(e.item_id, 0) for e in events), dtype=np.int64, count=total)
        raw = np.fromiter((e.event_type for e in events), dtype=np.int64, count=total)
        owner = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
        at = first_at[owner] + np.arange(total, dtype=np.int64) - _exclusive_cumsum(counts)[owner]
        known = items > 0
        array = np.stack([at, items, self._types(raw), raw])[:, known]
        return array, np.bincount(owner[known], minlength=len(counts)).astype(np.int64), known

    def prewarm(self, windows: Sequence[tuple[str, WindowSnapshot]], batch: int = 256) -> int:
        """Fill the cache of these users from their stored windows (batched `encode` into their
        slots), as a refill would: exact, and valid only while the window still ends at the
        same offset. Runs before the model serves (off the hot path); returns how many users it
        warmed (the last ones stay if they outnumber the pool's slots)."""
        pool = self.cache
        windows = [(u, w) for u, w in windows if w.events]
        if not windows:
            return 0
        known, counts, _ = self._known_of(
            [e for _, w in windows for e in w.events],
            np.fromiter((w.first_index for _, w in windows), dtype=np.int64, count=len(windows)),
            np.fromiter((len(w.events) for _, w in windows), dtype=np.int64, count=len(windows)),
        )
        base = _exclusive_cumsum(counts)
        ready = np.flatnonzero(counts > 0)
        step = max(1, min(batch, pool.slots))
        for start in range(0, len(ready), step):
            rows = ready[start : start + step]
            slots = pool.assign([windows[r][0] for r in rows.tolist()])
            lengths = np.minimum(counts[rows], self.history)
            self.backend.encode_into(
                pool.kv, pool.vectors, torch.from_numpy(slots),
                _padded(known, base[rows] + counts[rows] - lengths, lengths, left=True),
            )
            pool.store(slots, [windows[r][1].events[-1].offset for r in rows.tolist()],
                       [known[:, b : b + n].copy() for b, n in zip(base[rows].tolist(),
                                                                   counts[rows].tolist(),
                                                                   strict=True)])
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
        self.cache.discard(user_ids)

    def recommend(self, wave: Sequence[WaveInput]) -> tuple[ScoredBatch, RecommendCounters]:
        """One recommendation per event: users in the wave's order, each user's in order. A
        wave of more users than the pool has slots runs in parts of that many users."""
        stats = self.cache.stats
        hits, misses, unknown = stats.hits, stats.misses, self._unknown_items
        part = self.cache.slots
        scored = self._recommend(wave[:part])
        for start in range(part, len(wave), part):
            scored.extend(self._recommend(wave[start : start + part]))
        return scored, RecommendCounters(
            stats.hits - hits, stats.misses - misses, self._unknown_items - unknown
        )

    def _recommend(self, users: Sequence[WaveInput]) -> ScoredBatch:
        wave = self._plan(users)
        previous_vectors = self._prepare_slots(wave)
        new_vectors, new_attention = self._advance(wave)
        if self.reuse_cache:
            self._keep(wave)
        else:  # the baseline keeps nothing: the slots were scratch space for this wave
            self.cache.discard(wave.user_ids[r] for r in np.flatnonzero(wave.slots >= 0).tolist())
        return self._retrieve(wave, new_vectors, new_attention, previous_vectors)

    def _plan(self, users: Sequence[WaveInput]) -> _Wave:
        """The wave's columns: its events, the cache lookup, every user's known events."""
        count = len(users)
        user_ids = [user.user_id for user in users]
        n_events = np.fromiter((len(u.events) for u in users), dtype=np.int64, count=count)
        n_before = np.fromiter((len(u.previous) for u in users), dtype=np.int64, count=count)
        first_index = np.fromiter((u.first_index for u in users), dtype=np.int64, count=count)
        new_known, n_new, own = self._known_of(
            [e for user in users for e in user.events], first_index + n_before, n_events
        )
        events = int(n_events.sum())
        event_user = np.repeat(np.arange(count, dtype=np.int64), n_events)
        event_at = (first_index + n_before)[event_user] + np.arange(events, dtype=np.int64) \
            - _exclusive_cumsum(n_events)[event_user]
        self._unknown_items += events - int(own.sum())
        new_base = _exclusive_cumsum(n_new)
        answered_by = np.cumsum(own) - 1 - new_base[event_user]

        if self.reuse_cache:
            window_end = [u.previous[-1].offset if u.previous else -1 for u in users]
            slots = self.cache.lookup(user_ids, window_end)
        else:
            slots = np.full(count, -1, dtype=np.int64)
        hit = slots >= 0
        hit_rows, miss_rows = np.flatnonzero(hit), np.flatnonzero(~hit)
        held = self.cache.known_of(slots[hit_rows])
        n_previous = np.zeros(count, dtype=np.int64)
        n_previous[hit_rows] = [a.shape[1] for a in held]
        missed = [users[r] for r in miss_rows.tolist()]
        miss_known, n_miss, _ = self._known_of(
            [e for user in missed for e in user.previous], first_index[miss_rows],
            n_before[miss_rows],
        )
        n_previous[miss_rows] = n_miss

        n_known = n_previous + n_new
        known_base = _exclusive_cumsum(n_known)
        known = np.empty((KNOWN_ROWS, int(n_known.sum())), dtype=np.int64)
        if held:
            known[:, _ranges(known_base[hit_rows], n_previous[hit_rows])] = np.concatenate(
                held, axis=1)
        known[:, _ranges(known_base[miss_rows], n_miss)] = miss_known
        known[:, _ranges(known_base + n_previous, n_new)] = new_known
        known_keys = np.repeat(np.arange(count, dtype=np.int64), n_known) * _USER_KEY + known[AT]
        return _Wave(users, user_ids, event_user, event_at, own, answered_by, n_events,
                     n_previous, n_new, known_base, new_base, known, known_keys, slots, hit,
                     np.full(count, -1, dtype=np.int64))

    def _prepare_slots(self, wave: _Wave) -> torch.Tensor:
        """Slots for the users that lack one, refilled (one batched `encode` of each one's last
        N*(W-1)+1 stored known events) or emptied (no known event before the wave); returns
        the vectors from before the wave that some event needs (rows: `wave.previous_row`)."""
        pool = self.cache
        pool.invalidate(wave.slots[wave.hit])  # valid again only once `_keep` stores them
        fresh = wave.needs_slot & ~wave.hit
        rows = np.flatnonzero(fresh)
        if len(rows):
            wave.slots[rows] = pool.assign([wave.user_ids[r] for r in rows.tolist()])
        refill = rows[wave.n_previous[rows] > 0]
        empty = rows[wave.n_previous[rows] == 0]
        if len(empty):
            pool.clear_slots(torch.from_numpy(wave.slots[empty]))
        if len(refill):
            lengths = np.minimum(wave.n_previous[refill], self.history)
            starts = wave.known_base[refill] + wave.n_previous[refill] - lengths
            self.backend.encode_into(pool.kv, pool.vectors, torch.from_numpy(wave.slots[refill]),
                                     _padded(wave.known, starts, lengths, left=True))
        before = (wave.answered_by < 0) & wave.has_previous[wave.event_user]
        needed = np.unique(wave.event_user[before])
        wave.previous_row[needed] = np.arange(len(needed))
        if not len(needed):
            return torch.empty((0, self.artifact.config.d_model))
        index = torch.from_numpy(wave.slots[needed]).to(pool.device)
        return pool.vectors.index_select(0, index).float().cpu()

    def _advance(self, wave: _Wave) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the new known events through the model in their users' slots: one
        `extend_into` per group (`model.batching.group_by_length`; T = 1 is `step`). Returns
        the vectors [N, d] and attention [N, W] after each new known event, user by user."""
        cfg = self.artifact.config
        total = int(wave.n_new.sum())
        vectors = torch.empty((total, cfg.d_model))
        attention = torch.empty((total, cfg.window))
        moving = np.flatnonzero(wave.n_new > 0)
        for group in group_by_length(wave.n_new[moving].tolist()):
            rows = moving[group]
            counts = wave.n_new[rows]
            events = _padded(wave.known, wave.known_base[rows] + wave.n_previous[rows],
                             counts, left=False)
            out, weights = self.backend.extend_into(
                self.cache.kv, self.cache.vectors, torch.from_numpy(wave.slots[rows]),
                events, torch.from_numpy(counts), return_attention=True,
            )
            columns = np.arange(events.shape[1])
            real = columns[None, :] < counts[:, None]
            into = torch.from_numpy((wave.new_base[rows][:, None] + columns[None, :])[real])
            real_rows = torch.from_numpy(real)
            vectors[into] = out[real_rows].float()
            if weights is not None:
                attention[into] = weights[real_rows].float()
        return vectors, attention

    def _keep(self, wave: _Wave) -> None:
        """Record each user's slot as valid for its window after this wave, with the known
        events of that window (what its next wave needs)."""
        rows = np.flatnonzero(wave.needs_slot & (wave.n_events > 0))
        if not len(rows):
            return
        users = wave.users
        capacity = np.fromiter((users[r].capacity for r in rows.tolist()), dtype=np.int64,
                               count=len(rows))
        seen = wave.n_events[rows] + np.fromiter(
            (len(users[r].previous) for r in rows.tolist()), dtype=np.int64, count=len(rows))
        total = np.fromiter((users[r].first_index for r in rows.tolist()), dtype=np.int64,
                            count=len(rows)) + seen
        first = total - np.minimum(capacity, seen)  # history index of the next window's first
        starts = np.searchsorted(wave.known_keys, rows * _USER_KEY + first)
        ends = wave.known_base[rows] + wave.n_known[rows]
        known = wave.known
        self.cache.store(
            wave.slots[rows],
            [users[r].events[-1].offset for r in rows.tolist()],
            [known[:, s:e].copy() for s, e in zip(starts.tolist(), ends.tolist(), strict=True)],
        )

    def _retrieve(self, wave: _Wave, new_vectors: torch.Tensor, new_attention: torch.Tensor,
                  previous_vectors: torch.Tensor) -> ScoredBatch:
        """One batched search for every event with a user vector; the rest get popular items.
        Results stay columns of item indices (`ScoredBatch`): no object per item or event."""
        batch = ScoredBatch(self.artifact.item_ids, self.event_types, self.artifact.item_index)
        user, answered_by = wave.event_user, wave.answered_by
        size = len(user)
        cold = (answered_by < 0) & ~wave.has_previous[user]
        batch.user_ids = [wave.user_ids[u] for u in user.tolist()]
        batch.cold_start = cold.tolist()
        batch.unknown_item = (~wave.own).tolist()
        batch.items = [self._popular_items] * size
        batch.scores = [self._popular_item_scores] * size
        batch.because = [[] for _ in range(size)]
        query = np.flatnonzero(~cold)
        if not len(query):
            return batch
        q_user, q_answer = user[query], answered_by[query]
        source = np.where(q_answer >= 0, wave.new_base[q_user] + q_answer,
                          len(new_vectors) + wave.previous_row[q_user])
        queries = torch.cat([new_vectors, previous_vectors])[torch.from_numpy(source)]
        exclude = None
        if self.exclude_seen:
            capacity = np.fromiter((u.capacity for u in wave.users), dtype=np.int64,
                                   count=len(wave.users))
            window_first = np.maximum(wave.event_at[query] + 1 - capacity[q_user], 0)
            starts = np.searchsorted(wave.known_keys, q_user * _USER_KEY + window_first)
            upto = wave.n_previous[q_user] + q_answer + 1  # known events up to this one
            lengths = np.maximum(wave.known_base[q_user] + upto - starts, 0)
            offsets = np.zeros(len(query) + 1, dtype=np.int64)
            np.cumsum(lengths, out=offsets[1:])
            exclude = Exclusions.from_csr(offsets, wave.known[ITEM][_ranges(starts, lengths)],
                                          self.retriever.n_rows)
        found = self.retriever.search(queries.numpy(), self.k, exclude=exclude)
        scores = np.round(found.scores.astype(np.float64), 6)
        indices = found.indices
        items_rows, score_rows = indices.tolist(), scores.tolist()
        if not bool((indices > 0).all()):  # fewer than k items left: drop the -1 slots
            valid = (indices > 0).tolist()
            items_rows = [[i for i, v in zip(r, m, strict=True) if v]
                          for r, m in zip(items_rows, valid, strict=True)]
            score_rows = [[s for s, v in zip(r, m, strict=True) if v]
                          for r, m in zip(score_rows, valid, strict=True)]
        for event, row, row_scores in zip(query.tolist(), items_rows, score_rows, strict=True):
            batch.items[event] = row
            batch.scores[event] = row_scores
        self._explain(batch, wave, new_attention)
        return batch

    def _explain(self, batch: ScoredBatch, wave: _Wave, new_attention: torch.Tensor) -> None:
        """`because` (see `stream.worker.because`) of the events whose own item was encoded: one
        top-k over their attention rows, the items and types looked up as columns."""
        count = self.because_count
        events = np.flatnonzero(wave.own)
        if not len(events) or count <= 0:
            return
        user, answer = wave.event_user[events], wave.answered_by[events]
        weights = new_attention[torch.from_numpy(wave.new_base[user] + answer)]
        top = torch.topk(weights, min(count, weights.shape[1]), dim=1)
        ages = top.indices.numpy().astype(np.int64)
        upto = (wave.n_previous[user] + answer + 1)[:, None]
        position = np.clip(wave.known_base[user][:, None] + upto - 1 - ages, 0, None)
        keep = ((top.values.numpy() > 0.0) & (ages < upto)).tolist()
        items = wave.known[ITEM][position].tolist()
        types = wave.known[RAW_TYPE][position].tolist()
        because = batch.because
        for event, row_keep, row_items, row_types, row_weights in zip(
            events.tolist(), keep, items, types, top.values.tolist(), strict=True
        ):
            because[event] = [(i, t, round(w, 4)) for i, t, w, k in
                              zip(row_items, row_types, row_weights, row_keep, strict=True) if k]
