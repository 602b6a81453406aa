"""The key/value cache pool (state/kvpool.py) and the worker's inference on it: slot-indexed
`extend_into`/`encode_into` equal the per-user calls, recommendations equal the full
sliding-window pass whatever the pool's size (eviction, refill, forget, swap), and the pool never
holds more than its budget."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvrec.model.artifact import Artifact
from kvrec.model.backends import make_backend
from kvrec.model.config import BLOCKS, ModelConfig
from kvrec.model.encoder import Encoder, KVCache
from kvrec.model.retrieval import Exclusions, Retriever
from kvrec.state.kvpool import ARRAY_HEADER_BYTES, KNOWN_EVENT_BYTES, KVPool, budget_for
from kvrec.state.window import Window, WindowEvent
from kvrec.stream.worker.inference import Recommender, WaveInput
from tests.worker_fixtures import make_artifact
from tests.worker_reference import (
    ReferenceEvent,
    assert_matches_reference,
    assert_same_ranking,
    reference_recommendations,
)

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Artifact]:
    root = tmp_path_factory.mktemp("kvpool")
    return {
        "a": make_artifact(root / "a", layers=2, window=4, seed=1),
        "b": make_artifact(root / "b", layers=3, window=5, seed=2),
    }


def per_user_bytes(config: ModelConfig, known_per_user: int | None = None) -> int:
    """What one slot costs against the budget (slabs and the known-events reserve), counted
    here independently of `budget_for`."""
    slab = 4 * (2 * config.n_layers * config.n_heads * config.window * config.head_dim
                + config.d_model) + 8
    return slab + ARRAY_HEADER_BYTES + KNOWN_EVENT_BYTES * (known_per_user or config.history_needed)


def recommender_for(artifact: Artifact, slots: int, *, backend: str = "torch-cpu",
                    known_per_user: int | None = None, **kwargs) -> Recommender:
    vectors = artifact.encoder.item_embeddings().detach().float().cpu().numpy()
    made = make_backend(backend, artifact.encoder, **kwargs)
    budget = slots * per_user_bytes(artifact.config, known_per_user)
    pool = KVPool(artifact.config, budget, device=made.device, known_per_user=known_per_user)
    assert pool.slots == slots and budget == budget_for(artifact.config, slots, known_per_user)
    return Recommender(artifact, made, Retriever(np.ascontiguousarray(vectors), kind="exact"),
                       pool, k=5)


def stream(n_users: int, n_events: int, seed: int, unknown_share: float = 0.0
           ) -> list[ReferenceEvent]:
    """Random events; `unknown_share` of them of items the model does not know. A refill is
    exact when the stored window holds the N*(W-1)+1 known events it needs, so unknown items go
    only where no refill happens after the first wave (enough slots, nothing forgotten)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n_events):
        item = f"sku-{rng.randint(1, 60)}" if rng.random() >= unknown_share else f"new-{rng.randint(1, 3)}"
        out.append(ReferenceEvent(f"user-{rng.randrange(n_users)}", item, rng.randint(1, 4)))
    return out


