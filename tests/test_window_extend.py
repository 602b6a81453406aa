"""`Window.extend_packed` (the loop's one call per user and wave) is `apply` of each event."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from kvrec.state.window import Window, WindowEvent, pack_event

_events = st.lists(st.tuples(st.text(max_size=4), st.integers(0, 5), st.integers(-5, 5),
                             st.integers(1, 4)), max_size=12)


@given(st.integers(1, 6), _events, st.lists(st.integers(0, 4), max_size=5))
def test_extend_packed_is_apply_of_each(capacity: int, spec, cuts: list[int]) -> None:
    events, offset = [], 0
    for item, kind, ts, step in spec:
        offset += step  # each after the last: what the loop hands over
        events.append(WindowEvent(item, kind, ts, offset))
    one, many = Window(capacity), Window(capacity)
    for event in events:
        assert one.apply(event)
    start = 0
    for cut in [*cuts, len(events)]:  # the events in waves of any sizes, some empty
        part = events[start : start + cut] if cut < len(events) else events[start:]
        many.extend_packed(part, [pack_event(e) for e in part])
        start += len(part)
    assert (many.events, many.packed, many.last_offset, many.total_events) == (
        one.events, one.packed, one.last_offset, one.total_events)
    assert many.to_bytes() == one.to_bytes()
    assert Window.from_bytes(many.to_bytes(), capacity).events == one.events
