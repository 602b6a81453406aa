"""The key/value caches of many users in one preallocated pool: slots, LRU by user id.

One slab per tensor, allocated once on the backend's device (CPU by default, the GPU for
`torch-cuda`): `kv.keys`/`kv.values` [n_layers, S, n_heads, W, head_dim], `kv.positions` [S]
and `vectors` [S, d] (the user vector after the slot's last event). A user owns one slot; the
model reads and writes slots by index (`Encoder.extend_into`, `encode_into`), so no per-user
tensor is made, copied or moved. On the host, per slot: the input offset of the window's newest
event when the slot was written (a slot is valid only for that window, as before) and the
window's known events as one int64 array [4, n] (`KNOWN_ROWS`).

The budget (`--cache-bytes`) counts the four slabs of all S slots (allocated up front) plus the
held known-events arrays (their data and numpy's per-array header); S is chosen so that the
slabs and `known_per_user` events per slot fit, and if known events ever need more than that
reserve, least recently used users are evicted until they fit. Not counted: the LRU map itself
(a dict entry and the user id string per user, about 200 bytes).

The pool belongs to one model version (one `Recommender`): a swapped-in version has its own
pool and refills from the stored windows, so versions never mix.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from kvrec.model.config import ModelConfig
from kvrec.model.encoder import KVCache
from kvrec.state.kvcache import CacheStats

KNOWN_ROWS = 4  # history index, model item, model event type, deployment event type
KNOWN_EVENT_BYTES = KNOWN_ROWS * 8
ARRAY_HEADER_BYTES = 128  # sys.getsizeof of a 2-D numpy array less its data (numpy 2.4)
NO_WINDOW = -2  # a slot's window end that no wave has (-1: an empty window)


def slot_device_bytes(config: ModelConfig, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of one slot in the four slabs."""
    size = torch.empty((), dtype=dtype).element_size()
    kv = 2 * config.n_layers * config.n_heads * config.window * config.head_dim * size
    return kv + 8 + config.d_model * size


def budget_for(config: ModelConfig, users: int, known_per_user: int | None = None,
               dtype: torch.dtype = torch.float32) -> int:
    """The smallest budget whose pool holds `users` slots (with the same reserve)."""
    reserve = ARRAY_HEADER_BYTES + KNOWN_EVENT_BYTES * (known_per_user or config.history_needed)
    return users * (slot_device_bytes(config, dtype) + reserve)


