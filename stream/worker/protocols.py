"""The seams of the serving path, declared: what a recommender and a retriever are.

`WaveRecommender`: a wave of users' new events in (`WaveInput`, one per user), one
`ScoredBatch` out: the one result shape, columns of item indices into the batch's own
`item_ids`, one entry per event; with the counters of the call. Two implement it: the model's
`Recommender` (stream/worker/inference.py) and, while no model serves, `PopularRecommender`
(stream/worker/cold_start.py). The loop, the live hit counters, the shadow and the watcher hold
one as this protocol, never asking which it is.

`ItemRetriever`: top-k by inner product over the catalog's item vectors (row 0 = padding), a
`SearchResult` per call: faiss (model/retrieval.py `Retriever`) or exact in torch
(model/gpu_retrieval.py `TorchExactRetriever`), as stream/lifecycle/loading.py
`build_retriever` makes one for `--retrieval`.

Only names: nothing here is imported at run time but `typing`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import numpy as np

    from kvrec.model.retrieval import ExcludeArg, SearchResult
    from kvrec.stream.worker.inference import RecommendCounters, ScoredBatch, WaveInput


class CacheUsage(Protocol):
    """What the worker's metrics read of a recommender's cache."""

    @property
    def bytes_used(self) -> int: ...


class WaveRecommender(Protocol):
    @property
    def version(self) -> str: ...

    @property
    def max_events_per_user(self) -> int:
        """The most events of one user a wave holds (the loop cuts waves to it)."""
        ...

    @property
    def cache(self) -> CacheUsage: ...

    def recommend(self, wave: Sequence[WaveInput]) -> tuple[ScoredBatch, RecommendCounters]:
        """One recommendation per event: users in the wave's order, each user's in order."""
        ...

    def forget(self, user_ids: Iterable[str]) -> None:
        """Drop what is kept of these users (after a failed wave): the next one starts over."""
        ...


class ItemRetriever(Protocol):
    @property
    def n_rows(self) -> int:
        """Catalog rows, padding included (item indices run 1..n_rows - 1)."""
        ...

    @property
    def build_report(self) -> Mapping[str, object]:
        """How the index was built (kind, settings, measured recall): logged and benchmarked."""
        ...

    def search(self, queries: np.ndarray, k: int, exclude: ExcludeArg = None) -> SearchResult:
        """Top-k per query, best first, never padding, unavailable or excluded items."""
        ...

    def set_unavailable(self, items: Iterable[int]) -> None:
        """Replace the set of items never to return."""
        ...