class Feeder:
    """The worker's waves over a stream: windows per user, at most `per_user` events of a user
    per wave; `between` runs after every wave (checks, forget, swap)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.windows: dict[str, Window] = {}

    def run(self, recommender: Recommender, events: list[ReferenceEvent], wave_size: int,
            per_user: int, between: Callable[[Recommender], None] | None = None,
            start_offset: int = 0) -> list:
        got: list = []
        per_user = min(per_user, recommender.max_events_per_user)  # what the worker's waves hold

        def flush(wave: dict[str, WaveInput]) -> None:
            results, _ = recommender.recommend(list(wave.values()))
            offsets = [event.offset for user in wave.values() for event in user.events]
            got.extend(r for _, r in sorted(zip(offsets, results, strict=True), key=lambda p: p[0]))
            wave.clear()
            if between is not None:
                between(recommender)

        for start in range(0, len(events), wave_size):
            wave: dict[str, WaveInput] = {}
            for offset, e in enumerate(events[start : start + wave_size], start=start_offset + start):
                if e.user_id in wave and len(wave[e.user_id].events) >= per_user:
                    flush(wave)
                window = self.windows.setdefault(e.user_id, Window(self.capacity))
                if e.user_id not in wave:
                    wave[e.user_id] = WaveInput(e.user_id, list(window.events), [], self.capacity,
                                                window.total_events - len(window.events))
                event = WindowEvent(e.item_id, e.event_type, 1_000 + offset, offset)
                window.apply(event)
                wave[e.user_id].events.append(event)
            if wave:
                flush(wave)
        return got


def within_budget(recommender: Recommender) -> None:
    pool = recommender.cache
    assert pool.allocated_bytes <= pool.max_bytes
    assert pool.bytes_used <= pool.allocated_bytes
    assert len(pool) <= pool.slots


def run_and_match_reference(artifact: Artifact, recommender: Recommender, events: list,
                            capacity: int, wave_size: int, per_user: int) -> None:
    """Feed `events` in waves, checking the budget after each; every recommendation must equal
    the full pass's (tests/worker_reference.py)."""
    got = Feeder(capacity).run(recommender, events, wave_size, per_user, between=within_budget)
    assert_matches_reference(got, events, artifact, capacity)


# --- the pool's bookkeeping --------------------------------------------------------------------
def test_pool_sizes_its_slots_from_the_budget_and_says_when_none_fits() -> None:
    config = ModelConfig(n_items=10, n_event_types=2, d_model=16, n_layers=2, n_heads=2, window=4)
    one = per_user_bytes(config)
    pool = KVPool(config, 3 * one + one - 1)
    assert pool.slots == 3
    assert pool.kv.keys.shape == (2, 3, 2, 4, 8)
    assert pool.vectors.shape == (3, 16)
    expected = 3 * (2 * 2 * 2 * 4 * 8 * 4 + 8 + 16 * 4)
    assert pool.allocated_bytes == expected <= pool.max_bytes
    with pytest.raises(ValueError, match="holds no user"):
        KVPool(config, one - 1)


def test_pool_lru_lookup_assign_store_discard() -> None:
    config = ModelConfig(n_items=10, n_event_types=2, d_model=16, n_layers=1, n_heads=2, window=3)
    pool = KVPool(config, 2 * per_user_bytes(config))
    known = np.zeros((4, 2), dtype=np.int64)
    slots = pool.assign(["a", "b"])
    assert sorted(slots.tolist()) == [0, 1]
    assert pool.lookup(["a", "b"], [5, 6]).tolist() == [-1, -1]  # assigned, not yet valid
    pool.store(slots, [5, 6], [known.copy(), known.copy()])
    assert pool.lookup(["a", "b", "c"], [5, 7, 1]).tolist() == [slots[0], -1, -1]  # b is stale
    assert (pool.stats.hits, pool.stats.misses) == (1, 4)
    assert pool.assign(["b"]).tolist() == [slots[1]]  # a stale user keeps its slot
    (c,) = pool.assign(["c"]).tolist()  # a was used before b: a goes
    assert c == slots[0] and "a" not in pool and pool.stats.evictions == 1
    with pytest.raises(ValueError):
        pool.assign(["x", "y", "z"])
    pool.discard(["b", "nobody"])
    assert len(pool) == 1 and pool.known_bytes == 0  # b's known events went with it
    pool.clear()
    assert len(pool) == 0 and pool.bytes_used == 0


def test_known_events_past_their_reserve_evict_instead_of_exceeding_the_budget() -> None:
    config = ModelConfig(n_items=10, n_event_types=2, d_model=16, n_layers=1, n_heads=2, window=3)
    pool = KVPool(config, 4 * per_user_bytes(config, 2), known_per_user=2)
    slots = pool.assign(["a", "b", "c", "d"])
    pool.store(slots, [1, 1, 1, 1], [np.zeros((4, 2), dtype=np.int64)] * 4)
    assert pool.allocated_bytes <= pool.max_bytes and len(pool) == 4
    pool.store(slots[3:], [1], [np.zeros((4, 9), dtype=np.int64)])  # d's window outgrew it
    assert pool.allocated_bytes <= pool.max_bytes
    assert "a" not in pool and "d" in pool  # least recently used first


