"""One RocksDB store (rocksdict) per input partition: user windows plus the changelog offset.

A checkpoint writes a batch of windows together with the changelog offset they correspond to
in one RocksDB `WriteBatch`, so the stored state and the position in its changelog topic land
atomically: after any crash, the store holds the state as of exactly one changelog offset, and
recovery replays the changelog from there.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from functools import cache
from pathlib import Path

from rocksdict import BlockBasedOptions, Cache, Options, Rdict, WriteBatch

_WINDOW_PREFIX = b"w:"
_CHANGELOG_OFFSET_KEY = b"m:changelog_offset"

# RocksDB's memory, bounded. Its defaults (a 64 MiB write buffer per store, two of them, and a
# block cache per store) let each partition's store grow by up to 128 MiB of memtables before
# its first flush: in a 30-minute `kvrec bench soak` at 500 events/s no store had flushed after
# 18 minutes (all windows in its write-ahead log and memtable) and the worker's resident memory
# grew ~8 MiB a minute. Checkpoints write little (changed windows, every second), so small
# write buffers flush often at no measurable cost; one block cache serves every store.
WRITE_BUFFER_BYTES = 8 << 20  # per store; at most two: 16 MiB per partition
BLOCK_CACHE_BYTES = 32 << 20  # shared by every store of the process, index and filter blocks too


@cache
def _block_cache() -> Cache:
    return Cache(BLOCK_CACHE_BYTES)


def store_options() -> Options:
    options = Options(raw_mode=True)
    options.create_if_missing(True)
    options.set_write_buffer_size(WRITE_BUFFER_BYTES)
    options.set_max_write_buffer_number(2)
    table = BlockBasedOptions()
    table.set_block_cache(_block_cache())
    table.set_cache_index_and_filter_blocks(True)
    options.set_block_based_table_factory(table)
    return options


class WindowStore:
    """Windows of the users whose events arrive on one input partition."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = Rdict(str(path), options=store_options())

    def get(self, user_id: str) -> bytes | None:
        return self._db.get(_WINDOW_PREFIX + user_id.encode())

    def changelog_offset(self) -> int | None:
        """Offset of the last changelog record reflected in this store, None if none."""
        raw = self._db.get(_CHANGELOG_OFFSET_KEY)
        return None if raw is None else int.from_bytes(raw, "little", signed=True)

    def write(self, windows: Mapping[str, bytes], changelog_offset: int | None) -> None:
        """Write `windows` and the changelog offset atomically."""
        batch = WriteBatch(raw_mode=True)
        for user_id, value in windows.items():
            batch.put(_WINDOW_PREFIX + user_id.encode(), value)
        if changelog_offset is not None:
            batch.put(_CHANGELOG_OFFSET_KEY, changelog_offset.to_bytes(8, "little", signed=True))
        self._db.write(batch)

    def items(self) -> Iterator[tuple[str, bytes]]:
        """All (user id, window bytes) pairs, in key order."""
        for key, value in self._db.items(from_key=_WINDOW_PREFIX):
            if not key.startswith(_WINDOW_PREFIX):
                break
            yield key[len(_WINDOW_PREFIX) :].decode(), value

    def close(self) -> None:
        self._db.close()

    def destroy(self) -> None:
        """Close and delete the store's files (used when the changelog says the state is stale).

        Only RocksDB's own files go (its DestroyDB): a file someone else put into the folder,
        which lies under the worker's `--state-dir`, stays, and with it the folder."""
        self.close()
        Rdict.destroy(str(self.path), store_options())
