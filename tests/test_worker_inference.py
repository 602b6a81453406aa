"""The worker's inference path without Kafka: cache hits, refills and the offline reference."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from kvrec.model.backends import make_backend
from kvrec.model.retrieval import Retriever
from kvrec.state.window import Window, WindowEvent
from kvrec.stream.worker.inference import Recommender, WaveInput
from tests.worker_fixtures import make_artifact
from tests.worker_reference import (
    ReferenceEvent,
    assert_matches_reference,
    assert_same_ranking,
    reference_recommendations,
)


def _recommender(artifact, cache_bytes: int = 1 << 26, reuse_cache: bool = True) -> Recommender:
    vectors = artifact.encoder.item_embeddings().detach().float().numpy()
    return Recommender(
        artifact,
        make_backend("torch-cpu", artifact.encoder),
        Retriever(np.ascontiguousarray(vectors), kind="exact"),
        cache_bytes,
        k=5,
        reuse_cache=reuse_cache,
    )


def _stream(n_users: int, n_events: int, n_items: int, seed: int, unknown_share: float = 0.0):
    rng = random.Random(seed)
    for _ in range(n_events):
        item = f"sku-{rng.randint(1, n_items)}"
        if rng.random() < unknown_share:
            item = f"new-{rng.randint(1, 5)}"
        yield ReferenceEvent(f"user-{rng.randrange(n_users)}", item, rng.randint(1, 4))


def _run(recommender: Recommender, events, capacity: int, wave_size: int, drop_cache_every=0,
         per_user: int = 1):
    """Feed `events` in waves of `wave_size`, at most `per_user` events of a user per wave (a
    user's next one starts a new wave), as the worker does."""
    windows: dict[str, Window] = {}
    got = []

    def flush(wave: dict[str, WaveInput]) -> None:
        results, _ = recommender.recommend(list(wave.values()))  # by user, then by event
        offsets = [event.offset for user in wave.values() for event in user.events]
        got.extend(result for _, result in sorted(zip(offsets, results, strict=True),
                                                  key=lambda pair: pair[0]))
        wave.clear()

    for start in range(0, len(events), wave_size):
        wave: dict[str, WaveInput] = {}
        for offset, e in enumerate(events[start : start + wave_size], start=start):
            if e.user_id in wave and len(wave[e.user_id].events) >= per_user:
                flush(wave)
            window = windows.setdefault(e.user_id, Window(capacity))
            if e.user_id not in wave:
                wave[e.user_id] = WaveInput(e.user_id, list(window.events), [], capacity,
                                            window.total_events - len(window.events))
            event = WindowEvent(e.item_id, e.event_type, 1_000 + offset, offset)
            window.apply(event)
            wave[e.user_id].events.append(event)
        flush(wave)
        if drop_cache_every and (start // wave_size) % drop_cache_every == 0:
            recommender.cache.clear()
    return got


@pytest.mark.parametrize(
    ("layers", "window", "wave_size", "unknown", "per_user", "drop"),
    [(2, 4, 1, 0.0, 1, 0), (2, 4, 7, 0.0, 1, 0), (3, 4, 5, 0.1, 1, 0), (2, 4, 30, 0.0, 4, 0),
     (2, 4, 30, 0.2, 4, 2), (3, 4, 50, 0.3, 3, 1), (2, 5, 60, 0.0, 5, 0)],
)
def test_worker_matches_full_forward_reference(
    tmp_path: Path, layers, window, wave_size, unknown, per_user, drop
) -> None:
    artifact = make_artifact(tmp_path / "model", layers=layers, window=window)
    capacity = artifact.config.history_needed
    events = list(_stream(n_users=6, n_events=150, n_items=60, seed=layers, unknown_share=unknown))
    recommender = _recommender(artifact)
    extend_calls = []
    real_extend = recommender.backend.extend_into

    def counted_extend(*args, **kwargs):
        extend_calls.append(args[3].shape)  # items [B, T]
        return real_extend(*args, **kwargs)

    recommender.backend.extend_into = counted_extend
    got = _run(recommender, events, capacity, wave_size, drop_cache_every=drop, per_user=per_user)
    # several events of a user in one pass (T > 1) only where a wave may hold several
    assert any(shape[1] > 1 for shape in extend_calls) == (per_user > 1)
    assert_matches_reference(got, events, artifact, capacity)


def test_recommendations_same_with_warm_or_refilled_cache(tmp_path: Path) -> None:
    artifact = make_artifact(tmp_path / "model", layers=2, window=5)
    capacity = artifact.config.history_needed
    events = list(_stream(n_users=4, n_events=120, n_items=60, seed=7))
    warm_recommender = _recommender(artifact)
    warm = _run(warm_recommender, events, capacity, wave_size=3)
    # every user's next wave continues from its cache (misses: each user's first wave only)
    assert warm_recommender.cache.stats.misses <= 4 < warm_recommender.cache.stats.hits
    refilled_recommender = _recommender(artifact)
    refilled = _run(refilled_recommender, events, capacity, wave_size=9, drop_cache_every=1,
                    per_user=3)
    assert refilled_recommender.cache.stats.misses > 20  # the refill path really ran
    for a, b in zip(warm, refilled, strict=True):
        assert [i for i, _ in a.items] == [i for i, _ in b.items]
        np.testing.assert_allclose([s for _, s in a.items], [s for _, s in b.items], atol=1e-4)


def test_because_names_recent_window_events(tmp_path: Path) -> None:
    artifact = make_artifact(tmp_path / "model", layers=2, window=4)
    events = list(_stream(n_users=1, n_events=10, n_items=60, seed=3))
    got = _run(_recommender(artifact), events, artifact.config.history_needed, wave_size=1)
    last = got[-1]
    assert 1 <= len(last.because) <= 3
    recent = {e.item_id for e in events[-4:]}
    assert all(b.item_id in recent for b in last.because)
    assert all(b.event_type in ("view", "click", "add_to_cart", "purchase") for b in last.because)


def test_cold_start_user_gets_popular_items(tmp_path: Path) -> None:
    artifact = make_artifact(tmp_path / "model")
    recommender = _recommender(artifact)
    window = Window(artifact.config.history_needed)
    event = WindowEvent("brand-new-item", 1, 1, 0)
    window.apply(event)
    (result,), _ = recommender.recommend([WaveInput("u", [], [event], window.capacity, 0)])
    assert result.cold_start and result.unknown_item
    assert [i for i, _ in result.items] == ["sku-1", "sku-2", "sku-3", "sku-4", "sku-5"]


def test_no_cache_baseline_gives_the_same_answers_by_re_encoding(tmp_path: Path) -> None:
    artifact = make_artifact(tmp_path / "model", layers=2, window=4)
    capacity = artifact.config.history_needed
    events = list(_stream(n_users=5, n_events=100, n_items=60, seed=11, unknown_share=0.1))
    baseline = _recommender(artifact, reuse_cache=False)
    assert baseline.max_events_per_user == 1
    encodes = []
    real_encode = baseline.backend.encode_into
    baseline.backend.encode_into = lambda *a: encodes.append(1) or real_encode(*a)
    got = _run(baseline, events, capacity, wave_size=20)
    assert len(baseline.cache) == 0
    assert len(encodes) >= 20  # a re-encode in every wave
    want = reference_recommendations(artifact, events, k=5, window_capacity=capacity)
    for g, w in zip(got, want, strict=True):
        assert g.cold_start == w.cold_start
        if not w.cold_start:
            assert_same_ranking([i for i, _ in g.items], [s for _, s in g.items], w)