# --- slot-indexed model calls ------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(
    layers=st.integers(1, 3), window=st.integers(1, 5), users=st.integers(1, 5),
    extra_slots=st.integers(0, 4), history=st.lists(st.integers(0, 12), min_size=5, max_size=5),
    new=st.lists(st.integers(1, 5), min_size=5, max_size=5), seed=st.integers(0, 2**16),
    block=st.sampled_from(BLOCKS),
)
def test_extend_into_equals_extend_of_each_users_cache(
    layers, window, users, extra_slots, history, new, seed, block
) -> None:
    torch.manual_seed(seed)
    config = ModelConfig(n_items=30, n_event_types=3, d_model=16, n_layers=layers, n_heads=2,
                         window=window, dropout=0.0, block=block)
    encoder = Encoder(config).eval()
    rng = np.random.default_rng(seed)
    pool = KVPool(config, (users + extra_slots) * per_user_bytes(config))
    slots = torch.from_numpy(rng.permutation(pool.slots)[:users])
    lengths = [history[u] for u in range(users)]
    counts = torch.tensor([min(new[u], window) for u in range(users)])
    caches = []
    with torch.inference_mode():
        pool.clear_slots(torch.arange(pool.slots))
        for u in range(users):  # each user's own cache: empty, or encoded from its history
            if lengths[u]:
                items = torch.from_numpy(rng.integers(1, 31, (1, lengths[u])))
                types = torch.from_numpy(rng.integers(1, 4, (1, lengths[u])))
                encoder.encode_into(pool.kv, pool.vectors, slots[u : u + 1], items, types)
                caches.append(encoder.encode(items, types)[1])
            else:
                caches.append(KVCache.empty(config, 1))
        width = int(counts.max())
        items = torch.from_numpy(rng.integers(1, 31, (users, width)))
        types = torch.from_numpy(rng.integers(1, 4, (users, width)))
        untouched = [s for s in range(pool.slots) if s not in slots.tolist()]
        before = pool.kv.keys[:, untouched].clone()
        got, got_attention = encoder.extend_into(pool.kv, pool.vectors, slots, items, types,
                                                 counts, return_attention=True)
        want, want_cache, want_attention = encoder.extend(KVCache.cat(caches), items, types,
                                                          counts, return_attention=True)
    real = torch.arange(width).view(1, -1) < counts.view(-1, 1)
    torch.testing.assert_close(got[real], want[real])
    torch.testing.assert_close(got_attention[real], want_attention[real])
    torch.testing.assert_close(pool.kv.keys[:, slots], want_cache.keys)
    torch.testing.assert_close(pool.kv.values[:, slots], want_cache.values)
    assert pool.kv.positions[slots].tolist() == want_cache.positions.tolist()
    torch.testing.assert_close(pool.vectors[slots], want[torch.arange(users), counts - 1])
    torch.testing.assert_close(pool.kv.keys[:, untouched], before, rtol=0, atol=0)  # as they were


# --- the recommender on the pool ---------------------------------------------------------------
@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    which=st.sampled_from(["a", "b"]), n_users=st.integers(1, 9), n_events=st.integers(1, 90),
    slots=st.integers(1, 6), wave_size=st.integers(1, 40), per_user=st.integers(1, 5),
    unknown=st.sampled_from([0.0, 0.2]), seed=st.integers(0, 2**16),
)
def test_pool_recommendations_equal_the_full_pass_whatever_the_pool_size(
    artifacts, which, n_users, n_events, slots, wave_size, per_user, unknown, seed
) -> None:
    artifact = artifacts[which]
    capacity = artifact.config.history_needed
    events = stream(n_users, n_events, seed, unknown if slots >= n_users else 0.0)
    recommender = recommender_for(artifact, slots)
    run_and_match_reference(artifact, recommender, events, capacity, wave_size, per_user)
    if n_users > slots and n_events > 3 * n_users:  # more users than slots: eviction ran
        assert recommender.cache.stats.evictions > 0


