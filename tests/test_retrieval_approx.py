"""Approximate indexes on a clustered catalog: recall@10 >= 0.95 and exact exclusions."""

from __future__ import annotations

import numpy as np
import pytest

from kvrec.bench.retrieval import bench_queries, clustered_catalog
from kvrec.model.retrieval import Retriever, recall_at_k

N_ITEMS = 20_000


@pytest.fixture(scope="module")
def catalog():
    items = clustered_catalog(N_ITEMS, 32, seed=5)
    queries, windows = bench_queries(items, 300, 60, seed=11)
    return items, queries, windows


@pytest.fixture(scope="module")
def exact(catalog):
    return Retriever(catalog[0], kind="exact")


@pytest.fixture(scope="module", params=["ivfflat", "ivfpq", "hnsw"])
def approximate(request, catalog):
    return Retriever(catalog[0], kind=request.param)


def test_build_report_describes_the_index(approximate):
    report = approximate.build_report
    assert report["kind"] == approximate.kind
    assert report["items"] == N_ITEMS
    assert report["recall@10"] >= 0.96 and report["meets_target"]
    assert report["build_seconds"] > 0 and report["recall_queries"] > 0
    tuned = {"hnsw": "efSearch", "ivfflat": "nprobe", "ivfpq": "k_factor"}[approximate.kind]
    assert tuned in report


def test_recall_against_exact_on_fresh_queries(catalog, exact, approximate):
    _, queries, windows = catalog
    truth = exact.search(queries, 10).indices
    assert recall_at_k(approximate.search(queries, 10).indices, truth) >= 0.95
    truth = exact.search(queries, 10, exclude=windows).indices
    found = approximate.search(queries, 10, exclude=windows)
    assert recall_at_k(found.indices, truth) >= 0.95


def test_exclusions_are_exact_and_k_is_filled(catalog, approximate):
    items, queries, windows = catalog
    rng = np.random.default_rng(2)
    unavailable = set(rng.integers(1, N_ITEMS + 1, 2_000).tolist())
    approximate.set_unavailable(unavailable)
    try:
        found = approximate.search(queries, 20, exclude=windows)
    finally:
        approximate.set_unavailable([])
    assert (found.indices >= 1).all()  # never padding, always k items here
    for row, window in enumerate(windows):
        assert not set(found.indices[row].tolist()) & (set(window) | unavailable)
        assert len(set(found.indices[row].tolist())) == 20
    assert (np.diff(found.scores, axis=1) <= 1e-5).all()
    scores = np.einsum("bd,bkd->bk", queries, items[found.indices])
    np.testing.assert_allclose(found.scores, scores, rtol=1e-3, atol=1e-3)


def test_auto_picks_by_threshold(catalog):
    items = catalog[0]
    assert Retriever(items[:1001], kind="auto", approx_threshold=50_000).kind == "exact"
    assert Retriever(items, kind="auto", approx_threshold=10_000).kind == "ivfpq"


def test_fixed_search_setting_is_used_and_measured(catalog):
    retriever = Retriever(catalog[0], kind="ivfflat", nprobe=1)
    assert retriever.build_report["nprobe"] == 1
    assert retriever.build_report["settings_tried"] == 1
    assert 0.0 < retriever.build_report["recall@10"] < 1.0


def test_sample_queries_are_used_for_tuning(catalog):
    items, queries, _ = catalog
    retriever = Retriever(items, kind="hnsw", sample_queries=queries[:100])
    assert retriever.build_report["recall_queries"] == 100
    with pytest.raises(ValueError, match=r"shape \[batch, 32\]"):
        Retriever(items[:2000], kind="hnsw", sample_queries=queries[:, :5])
