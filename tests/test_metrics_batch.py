"""Metrics observed once per batch (`observe_many`) are the metrics observed one by one."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram

from kvrec.stream.worker.metrics import LATENCY_BUCKETS, observe_many

# the bounds themselves and their neighbours: where a bucket boundary could be off by one
_EDGES = [x for b in LATENCY_BUCKETS for x in (b, np.nextafter(b, 0.0), np.nextafter(b, 20.0))]


def _samples(histogram: Histogram) -> dict[str, float]:
    return {f"{s.name}{s.labels}": s.value for s in histogram.collect()[0].samples}


@given(st.lists(st.one_of(st.sampled_from(_EDGES), st.floats(0.0, 30.0)), max_size=60),
       st.lists(st.floats(0.0, 30.0), max_size=5))
def test_observe_many_counts_what_observe_counts(amounts: list[float], before: list[float]) -> None:
    registry = CollectorRegistry()
    one = Histogram("one", "one by one", buckets=LATENCY_BUCKETS, registry=registry)
    many = Histogram("many", "once per batch", buckets=LATENCY_BUCKETS, registry=registry)
    for amount in before:  # observations already there add up
        one.observe(amount)
        many.observe(amount)
    for amount in amounts:
        one.observe(amount)
    observe_many(many, np.asarray(amounts, dtype=np.float64))
    got, want = _samples(many), _samples(one)
    assert [v for k, v in got.items() if "_bucket" in k] == [
        v for k, v in want.items() if "_bucket" in k]
    assert np.isclose(got["many_sum{}"], want["one_sum{}"], rtol=1e-12, atol=1e-12)