def test_an_evicted_user_refills_exactly(artifacts) -> None:
    artifact = artifacts["a"]
    capacity = artifact.config.history_needed
    events = stream(n_users=8, n_events=200, seed=3)
    recommender = recommender_for(artifact, slots=2)
    run_and_match_reference(artifact, recommender, events, capacity, wave_size=5, per_user=2)
    stats = recommender.cache.stats
    assert stats.evictions > 20 and stats.misses > 20 and stats.hits > 0


def test_known_events_larger_than_the_reserve_stay_exact_and_within_budget(artifacts) -> None:
    artifact = artifacts["a"]
    capacity = 3 * artifact.config.history_needed  # windows hold more than the pool reserved
    events = stream(n_users=5, n_events=160, seed=4)
    recommender = recommender_for(artifact, slots=4, known_per_user=2)
    run_and_match_reference(artifact, recommender, events, capacity, wave_size=6, per_user=3)
    assert recommender.cache.stats.evictions > 0


def test_a_user_that_leaves_and_comes_back_refills_exactly(artifacts) -> None:
    artifact = artifacts["b"]
    capacity = artifact.config.history_needed
    events = stream(n_users=4, n_events=150, seed=5)
    recommender = recommender_for(artifact, slots=8)
    feeder = Feeder(capacity)
    waves = 0

    def rebalance(r: Recommender) -> None:  # user-1's partition moves away and back
        nonlocal waves
        waves += 1
        if waves % 4 == 0:
            r.forget(["user-1"])

    got = feeder.run(recommender, events, wave_size=7, per_user=2, between=rebalance)
    assert_matches_reference(got, events, artifact, capacity)
    assert recommender.cache.stats.misses > 4  # the forgotten user missed and refilled


def test_versions_never_share_a_pool_across_a_swap(artifacts) -> None:
    """Model a serves, b is pre-warmed from the same windows and takes over: each answers as
    its own full pass, and neither pool is touched by the other's waves."""
    a, b = artifacts["a"], artifacts["b"]
    capacity = max(a.config.history_needed, b.config.history_needed)
    events = stream(n_users=5, n_events=160, seed=6)
    first, second = events[:80], events[80:]
    serving = recommender_for(a, slots=8)
    feeder = Feeder(capacity)
    got_a = feeder.run(serving, first, wave_size=9, per_user=2)
    assert_matches_reference(got_a, first, a, capacity)
    candidate = recommender_for(b, slots=8)
    warmed = candidate.prewarm([(u, w.snapshot()) for u, w in feeder.windows.items()])
    assert warmed == len(candidate.cache) > 0
    a_keys = serving.cache.kv.keys.clone()
    got_b = feeder.run(candidate, second, wave_size=9, per_user=2, start_offset=len(first))
    assert candidate.cache.stats.hits > 0 and candidate.cache.stats.misses == 0  # pre-warmed
    # unused slots hold whatever memory held (never read): NaN there equals NaN
    torch.testing.assert_close(serving.cache.kv.keys, a_keys, rtol=0, atol=0, equal_nan=True)
    want_b = reference_recommendations(b, events, k=5, window_capacity=capacity)[len(first):]
    for g, w in zip(got_b, want_b, strict=True):
        assert g.cold_start == w.cold_start
        if not w.cold_start:
            assert_same_ranking([i for i, _ in g.items], [s for _, s in g.items], w)


def test_a_wave_of_more_users_than_slots_runs_in_parts(artifacts) -> None:
    artifact = artifacts["a"]
    capacity = artifact.config.history_needed
    events = stream(n_users=12, n_events=120, seed=8)
    recommender = recommender_for(artifact, slots=3)
    run_and_match_reference(artifact, recommender, events, capacity, wave_size=60, per_user=4)


