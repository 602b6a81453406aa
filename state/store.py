"""One RocksDB store (rocksdict) per input partition: user windows plus the changelog offset.

A checkpoint writes a batch of windows together with the changelog offset they correspond to
in one RocksDB `WriteBatch`, so the stored state and the position in its changelog topic land
atomically: after any crash, the store holds the state as of exactly one changelog offset, and
recovery replays the changelog from there.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

from rocksdict import Options, Rdict, WriteBatch

_WINDOW_PREFIX = b"w:"
_CHANGELOG_OFFSET_KEY = b"m:changelog_offset"


class WindowStore:
    """Windows of the users whose events arrive on one input partition."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        options = Options(raw_mode=True)
        options.create_if_missing(True)
        self._db = Rdict(str(path), options=options)

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
        """Close and delete the store's files (used when the changelog says the state is stale)."""
        self.close()
        shutil.rmtree(self.path, ignore_errors=True)
