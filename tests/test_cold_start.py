"""Cold-start mode's recommender gives the one result shape, `ScoredBatch`: its rows are the
most popular items a user has not seen, and on the wire they are the bytes the general
encoder makes of each row."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kvrec.state.window import WindowEvent
from kvrec.stream.schema import Recommendation, ScoredItem, encode_recommendation
from kvrec.stream.worker.cold_start import NO_MODEL, PopularRecommender
from kvrec.stream.worker.inference import WaveInput
from kvrec.stream.worker.wire import WireEncoder

ITEMS = st.sampled_from([f"sku-{i}" for i in range(12)])
_waves = st.lists(  # waves of (user, previous items, new items)
    st.lists(st.tuples(st.sampled_from("abcd"), st.lists(ITEMS, max_size=4),
                       st.lists(ITEMS, min_size=1, max_size=3)),
             min_size=1, max_size=4, unique_by=lambda user: user[0]),
    min_size=1, max_size=5)


def _event(item: str) -> WindowEvent:
    return WindowEvent(item, 1, 0, 0)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(_waves, st.integers(1, 5), st.booleans())
def test_popular_lists_as_a_batch(waves, k: int, exclude_seen: bool) -> None:
    recommender = PopularRecommender(k, exclude_seen)
    recommender.refresh_s = 0.0  # the top list recomputed every wave
    counts: dict[str, int] = {}
    for wave in waves:
        inputs = [WaveInput(user, [_event(i) for i in before], [_event(i) for i in new], 10, 0)
                  for user, before, new in wave]
        for _, _, new in wave:
            for item in new:
                counts[item] = counts.get(item, 0) + 1
        batch, counters = recommender.recommend(inputs)
        assert counters.unknown_items == sum(len(new) for _, _, new in wave)
        top = sorted(counts.items(), key=lambda entry: -entry[1])  # stable, as heapq.nlargest
        wire = WireEncoder(NO_MODEL, batch.item_ids, batch.event_types)
        values = wire.encode_batch(batch.user_ids, batch.items, batch.scores, batch.because,
                                   batch.cold_start, [7] * len(batch), 9, [None] * len(batch))
        e = 0
        for user, before, new in wave:
            seen = set(before) if exclude_seen else set()
            for item in new:
                seen |= {item} if exclude_seen else set()
                want = [(i, float(c)) for i, c in top if i not in seen][:k]
                row = batch[e]
                assert (row.user_id, row.items, row.cold_start, row.unknown_item) == (
                    user, want, True, True)
                assert values[e] == encode_recommendation(Recommendation(
                    user, [ScoredItem(i, s) for i, s in want], NO_MODEL, 7, 9, [],
                    cold_start=True))
                e += 1
        assert e == len(batch)
