"""Live hits counted on a `ScoredBatch`'s item indices are the hits counted on its item ids."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from kvrec.state.window import WindowEvent
from kvrec.stream.worker.inference import ScoredBatch, WaveInput
from kvrec.stream.worker.live import SERVE, LiveHits

ITEM_IDS = ["", *(f"sku-{i}" for i in range(1, 9))]
INDEX = {item: i for i, item in enumerate(ITEM_IDS) if i > 0}
_waves = st.lists(  # waves of (user, [(event item id, its list as indices)])
    st.lists(st.tuples(st.sampled_from("abc"),
                       st.lists(st.tuples(st.sampled_from([*ITEM_IDS[1:], "new-item"]),
                                          st.lists(st.integers(1, 8), max_size=4, unique=True)),
                                min_size=1, max_size=3)),
             max_size=4, unique_by=lambda user: user[0]),
    max_size=6)


@given(_waves, st.integers(1, 3))
def test_hits_on_indices_are_hits_on_ids(waves, max_users: int) -> None:
    by_index, by_id = LiveHits(SERVE, max_users), LiveHits(SERVE, max_users)
    for n, wave in enumerate(waves):
        inputs = [WaveInput(user, [], [WindowEvent(item, 1, 0, 0) for item, _ in events], 10, 0)
                  for user, events in wave]
        batch = ScoredBatch(ITEM_IDS, ["view"], INDEX)
        for user, events in wave:
            for _, row in events:
                batch.user_ids.append(user)
                batch.items.append(row)
                batch.scores.append([1.0] * len(row))
                batch.because.append([])
                batch.cold_start.append(False)
                batch.unknown_item.append(False)
        version = f"v{n % 2}"
        by_index.observe(inputs, batch, version)
        by_id.observe(inputs, list(batch), version)  # `Scored` objects: ids as strings
        assert by_index.snapshot() == by_id.snapshot()
        assert list(by_index.last) == list(by_id.last)
