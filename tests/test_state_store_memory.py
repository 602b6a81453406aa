"""RocksDB's memory is bounded: a store flushes its memtable to files after a few MiB of
windows, instead of holding everything written in memory (the 64 MiB default, per partition)."""

from __future__ import annotations

import os
from pathlib import Path

from kvrec.state.store import WRITE_BUFFER_BYTES, WindowStore


def test_written_windows_reach_files_after_a_few_mib(tmp_path: Path) -> None:
    store = WindowStore(tmp_path / "store")
    written = 0
    for batch in range(150):  # 30 MB, like a soak's first 15 minutes on one partition
        windows = {f"u{batch}-{n}": os.urandom(2000) for n in range(100)}
        store.write(windows, batch)
        written += sum(len(v) for v in windows.values())
    files = list((tmp_path / "store").iterdir())
    tables = [f for f in files if f.suffix == ".sst"]
    logs = [f for f in files if f.suffix == ".log"]
    assert written > 3 * WRITE_BUFFER_BYTES
    assert tables, sorted(f.name for f in files)  # flushed: not all of it held in a memtable
    assert sum(f.stat().st_size for f in logs) <= 2 * WRITE_BUFFER_BYTES + (1 << 20)
    assert store.get("u3-7") is not None and store.changelog_offset() == 149
    store.close()
