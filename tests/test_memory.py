"""Freed heap memory goes back to the OS (model/memory.py)."""

from __future__ import annotations

import ctypes.util

import pytest

from kvrec.model.memory import release_free_memory


def _resident_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096 / 2**20


@pytest.mark.skipif(ctypes.util.find_library("c") is None, reason="no C library to ask")
def test_freed_heap_pages_are_returned() -> None:
    # 3,000 chunks of 48 KB (below glibc's mmap threshold: they live in the heap), all freed
    # but the newest, which pins the top of the heap so that free() alone cannot shrink it
    chunks = [bytearray(48 * 1024) for _ in range(3000)]
    pinned = chunks[-1]
    del chunks
    before = _resident_mb()
    if not release_free_memory():
        pytest.skip("this C library has no malloc_trim")
    after = _resident_mb()
    assert before - after > 100, (before, after)  # ~140 MB were free inside the heap
    assert len(pinned) == 48 * 1024


def test_release_periodically_calls_until_stopped(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    import kvrec.model.memory as memory

    calls: list[float] = []
    monkeypatch.setattr(memory, "release_free_memory", lambda: calls.append(time.monotonic()))
    stop = memory.release_periodically(0.02)
    time.sleep(0.3)
    stop.set()
    time.sleep(0.05)
    seen = len(calls)
    assert seen >= 3
    time.sleep(0.1)
    assert len(calls) == seen  # stopped