def test_onnx_backend_on_a_host_pool(artifacts, tmp_path: Path) -> None:
    from kvrec.model.export import export_step

    artifact = artifacts["a"]
    capacity = artifact.config.history_needed
    onnx = export_step(artifact.encoder, tmp_path / "step.onnx")
    events = stream(n_users=5, n_events=100, seed=9)
    recommender = recommender_for(artifact, slots=3, backend="onnx-cpu", onnx_path=onnx)
    assert recommender.cache.device.type == "cpu"
    got = Feeder(capacity).run(recommender, events, wave_size=8, per_user=3)
    assert_matches_reference(got, events, artifact, capacity)


@CUDA
def test_cuda_pool_stays_on_the_device_and_equals_the_full_pass(artifacts) -> None:
    artifact = artifacts["b"]
    capacity = artifact.config.history_needed
    events = stream(n_users=6, n_events=150, seed=10)
    recommender = recommender_for(artifact, slots=4, backend="torch-cuda")
    assert recommender.cache.kv.keys.is_cuda and recommender.cache.vectors.is_cuda
    got = Feeder(capacity).run(recommender, events, wave_size=10, per_user=3,
                               between=within_budget)
    assert_matches_reference(got, events, artifact, capacity)


# --- exclusions as CSR -------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.integers(-2, 25), max_size=6), min_size=1, max_size=8))
def test_csr_exclusions_equal_list_exclusions(lists: list[list[int]]) -> None:
    offsets = np.zeros(len(lists) + 1, dtype=np.int64)
    np.cumsum([len(x) for x in lists], out=offsets[1:])
    flat = np.array([i for x in lists for i in x], dtype=np.int64)
    csr = Exclusions.from_csr(offsets, flat, 21)
    listed = Exclusions(lists, len(lists), 21)
    for name in ("lengths", "rows", "items", "keys"):
        assert np.array_equal(getattr(csr, name), getattr(listed, name))
    assert csr.max_length == listed.max_length
    queries = np.random.default_rng(len(flat)).normal(size=(len(lists), 4)).astype(np.float32)
    retriever = Retriever(np.random.default_rng(1).normal(size=(21, 4)).astype(np.float32),
                          kind="exact")
    by_csr, by_list = retriever.search(queries, 5, csr), retriever.search(queries, 5, lists)
    assert np.array_equal(by_csr.indices, by_list.indices)
    with pytest.raises(ValueError):
        Exclusions.from_csr(np.array([0, 3]), flat[:2], 21)


def test_a_wave_that_fails_halfway_leaves_no_slot_that_looks_valid(artifacts) -> None:
    """The model wrote the users' slots, then the wave failed: retried as it was, without a
    `forget`, it must refill, not continue from the half-advanced slots."""
    artifact = artifacts["a"]
    capacity = artifact.config.history_needed
    events = stream(n_users=3, n_events=40, seed=11)
    feeder = Feeder(capacity)
    recommender = recommender_for(artifact, slots=4)
    feeder.run(recommender, events, wave_size=6, per_user=2)
    wave = [WaveInput(user, list(window.events), [WindowEvent("sku-7", 2, 9_999, 1_000 + n)],
                      capacity, window.total_events - len(window.events))
            for n, (user, window) in enumerate(feeder.windows.items())]
    real = recommender.backend.extend_into

    def fails_after_writing(*args, **kwargs):
        real(*args, **kwargs)
        raise RuntimeError("after the write")

    recommender.backend.extend_into = fails_after_writing
    with pytest.raises(RuntimeError):
        recommender.recommend(wave)
    recommender.backend.extend_into = real
    retried, counters = recommender.recommend(wave)
    assert counters.cache_misses == len(wave) and counters.cache_hits == 0
    fresh = recommender_for(artifact, slots=4)
    want, _ = fresh.recommend(wave)
    assert [r.items for r in retried] == [r.items for r in want]
