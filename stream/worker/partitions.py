"""The state of the input partitions this worker owns: RocksDB stores plus unflushed windows.

Windows changed since the last checkpoint live in memory (`dirty`) and are what reads see
first; a checkpoint sends them to the changelog, commits the input offsets, then writes them
to RocksDB together with the changelog offset (see `checkpoint.py`), and keeps up to
`keep_in_memory` of them per partition (least recently used out) as `clean`: equal to what
RocksDB holds, so an active user's next event does not read and parse its window again.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from state.store import PartitionStore
from state.window import CorruptWindow, Window

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuarantinedWindow:
    """A stored window that did not decode: the user starts again from an empty window, and
    the bytes are handed to the loop, which reports them (dead-letter topic, counter)."""

    partition: int
    user_id: str
    raw: bytes
    error: str


@dataclass
class PartitionState:
    partition: int
    store: PartitionStore
    capacity: int
    keep_in_memory: int = 10_000
    dirty: dict[str, Window] = field(default_factory=dict)
    clean: OrderedDict[str, Window] = field(default_factory=OrderedDict)
    quarantined: list[QuarantinedWindow] = field(default_factory=list)

    def window(self, user_id: str) -> Window:
        window = self.dirty.get(user_id)
        if window is not None:
            return window
        window = self.clean.pop(user_id, None)
        if window is None:
            window = self._load(user_id)
        self.dirty[user_id] = window  # the caller is about to change it
        return window

    def _load(self, user_id: str) -> Window:
        raw = self.store.get(user_id)
        if raw is None:
            return Window(self.capacity)
        try:
            return Window.from_bytes(raw, self.capacity)
        except CorruptWindow as exc:
            log.error("partition %d: window of user %r quarantined, restarted empty: %s",
                      self.partition, user_id, exc)
            self.quarantined.append(QuarantinedWindow(self.partition, user_id, raw, str(exc)))
            return Window(self.capacity)

    def written(self) -> None:
        """The dirty windows are in RocksDB now: keep the most recent in memory as clean."""
        self.clean.update(self.dirty)
        self.dirty.clear()
        while len(self.clean) > self.keep_in_memory:
            self.clean.popitem(last=False)


class PartitionStates:
    """Opens a store per assigned partition under `state_dir/<topic>-<partition>`."""

    def __init__(
        self, state_dir: Path, topic: str, window_capacity: int, keep_in_memory: int = 10_000
    ) -> None:
        self.state_dir = state_dir
        self.topic = topic
        self.window_capacity = window_capacity
        self.keep_in_memory = keep_in_memory
        self.by_partition: dict[int, PartitionState] = {}

    def path(self, partition: int) -> Path:
        return self.state_dir / f"{self.topic}-{partition}"

    def open(self, partition: int) -> PartitionState:
        state = PartitionState(
            partition, PartitionStore(self.path(partition)), self.window_capacity,
            self.keep_in_memory,
        )
        self.by_partition[partition] = state
        return state

    def close(self, partition: int) -> None:
        state = self.by_partition.pop(partition, None)
        if state is not None:
            state.store.close()

    def close_all(self) -> None:
        for partition in list(self.by_partition):
            self.close(partition)

    def __getitem__(self, partition: int) -> PartitionState:
        return self.by_partition[partition]

    def __contains__(self, partition: int) -> bool:
        return partition in self.by_partition