class KVPool:
    """Slots of key/value caches for users, least recently used first out (see the module)."""

    def __init__(
        self,
        config: ModelConfig,
        max_bytes: int,
        *,
        device: torch.device | str = "cpu",
        known_per_user: int | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if max_bytes <= 0:
            raise ValueError("the key/value cache budget must be positive (bytes)")
        self.max_bytes = max_bytes
        self.slot_bytes = slot_device_bytes(config, dtype)
        per_user = budget_for(config, 1, known_per_user, dtype)
        self.slots = max_bytes // per_user
        if self.slots < 1:
            raise ValueError(
                f"a key/value cache budget of {max_bytes} bytes holds no user: one takes "
                f"{per_user} bytes (--cache-bytes)"
            )
        shape = (config.n_layers, self.slots, config.n_heads, config.window, config.head_dim)
        device = torch.device(device)
        # `empty`: pages are touched (so resident) only as slots are first written; a slot is
        # always written whole (`clear` or `encode_into`) before it is read
        self.kv = KVCache(
            torch.empty(shape, device=device, dtype=dtype),
            torch.empty(shape, device=device, dtype=dtype),
            torch.zeros(self.slots, device=device, dtype=torch.long),
        )
        self.vectors = torch.zeros((self.slots, config.d_model), device=device, dtype=dtype)
        self.device = device
        self.stats = CacheStats()
        self.window_end = np.full(self.slots, NO_WINDOW, dtype=np.int64)
        self.known: list[np.ndarray | None] = [None] * self.slots
        self.known_bytes = 0
        self._slot_of: OrderedDict[str, int] = OrderedDict()  # least recently used first
        self._free = list(range(self.slots - 1, -1, -1))  # pop() gives slot 0 first

    # --- sizes ---------------------------------------------------------------------------------
    @property
    def allocated_bytes(self) -> int:
        """What the pool holds now against the budget: every slab slot and the known events."""
        return self.slots * self.slot_bytes + self.known_bytes

    @property
    def bytes_used(self) -> int:
        """The slots users own (slab bytes) and their known events: what the cache metric shows."""
        return len(self._slot_of) * self.slot_bytes + self.known_bytes

    def __len__(self) -> int:
        return len(self._slot_of)

    def __contains__(self, user_id: object) -> bool:
        return user_id in self._slot_of

    # --- batch calls, one per wave -------------------------------------------------------------
    def lookup(self, user_ids: Sequence[str], window_ends: Sequence[int]) -> np.ndarray:
        """Each user's slot if it holds the cache of exactly that window (a hit), else -1 (a
        miss: no slot, or a stale one, which the user keeps for its refill). Hits become the
        most recently used."""
        found = np.full(len(user_ids), -1, dtype=np.int64)
        slot_of, window_end = self._slot_of, self.window_end
        hits = 0
        for row, (user_id, end) in enumerate(zip(user_ids, window_ends, strict=True)):
            slot = slot_of.get(user_id)
            if slot is not None and window_end[slot] == end:
                slot_of.move_to_end(user_id)
                found[row] = slot
                hits += 1
        self.stats.hits += hits
        self.stats.misses += len(user_ids) - hits
        return found

    def assign(self, user_ids: Sequence[str]) -> np.ndarray:
        """A slot for each user (its own if it has one, else a free one, else the least
        recently used user's, evicted); all become the most recently used. The slots' contents
        are whatever they held: the caller writes them (`clear`, `encode_into`) and `store`s.
        At most `slots` users per call, so none evicts another of the same call."""
        if len(user_ids) > self.slots:
            raise ValueError(f"{len(user_ids)} users for a pool of {self.slots} slots")
        out = np.empty(len(user_ids), dtype=np.int64)
        slot_of = self._slot_of
        for row, user_id in enumerate(user_ids):
            slot = slot_of.get(user_id)
            if slot is not None:
                slot_of.move_to_end(user_id)
            else:
                slot = self._free.pop() if self._free else self._evict_oldest()
                slot_of[user_id] = slot
                self.window_end[slot] = NO_WINDOW  # not valid until stored
            out[row] = slot
        return out

    def store(
        self, slots: Sequence[int] | np.ndarray, window_ends: Sequence[int] | np.ndarray,
        known: Sequence[np.ndarray],
    ) -> None:
        """Mark the slots valid for these windows, with the window's known events ([4, n]
        int64 each, kept as given: pass copies, not views of a larger array); then evict the
        least recently used while the known events exceed their share of the budget."""
        held = self.known
        delta = 0
        for slot, end, events in zip(slots, window_ends, known, strict=True):
            old = held[slot]
            if old is not None:
                delta -= old.nbytes + ARRAY_HEADER_BYTES
            held[slot] = events
            delta += events.nbytes + ARRAY_HEADER_BYTES
            self.window_end[slot] = end
        self.known_bytes += delta
        while self.allocated_bytes > self.max_bytes and self._slot_of:
            self._evict_oldest(free=True)

    def invalidate(self, slots: np.ndarray) -> None:
        """The slots are about to be written: until `store`d again they hold no valid window
        (a wave that fails halfway leaves no slot that looks valid with half-written data)."""
        self.window_end[slots] = NO_WINDOW

    def known_of(self, slots: np.ndarray) -> list[np.ndarray]:
        empty = np.empty((KNOWN_ROWS, 0), dtype=np.int64)
        return [held if (held := self.known[s]) is not None else empty for s in slots.tolist()]

    def discard(self, user_ids: Iterable[str]) -> None:
        """Free the users' slots (their next wave misses and refills)."""
        for user_id in user_ids:
            slot = self._slot_of.pop(user_id, None)
            if slot is not None:
                self._release(slot)

    def clear(self) -> None:
        self.discard(list(self._slot_of))

    def clear_slots(self, slots: Tensor) -> None:
        """Empty caches (no event yet) in these slots, on the pool's device."""
        slots = slots.to(self.device)
        self.kv.keys.index_fill_(1, slots, 0.0)
        self.kv.values.index_fill_(1, slots, 0.0)
        self.kv.positions.index_fill_(0, slots, 0)
        self.vectors.index_fill_(0, slots, 0.0)

    # --- inside --------------------------------------------------------------------------------
    def _evict_oldest(self, free: bool = False) -> int:
        _, slot = self._slot_of.popitem(last=False)
        self.stats.evictions += 1
        if free:
            self._release(slot)
        else:  # handed straight to a new owner by `assign`
            self._drop_known(slot)
        return slot

    def _release(self, slot: int) -> None:
        self._drop_known(slot)
        self._free.append(slot)

    def _drop_known(self, slot: int) -> None:
        old = self.known[slot]
        if old is not None:
            self.known_bytes -= old.nbytes + ARRAY_HEADER_BYTES
            self.known[slot] = None
        self.window_end[slot] = NO_WINDOW
