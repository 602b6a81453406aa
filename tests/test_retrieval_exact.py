"""Exact retrieval equals brute-force numpy, with every kind of exclusion; bad inputs are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvrec.model.gpu_retrieval import TorchExactRetriever, padded_exclusions
from kvrec.model.retrieval import Retriever, recall_at_k


def brute_force(items, queries, k, exclude=None, unavailable=()):
    scores = queries.astype(np.float64) @ items.T.astype(np.float64)
    scores[:, 0] = -np.inf
    scores[:, list(unavailable)] = -np.inf
    for row, banned in enumerate(exclude or []):
        scores[row, list(banned)] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    ids = np.where(np.isfinite(np.take_along_axis(scores, order, 1)), order, -1)
    return ids


@pytest.fixture(scope="module")
def catalog():
    rng = np.random.default_rng(7)
    items = rng.standard_normal((3001, 24)).astype(np.float32)
    items[0] = 10.0  # a padding row that would win every query if it were not masked
    queries = rng.standard_normal((64, 24)).astype(np.float32)
    exclude = [rng.choice(np.arange(1, 3001), size=rng.integers(0, 400), replace=False).tolist()
               for _ in range(64)]
    # make exclusion bite: most queries exclude some of their own true top-10
    truth = brute_force(items, queries, 10)
    for row in range(0, 64, 2):
        exclude[row] += truth[row, ::2].tolist()
    unavailable = set(rng.choice(np.arange(1, 3001), size=150, replace=False).tolist())
    unavailable |= set(truth[1::4, 0].tolist())
    return items, queries, exclude, unavailable


def make(kind, items):
    if kind == "torch-exact":
        return TorchExactRetriever(items, block=64)
    return Retriever(items, kind=kind)


KINDS = ["exact", "torch-exact"]


@pytest.mark.parametrize("kind", KINDS)
def test_exact_matches_brute_force(catalog, kind):
    items, queries, _, _ = catalog
    retriever = make(kind, items)
    found = retriever.search(queries, 10)
    assert np.array_equal(found.indices, brute_force(items, queries, 10))
    want = np.sort(queries @ items[1:].T, axis=1)[:, ::-1][:, :10]
    np.testing.assert_allclose(found.scores, want, rtol=1e-4, atol=1e-4)
    assert found.scores.dtype == np.float32 and found.indices.dtype == np.int64


@pytest.mark.parametrize("kind", KINDS)
def test_exact_with_exclusions_and_unavailable(catalog, kind):
    items, queries, exclude, unavailable = catalog
    retriever = make(kind, items)
    retriever.set_unavailable(unavailable)
    for k in (1, 10, 100):
        found = retriever.search(queries, k, exclude=exclude)
        assert np.array_equal(found.indices, brute_force(items, queries, k, exclude, unavailable))
        assert (np.diff(found.scores, axis=1) <= 1e-6).all()  # descending
    # the set can change at runtime: clearing it brings the items back
    retriever.set_unavailable([])
    found = retriever.search(queries, 10, exclude=exclude)
    assert np.array_equal(found.indices, brute_force(items, queries, 10, exclude))


@pytest.mark.parametrize("kind", [*KINDS, "ivfflat", "ivfpq", "hnsw"])
def test_fewer_than_k_remaining_pads_with_minus_one(kind):
    rng = np.random.default_rng(3)
    items = rng.standard_normal((41, 8)).astype(np.float32)
    retriever = make(kind, items) if kind in KINDS else Retriever(items, kind=kind, nlist=1)
    retriever.set_unavailable(range(1, 31))  # 10 items left
    queries = rng.standard_normal((3, 8)).astype(np.float32)
    exclude = [[31, 32], [], list(range(31, 41))]
    found = retriever.search(queries, 12, exclude=exclude)
    assert found.indices.shape == (3, 12)
    assert sorted(found.indices[0, :8]) == list(range(33, 41))
    assert (found.indices[0, 8:] == -1).all() and np.isneginf(found.scores[0, 8:]).all()
    assert sorted(found.indices[1, :10]) == list(range(31, 41))
    assert (found.indices[1, 10:] == -1).all()
    assert (found.indices[2] == -1).all()


def test_k_larger_than_catalog():
    items = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)
    found = Retriever(items, kind="exact").search(items[1:3], 10)
    assert sorted(found.indices[0, :5]) == [1, 2, 3, 4, 5]
    assert (found.indices[:, 5:] == -1).all()


@pytest.mark.parametrize("kind", KINDS)
def test_bad_inputs_are_value_errors(catalog, kind):
    items, queries, _, _ = catalog
    retriever = make(kind, items)
    with pytest.raises(ValueError, match=r"shape \[batch, 24\]"):
        retriever.search(queries[:, :10], 10)
    with pytest.raises(ValueError, match=r"shape \[batch, 24\]"):
        retriever.search(queries[0], 10)
    for bad_k in (0, -1, 2.5):
        with pytest.raises(ValueError, match="k must be a positive integer"):
            retriever.search(queries, bad_k)
    with pytest.raises(ValueError, match="NaN"):
        retriever.search(np.full((2, 24), np.nan, np.float32), 5)
    with pytest.raises(ValueError, match="2 lists for 64 queries"):
        retriever.search(queries, 5, exclude=[[1], [2]])
    with pytest.raises(ValueError, match=r"outside 1\.\.3000"):
        retriever.set_unavailable([0])
    with pytest.raises(ValueError, match=r"outside 1\.\.3000"):
        retriever.set_unavailable([3001])


def test_bad_construction_is_value_error():
    with pytest.raises(ValueError, match="unknown retrieval kind"):
        Retriever(np.zeros((10, 4), np.float32), kind="annoy")
    with pytest.raises(ValueError, match="row 0 = padding"):
        Retriever(np.zeros((1, 4), np.float32))
    with pytest.raises(ValueError, match="row 0 = padding"):
        TorchExactRetriever(np.zeros(5, np.float32))


def test_recall_at_k_counts_overlap():
    truth = np.array([[1, 2, 3], [4, 5, -1]])
    assert recall_at_k(np.array([[3, 2, 9], [5, 4, 7]]), truth) == pytest.approx(4 / 5)


@pytest.mark.parametrize("block", [16, 64])
def test_torch_block_pruning_is_exact(catalog, block):
    """Few blocks kept of many (the pruned path), with unavailable items and short windows."""
    items, queries, _, unavailable = catalog
    retriever = TorchExactRetriever(items, block=block)
    assert (10 + retriever.margin) * 2 <= retriever.items.shape[0] // block  # really pruning
    retriever.set_unavailable(unavailable)
    truth = brute_force(items, queries, 12, unavailable=unavailable)
    windows = [row[:2].tolist() for row in truth]  # exclude each query's best two
    found = retriever.search(queries, 10, exclude=windows)
    assert np.array_equal(found.indices, truth[:, 2:])
    _, ids = retriever.search_tensor(torch.from_numpy(queries), 10)
    assert np.array_equal(ids.numpy(), truth[:, :10])


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    n_items=st.integers(2, 300), n_queries=st.integers(1, 9), k=st.integers(1, 15),
    block=st.sampled_from([4, 16, 64]), seed=st.integers(0, 2**16),
    exclusion_share=st.floats(0.0, 1.0),
)
def test_exclusions_on_the_device_match_brute_force_for_any_shape(
    n_items, n_queries, k, block, seed, exclusion_share
):
    """`search_excluding` filters on the device and returns only k per query: the same ids as
    brute force for any catalog, k, block and exclusion list (rows longer than the catalog,
    rows that leave fewer than k items, empty rows)."""
    rng = np.random.default_rng(seed)
    items = rng.standard_normal((n_items + 1, 8)).astype(np.float32)
    queries = rng.standard_normal((n_queries, 8)).astype(np.float32)
    exclude = [
        rng.choice(np.arange(1, n_items + 1), size=int(rng.binomial(n_items, exclusion_share)),
                   replace=False).tolist()
        for _ in range(n_queries)
    ]
    retriever = TorchExactRetriever(items, block=block)
    found = retriever.search(queries, k, exclude=exclude)
    assert found.indices.shape == (n_queries, k) and found.scores.shape == (n_queries, k)
    truth = brute_force(items, queries, k, exclude)  # k > the catalog: as many as there are
    truth = np.pad(truth, ((0, 0), (0, k - truth.shape[1])), constant_values=-1)
    assert np.array_equal(found.indices, truth)
    assert np.isneginf(found.scores[found.indices == -1]).all()
    assert np.isfinite(found.scores[found.indices != -1]).all()


def test_padded_exclusions_keep_each_row_and_pad_with_minus_one():
    out = padded_exclusions([[3, 1], [], [7, 8, 9]], 3)
    assert out.tolist() == [[3, 1, -1], [-1, -1, -1], [7, 8, 9]]
    assert padded_exclusions([[], []], 2).shape == (2, 0)
    with pytest.raises(ValueError, match="1 lists for 2 queries"):
        padded_exclusions([[1]], 2)
