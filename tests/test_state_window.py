from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvrec.state.kvcache import LruByteCache
from kvrec.state.store import WindowStore
from kvrec.state.window import CorruptWindow, Window, WindowEvent


def _event(i: int, item: str = "sku-1") -> WindowEvent:
    return WindowEvent(f"{item}-{i}", event_type=1 + i % 4, ts=1_700_000_000_000 + i, offset=i)


def test_window_keeps_last_capacity_events_and_round_trips() -> None:
    window = Window(capacity=5)
    for i in range(12):
        assert window.apply(_event(i, item="é-ünïcode"))
    assert [e.offset for e in window] == [7, 8, 9, 10, 11]
    restored = Window.from_bytes(window.to_bytes(), capacity=5)
    assert restored == window
    assert restored.total_events == 12 and restored.last_offset == 11


def test_window_ignores_replayed_offsets() -> None:
    window = Window(capacity=10)
    for i in range(4):
        window.apply(_event(i))
    assert not window.apply(_event(2))
    assert not window.apply(_event(3))
    assert window.apply(_event(4))
    assert [e.offset for e in window] == [0, 1, 2, 3, 4]


def test_window_read_with_smaller_capacity_keeps_newest() -> None:
    window = Window(capacity=10)
    for i in range(8):
        window.apply(_event(i))
    assert [e.offset for e in Window.from_bytes(window.to_bytes(), capacity=3)] == [5, 6, 7]


def test_store_writes_windows_and_offset_atomically_and_persists(tmp_path: Path) -> None:
    store = WindowStore(tmp_path / "events-0")
    assert store.changelog_offset() is None
    store.write({"u1": b"one", "u2": b"two"}, changelog_offset=41)
    store.write({"u1": b"uno"}, changelog_offset=42)
    store.close()
    reopened = WindowStore(tmp_path / "events-0")
    assert reopened.get("u1") == b"uno"
    assert reopened.get("missing") is None
    assert reopened.changelog_offset() == 42
    assert dict(reopened.items()) == {"u1": b"uno", "u2": b"two"}
    reopened.destroy()
    assert not (tmp_path / "events-0").exists()


class _Entry:
    def __init__(self, size: int) -> None:
        self.size = size

    def nbytes(self) -> int:
        return self.size


def test_lru_cache_evicts_least_recent_by_bytes_and_keys_by_version() -> None:
    cache: LruByteCache[_Entry] = LruByteCache(max_bytes=100)
    cache.put("a", "v1", _Entry(40))
    cache.put("b", "v1", _Entry(40))
    assert cache.get("a", "v1") is not None  # a is now most recent
    cache.put("c", "v1", _Entry(40))  # evicts b
    assert cache.get("b", "v1") is None
    assert cache.get("a", "v2") is None  # other model version never hits
    assert cache.bytes_used == 80 and len(cache) == 2
    assert cache.stats.evictions == 1 and cache.stats.hits == 1 and cache.stats.misses == 2
    cache.put("huge", "v1", _Entry(1000))
    assert cache.get("huge", "v1") is None and cache.bytes_used == 80
    with pytest.raises(ValueError):
        LruByteCache(0)


def test_packed_entries_follow_the_events_through_trimming_and_round_trips() -> None:
    window = Window(capacity=3)
    for offset in range(7):
        window.apply(WindowEvent(f"sku-{offset}", 1 + offset % 4, 1_000 + offset, offset))
        restored = Window.from_bytes(window.to_bytes(), 3)
        assert restored == window and restored.packed == window.packed
    rebuilt = Window(3, list(window.events), window.last_offset, window.total_events)
    assert rebuilt.to_bytes() == window.to_bytes()  # packed recomputed when not given
    smaller = Window.from_bytes(window.to_bytes(), 2)
    assert [e.offset for e in smaller.events] == [5, 6] and len(smaller.packed) == 2
    assert smaller.to_bytes() == Window(2, smaller.events[:], 6, 7).to_bytes()


def test_checkpointed_windows_stay_in_memory_up_to_the_limit(tmp_path: Path) -> None:
    from kvrec.state.partition import WorkerState

    states = WorkerState(tmp_path, "group", "events", window_capacity=4, keep_in_memory=2)
    state = states.open(0)
    for n, user in enumerate(("a", "b", "c")):
        state.window(user).apply(WindowEvent(f"sku-{n}", 1, 1_000 + n, n))
    records = state.prepare()
    windows = {record.user_id: record.window for record in records}
    assert windows == {user: w.to_bytes() for user, w in state.dirty.items()}
    assert {r.user_id: r.input_offset for r in records} == {"a": 0, "b": 1, "c": 2}
    state.flush(changelog_offset=7)
    assert state.changelog_offset() == 7
    assert not state.dirty and list(state.clean) == ["b", "c"]  # "a" was least recent
    kept = state.clean["c"]
    assert state.window("c") is kept and "c" in state.dirty  # no RocksDB read for "c"
    reread = state.window("a")  # evicted: read back from RocksDB, equal to what was written
    assert reread.to_bytes() == windows["a"] and reread is not None
    states.close_all()


