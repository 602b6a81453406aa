"""An LRU map of per-user entries bounded by bytes, keyed by (user id, model version).

The worker's first cache design (one entry per user and version); the worker now keeps its
users' caches in one pool of slots (state/kvpool.py). Kept for tests/test_state_window.py.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, Protocol, TypeVar

from kvrec.state.kvpool import CacheStats


class Sized(Protocol):
    def nbytes(self) -> int: ...


EntryT = TypeVar("EntryT", bound=Sized)


class LruByteCache(Generic[EntryT]):
    """An LRU map from (user id, model version) to entries whose `nbytes()` add up to a budget."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError("the key/value cache budget must be positive (bytes)")
        self.max_bytes = max_bytes
        self.bytes_used = 0
        self.stats = CacheStats()
        self._entries: OrderedDict[tuple[str, str], tuple[EntryT, int]] = OrderedDict()

    def get(self, user_id: str, model_version: str) -> EntryT | None:
        key = (user_id, model_version)
        found = self._entries.get(key)
        if found is None:
            self.stats.misses += 1
            return None
        self._entries.move_to_end(key)
        self.stats.hits += 1
        return found[0]

    def put(self, user_id: str, model_version: str, entry: EntryT) -> None:
        key = (user_id, model_version)
        size = entry.nbytes()
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes_used -= old[1]
        if size > self.max_bytes:
            return  # larger than the whole budget: not cached
        self._entries[key] = (entry, size)
        self.bytes_used += size
        while self.bytes_used > self.max_bytes:
            _, (_, evicted_size) = self._entries.popitem(last=False)
            self.bytes_used -= evicted_size
            self.stats.evictions += 1

    def count_stale(self) -> None:
        """The entry `get` just returned turned out stale (built from another window): it was a
        miss, not a hit."""
        self.stats.hits -= 1
        self.stats.misses += 1

    def discard(self, user_id: str, model_version: str) -> None:
        old = self._entries.pop((user_id, model_version), None)
        if old is not None:
            self.bytes_used -= old[1]

    def clear(self) -> None:
        self._entries.clear()
        self.bytes_used = 0

    def __len__(self) -> int:
        return len(self._entries)
