"""The windows of the input partitions a worker owns, with a transaction-like lifecycle.

`PartitionWindows` is one partition's windows: a `WindowStore` (RocksDB) plus, in memory, the
windows changed since the last checkpoint (`dirty`, what reads see first) and up to
`keep_in_memory` checkpointed ones (`clean`, least recently used out, equal to what RocksDB
holds, so an active user's next event does not read and parse its window again).

A checkpoint (`stream/worker/checkpoint.py`) drives it like a transaction, in the manner of
quix-streams' state transactions:

    records = windows.prepare()      # the changelog records of the changed windows
    ... produce them, flush, commit the input offsets ...
    windows.flush(changelog_offset)  # write the windows and the offset to RocksDB atomically

or `windows.abort()` to drop the changes (nothing of them is written). Recovery writes what it
reads from the changelog with `restore`. `WorkerState` holds one `PartitionWindows` per
assigned partition, under `state_dir/<group-id>/<topic>-<partition>`: two deployments (consumer
groups) that share a volume never share a store.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from kvrec.state.changelog import ChangelogRecord
from kvrec.state.store import WindowStore
from kvrec.state.window import CorruptWindow, Window

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuarantinedWindow:
    """A stored window that did not decode: the user starts again from an empty window, and
    the bytes are handed to the loop, which reports them (dead-letter topic, counter)."""

    partition: int
    user_id: str
    raw: bytes
    error: str


class PartitionWindows:
    """One input partition's user windows: RocksDB plus the changes since the last checkpoint."""

    def __init__(
        self, partition: int, store: WindowStore, capacity: int, keep_in_memory: int = 10_000
    ) -> None:
        self.partition = partition
        self.store = store
        self.capacity = capacity
        self.keep_in_memory = keep_in_memory
        self.dirty: dict[str, Window] = {}
        self.clean: OrderedDict[str, Window] = OrderedDict()
        self._prepared: dict[str, bytes] = {}
        self._quarantined: list[QuarantinedWindow] = []

    def window(self, user_id: str) -> Window:
        """The user's window, to be changed: it is part of the next checkpoint."""
        window = self.dirty.get(user_id)
        if window is not None:
            return window
        window = self.clean.pop(user_id, None)
        if window is None:
            window = self._load(user_id)
        self.dirty[user_id] = window
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
            self._quarantined.append(QuarantinedWindow(self.partition, user_id, raw, str(exc)))
            return Window(self.capacity)

    def take_quarantined(self) -> list[QuarantinedWindow]:
        """The windows quarantined since the last call (for the loop to report)."""
        taken, self._quarantined = self._quarantined, []
        return taken

    # --- the checkpoint's transaction ------------------------------------------------------
    def prepare(self) -> list[ChangelogRecord]:
        """Serialise every changed window once: the changelog records, and what `flush` writes."""
        self._prepared = {user: window.to_bytes() for user, window in self.dirty.items()}
        return [
            ChangelogRecord(user, self._prepared[user], window.last_offset)
            for user, window in self.dirty.items()
        ]

    def flush(self, changelog_offset: int | None) -> None:
        """Write the prepared windows and the changelog offset in one RocksDB batch; the
        changed windows become clean (the most recent `keep_in_memory` stay in memory)."""
        self.store.write(self._prepared, changelog_offset)
        self._prepared = {}
        self.clean.update(self.dirty)
        self.dirty.clear()
        while len(self.clean) > self.keep_in_memory:
            self.clean.popitem(last=False)

    def abort(self) -> None:
        """Drop the changes since the last checkpoint: RocksDB keeps the committed windows."""
        self._prepared = {}
        self.dirty.clear()

    # --- recovery --------------------------------------------------------------------------
    def changelog_offset(self) -> int | None:
        """The last changelog offset RocksDB reflects (None: none yet)."""
        return self.store.changelog_offset()

    def restore(self, windows: Mapping[str, bytes], changelog_offset: int) -> None:
        """Write windows read from the changelog, up to `changelog_offset`, atomically."""
        self.store.write(windows, changelog_offset)

    def close(self) -> None:
        self.store.close()


def group_directory(group_id: str) -> str:
    """The directory name of a consumer group's state: the group id itself when it is a plain
    name (letters, digits, `.`, `_`, `-`), percent-encoded otherwise (`/` is `%2F`), so that
    distinct groups never share a directory and no group id escapes `--state-dir`."""
    if not group_id:
        raise ValueError("the consumer group id must not be empty")
    name = quote(group_id, safe="")
    if name in (".", ".."):
        name = name.replace(".", "%2E")
    if len(name) > 200:  # a file name is at most 255 bytes
        name = f"{name[:150]}-{hashlib.sha256(group_id.encode()).hexdigest()[:16]}"
    return name


class WorkerState:
    """The `PartitionWindows` of every assigned partition, each in
    `state_dir/<group-id>/<topic>-<p>` (`group_directory` names the group's directory)."""

    def __init__(
        self,
        state_dir: Path,
        group_id: str,
        topic: str,
        window_capacity: int,
        keep_in_memory: int = 10_000,
    ) -> None:
        self.state_dir = state_dir
        self.group_dir = state_dir / group_directory(group_id)
        self.topic = topic
        self.window_capacity = window_capacity
        self.keep_in_memory = keep_in_memory
        self._partitions: dict[int, PartitionWindows] = {}

    def path(self, partition: int) -> Path:
        return self.group_dir / f"{self.topic}-{partition}"

    def open(self, partition: int) -> PartitionWindows:
        windows = PartitionWindows(
            partition, WindowStore(self.path(partition)), self.window_capacity,
            self.keep_in_memory,
        )
        self._partitions[partition] = windows
        return windows

    def close(self, partition: int) -> None:
        windows = self._partitions.pop(partition, None)
        if windows is not None:
            windows.close()

    def close_all(self) -> None:
        for partition in list(self._partitions):
            self.close(partition)

    def items(self) -> Iterator[tuple[int, PartitionWindows]]:
        return iter(list(self._partitions.items()))

    def __len__(self) -> int:
        return len(self._partitions)

    def __getitem__(self, partition: int) -> PartitionWindows:
        return self._partitions[partition]

    def __contains__(self, partition: int) -> bool:
        return partition in self._partitions