def test_an_aborted_change_is_never_written(tmp_path: Path) -> None:
    from kvrec.state.partition import WorkerState

    states = WorkerState(tmp_path, "group", "events", window_capacity=4)
    state = states.open(0)
    state.window("a").apply(WindowEvent("sku-1", 1, 1_000, 0))
    state.prepare()
    state.flush(changelog_offset=0)
    state.window("a").apply(WindowEvent("sku-2", 1, 1_001, 1))
    state.window("b").apply(WindowEvent("sku-3", 1, 1_002, 2))
    state.prepare()
    state.abort()
    assert not state.dirty and state.store.get("b") is None
    assert [e.offset for e in Window.from_bytes(state.store.get("a"), 4)] == [0]
    assert state.changelog_offset() == 0
    states.close_all()


def test_a_changelog_record_reads_back_and_anything_else_is_refused() -> None:
    from kvrec.state.changelog import ChangelogRecord, read_record

    record = ChangelogRecord("ü-1", b"window", 41)
    assert read_record(record.key, record.window, list(record.headers.items())) == record
    assert read_record(None, b"w", list(record.headers.items())) is None
    assert read_record(b"\xff", b"w", list(record.headers.items())) is None
    assert read_record(record.key, None, list(record.headers.items())) is None
    assert read_record(record.key, b"w", [("kvrec.input_offset", b"x")]) is None
    assert read_record(record.key, b"w", None) is None


# --- a window update happens whole or not at all; stored bytes decode or are refused ----------

def test_an_event_that_cannot_be_stored_leaves_the_window_unchanged() -> None:
    window = Window(capacity=3)
    for i in range(3):
        window.apply(_event(i))
    before = window.to_bytes()
    for bad in (WindowEvent("\ud800", 1, 5, 10),  # not encodable
                WindowEvent("sku", 1, -(2**70), 11),  # ts beyond 64 bits
                WindowEvent("sku", 300, 5, 12),  # event type beyond a byte
                WindowEvent("i" * 70_000, 1, 5, 13)):  # longer than a 16-bit length
        with pytest.raises(ValueError):
            window.apply(bad)
        assert window.to_bytes() == before and len(window.events) == len(window.packed) == 3
    assert Window.from_bytes(window.to_bytes(), 3) == window


def test_a_half_written_window_is_refused_as_corrupt() -> None:
    window = Window(capacity=5)
    window.apply(_event(1))
    data = bytearray(window.to_bytes())
    data[1] = 2  # the header counts two events, the value holds one
    with pytest.raises(CorruptWindow):
        Window.from_bytes(bytes(data), 5)
    with pytest.raises(CorruptWindow):
        Window.from_bytes(window.to_bytes() + b"x", 5)  # trailing bytes


def test_a_snapshot_restores_the_window_exactly() -> None:
    window = Window(capacity=3)
    for i in range(4):
        window.apply(_event(i))
    snapshot = window.snapshot()
    expected = window.to_bytes()
    for i in range(4, 9):
        window.apply(_event(i))
    window.restore(snapshot)
    assert window.to_bytes() == expected and window == Window.from_bytes(expected, 3)
    assert snapshot.first_index == 1


@settings(max_examples=500, deadline=None, derandomize=True)
@given(st.binary(max_size=200))
def test_any_bytes_decode_to_a_window_or_are_refused_as_corrupt(data: bytes) -> None:
    try:
        window = Window.from_bytes(data, 7)
    except CorruptWindow:
        return
    assert Window.from_bytes(window.to_bytes(), 7) == window


EVENTS = st.builds(
    WindowEvent,
    item_id=st.text(max_size=5) | st.text(st.characters(categories=["Cs"]), min_size=1, max_size=2),
    event_type=st.integers(-5, 300),
    ts=st.integers(-(2**64), 2**64),
    offset=st.integers(0, 2**20),
)


@settings(max_examples=500, deadline=None, derandomize=True)
@given(st.lists(EVENTS, max_size=12))
def test_any_sequence_of_events_keeps_the_window_decodable(events: list[WindowEvent]) -> None:
    window = Window(capacity=4)
    applied: list[WindowEvent] = []
    for event in events:
        before = window.to_bytes()
        try:
            if window.apply(event):
                applied.append(event)
        except ValueError:
            assert window.to_bytes() == before
    assert [e for e in window] == applied[-4:]
    assert Window.from_bytes(window.to_bytes(), 4) == window
