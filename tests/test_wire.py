"""The batch wire encoder writes exactly the bytes of `stream.schema.encode_recommendation`."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from kvrec.stream.schema import BecauseEvent, Recommendation, ScoredItem, encode_recommendation
from kvrec.stream.worker.wire import WireEncoder

TEXT = st.text(min_size=1, max_size=12)  # any Unicode: quotes, control characters, emoji
EVENT_TYPES = ["view", "click", "add_to_cart", "purchase"]
FINITE = st.floats(allow_nan=False, allow_infinity=False) | st.floats(-1, 1).map(lambda x: round(x, 6))


@settings(max_examples=500, deadline=None, derandomize=True)
@given(
    st.lists(TEXT, min_size=2, max_size=8, unique=True),
    TEXT,
    TEXT,
    st.data(),
)
def test_bytes_equal_encode_recommendation(catalog, user_id, version, data) -> None:
    item_ids = ["", *catalog]
    indices = st.integers(1, len(catalog))
    items = data.draw(st.lists(st.tuples(indices, FINITE), max_size=10))
    because = data.draw(st.lists(st.tuples(indices, st.integers(0, 6), FINITE), max_size=3))
    cold_start = data.draw(st.booleans())
    event_ts = data.draw(st.integers(0, 2**63 - 1))
    emitted_ts = data.draw(st.integers(0, 2**45))
    source_ts = data.draw(st.none() | st.integers(1, 2**45))
    wire = WireEncoder(version, item_ids, EVENT_TYPES)
    for _ in range(2):  # the second time from the fragments it kept
        (got,) = wire.encode_batch([user_id], [[i for i, _ in items]], [[s for _, s in items]],
                                   [because], [cold_start], [event_ts], emitted_ts, [source_ts])
        want = encode_recommendation(Recommendation(
            user_id=user_id,
            items=[ScoredItem(item_ids[i], s) for i, s in items],
            model_version=version,
            event_ts=event_ts,
            emitted_ts=emitted_ts,
            because=[BecauseEvent(item_ids[i], EVENT_TYPES[t - 1] if 0 < t <= 4 else "unknown", w)
                     for i, t, w in because],
            cold_start=cold_start,
            source_ts=source_ts,
        ))
        assert got == want


def test_a_non_finite_score_is_left_to_the_general_encoder() -> None:
    wire = WireEncoder("v1", ["", "a"], EVENT_TYPES)
    for bad in (math.inf, -math.inf, math.nan):
        got = wire.encode_batch(["u", "u", "u"], [[1], [1], [1]], [[bad], [0.5], [0.5]],
                                [[], [(1, 1, bad)], [(1, 1, 0.25)]], [False] * 3, [1] * 3, 2,
                                [None] * 3)
        assert got[:2] == [None, None]
        assert got[2] == encode_recommendation(Recommendation(
            "u", [ScoredItem("a", 0.5)], "v1", 1, 2, [BecauseEvent("a", "view", 0.25)]))


@settings(max_examples=100, deadline=None, derandomize=True)
@given(st.lists(st.tuples(TEXT, st.lists(st.tuples(st.integers(1, 3), FINITE), max_size=4),
                          st.booleans()), min_size=1, max_size=6))
def test_a_batch_equals_its_events_one_by_one(events) -> None:
    item_ids = ["", "a", "b\u00e9", 'c"']
    wire = WireEncoder("v", item_ids, EVENT_TYPES)
    got = wire.encode_batch(
        [u for u, _, _ in events], [[i for i, _ in row] for _, row, _ in events],
        [[s for _, s in row] for _, row, _ in events], [[] for _ in events],
        [c for _, _, c in events], list(range(len(events))), 7, [None] * len(events),
    )
    assert got == [
        encode_recommendation(Recommendation(u, [ScoredItem(item_ids[i], s) for i, s in row], "v",
                                             n, 7, [], c))
        for n, (u, row, c) in enumerate(events)
    ]


# where the two notations change: repr's exponent below 1e-4 and from 1e16, msgspec's below 1e-6
BOUNDARIES = st.tuples(
    st.sampled_from([1e-4, 1e-5, 1e-6, 1e-7, 1e15, 1e16, 1e17, 5e-324, 1.7976931348623157e308]),
    st.sampled_from([-math.inf, 0.0, math.inf]),  # one step down, none, one step up
    st.sampled_from([1.0, -1.0]),
).map(lambda b: b[2] * (math.nextafter(b[0], b[1]) if b[1] else b[0]))


@settings(max_examples=3000, deadline=None, derandomize=True)
@given(st.lists(st.lists(FINITE | BOUNDARIES, max_size=5), max_size=4))
def test_the_batch_number_writer_is_repr_or_leaves_the_row(rows) -> None:
    """msgspec writes a batch's scores in one call; a row it returns is `json`'s text of it."""
    from kvrec.stream.worker.wire import _number_texts

    for row, text in zip(rows, _number_texts(rows, len(rows)), strict=True):
        if text is not None:
            assert text == ",".join(map(repr, row))
