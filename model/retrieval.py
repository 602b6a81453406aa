"""Top-k items by inner product with a user vector, leaving out seen and unavailable items.

`Retriever` uses faiss: exact inner product below `approx_threshold` items; above it, HNSW
(the default) or an IVF index with 4-bit fast-scan product quantization whose candidates are
re-ranked with exact scores (`IVF...,PQ...x4fs,RFlat`). An approximate index measures its
recall@10 against exact search when it is built, widening the search (`efSearch`, or `nprobe`
and the re-rank factor) until the recall target holds, and reports it in `build_report`.

`TorchExactRetriever` is exact top-k in torch (CPU or CUDA), for GPU serving: a half-precision
score pass picks candidates per chunk of the catalog, and the candidates are re-scored in fp32.

Row 0 of the item matrix is padding and is never returned. Exclusions are exact: an excluded
or unavailable item is never returned; where fewer than k items remain, indices are -1.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
import torch

KINDS = ("auto", "exact", "ivfpq", "hnsw")


@dataclass
class SearchResult:
    scores: np.ndarray  # [B, k] float32, descending
    indices: np.ndarray  # [B, k] int64 item indices (>= 1); -1 where fewer than k remain


def _check_queries(queries: np.ndarray, dim: int, k: int) -> np.ndarray:
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    if queries.ndim != 2 or queries.shape[1] != dim:
        raise ValueError(f"queries must be [batch, {dim}], got {list(queries.shape)}")
    return np.ascontiguousarray(queries, dtype=np.float32)


def _filter(
    scores: np.ndarray, ids: np.ndarray, k: int, exclude: Sequence[Sequence[int]] | None
) -> SearchResult:
    out_scores = np.full((len(ids), k), -np.inf, dtype=np.float32)
    out_ids = np.full((len(ids), k), -1, dtype=np.int64)
    for row in range(len(ids)):
        banned = set(exclude[row]) if exclude is not None else ()
        pairs = zip(scores[row], ids[row], strict=True)
        kept = [(s, i) for s, i in pairs if i > 0 and i not in banned][:k]
        if kept:
            out_scores[row, : len(kept)] = [s for s, _ in kept]
            out_ids[row, : len(kept)] = [i for _, i in kept]
    return SearchResult(out_scores, out_ids)


class Retriever:
    def __init__(
        self,
        item_vectors: np.ndarray,
        *,
        kind: str = "auto",
        approx_threshold: int = 50_000,
        recall_target: float = 0.95,
        sample_queries: np.ndarray | None = None,
        seed: int = 0,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown retrieval kind {kind!r}; choose from {KINDS}")
        if item_vectors.ndim != 2 or item_vectors.shape[0] < 2:
            raise ValueError("item_vectors must be [n_items + 1, d] with row 0 = padding")
        self.vectors = np.ascontiguousarray(item_vectors, dtype=np.float32)
        self.dim = self.vectors.shape[1]
        n_items = self.vectors.shape[0] - 1
        self.kind = kind if kind != "auto" else ("exact" if n_items < approx_threshold else "hnsw")
        self.recall_target = recall_target
        self.sample_queries = sample_queries
        self.seed = seed
        self.unavailable: set[int] = set()
        self.build_report: dict[str, Any] = {}
        self._build()

    def _available_ids(self) -> np.ndarray:
        ids = np.arange(1, self.vectors.shape[0], dtype=np.int64)
        if self.unavailable:
            ids = ids[~np.isin(ids, np.fromiter(self.unavailable, dtype=np.int64))]
        return ids

    def _build(self) -> None:
        started = time.perf_counter()
        self._ids = self._available_ids()
        data = self.vectors[self._ids]
        self._exact = faiss.IndexFlatIP(self.dim)
        self._exact.add(data)
        self._index: Any = self._exact
        params: dict[str, Any] = {}
        if self.kind == "ivfpq":
            nlist = int(max(16, min(4096, 4 * np.sqrt(len(data)))))
            subquantizers = self.dim // 2 if self.dim % 2 == 0 else self.dim
            spec = f"IVF{nlist},PQ{subquantizers}x4fs,RFlat"
            self._index = faiss.index_factory(self.dim, spec, faiss.METRIC_INNER_PRODUCT)
            self._index.train(data)
            self._index.add(data)
            params = {"factory": spec, "nlist": nlist}
        elif self.kind == "hnsw":
            self._index = faiss.IndexHNSWFlat(self.dim, 32, faiss.METRIC_INNER_PRODUCT)
            self._index.hnsw.efConstruction = 80
            self._index.add(data)
            params = {"factory": "HNSW32,Flat"}
        report: dict[str, Any] = {"kind": self.kind, "items": len(data), **params}
        if self.kind != "exact":
            report.update(self._tune(data))
        report["build_seconds"] = round(time.perf_counter() - started, 3)
        self.build_report = report

    def _tune(self, data: np.ndarray) -> dict[str, Any]:
        """Raise the search breadth until recall@10 against exact reaches the target."""
        rng = np.random.default_rng(self.seed)
        if self.sample_queries is not None:
            queries = np.ascontiguousarray(self.sample_queries, dtype=np.float32)
        else:  # item vectors, perturbed: queries that live where the catalog lives
            picks = data[rng.integers(0, len(data), size=min(1000, len(data)))]
            noise = rng.standard_normal(picks.shape).astype(np.float32)
            queries = picks + 0.5 * noise * picks.std(axis=0, keepdims=True)
        _, truth = self._exact.search(queries, 10)
        recall, chosen = 0.0, (0, 0)
        for breadth, refine in self._breadths():
            self._set_breadth(breadth, refine)
            _, found = self._index.search(queries, 10)
            pairs = zip(found, truth, strict=True)
            recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in pairs]))
            chosen = (breadth, refine)
            if recall >= self.recall_target:
                break
        if self.kind == "ivfpq":
            tuned = {"nprobe": chosen[0], "k_factor": chosen[1]}
        else:
            tuned = {"efSearch": chosen[0]}
        return {**tuned, "recall@10": round(recall, 4), "recall_queries": len(queries)}

    def _breadths(self) -> list[tuple[int, int]]:
        """Search settings from cheapest to broadest."""
        if self.kind == "hnsw":
            return [(ef, 0) for ef in (16, 32, 64, 128, 256, 512)]
        return [(p, f) for p in (8, 16, 32, 64, 128) for f in (8, 16, 32)]

    def _set_breadth(self, breadth: int, refine: int) -> None:
        if self.kind == "ivfpq":
            faiss.extract_index_ivf(self._index).nprobe = breadth
            self._index.k_factor = refine
        else:
            self._index.hnsw.efSearch = breadth

    def set_unavailable(self, items: Iterable[int]) -> None:
        """Items never to return (out of stock, withdrawn); rebuilds the index."""
        self.unavailable = {int(i) for i in items}
        self._build()

    def search(
        self, queries: np.ndarray, k: int, exclude: Sequence[Sequence[int]] | None = None
    ) -> SearchResult:
        queries = _check_queries(queries, self.dim, k)
        extra = max((len(e) for e in exclude), default=0) if exclude is not None else 0
        fetch = min(k + extra, len(self._ids))
        scores, positions = self._index.search(queries, fetch)
        ids = np.where(positions >= 0, self._ids[np.clip(positions, 0, None)], -1)
        return _filter(scores, ids, k, exclude)


class TorchExactRetriever:
    """Exact top-k by inner product in torch, on CPU or CUDA."""

    def __init__(
        self,
        item_vectors: np.ndarray | torch.Tensor,
        *,
        device: str = "cpu",
        chunk: int = 262_144,
        candidates: int = 64,
        half: bool | None = None,
    ) -> None:
        self.device = torch.device(device)
        vectors = torch.as_tensor(item_vectors, dtype=torch.float32).to(self.device)
        self.dim = vectors.shape[1]
        self.items = vectors
        self.half = (self.device.type == "cuda") if half is None else half
        self.items_half = vectors.half() if self.half else None
        self.chunk = chunk
        self.candidates = candidates
        self.mask = torch.zeros(vectors.shape[0], dtype=torch.bool, device=self.device)
        self.mask[0] = True  # padding

    def set_unavailable(self, items: Iterable[int]) -> None:
        self.mask.zero_()
        self.mask[0] = True
        index = torch.tensor(sorted({int(i) for i in items}), dtype=torch.long)
        if len(index):
            self.mask[index.to(self.device)] = True

    @torch.inference_mode()
    def search_tensor(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k on device tensors, no exclusions beyond padding/unavailable."""
        queries = queries.to(self.device, torch.float32)
        pool = max(k, self.candidates)
        chunk_ids, chunk_scores = [], []
        for start in range(0, self.items.shape[0], self.chunk):
            stop = min(start + self.chunk, self.items.shape[0])
            if self.half:
                scores = (queries.half() @ self.items_half[start:stop].T).float()
            else:
                scores = queries @ self.items[start:stop].T
            scores.masked_fill_(self.mask[start:stop], float("-inf"))
            top = torch.topk(scores, min(pool, stop - start), dim=1)
            chunk_ids.append(top.indices + start)
            chunk_scores.append(top.values)
        ids = torch.cat(chunk_ids, dim=1)
        if self.half:  # re-score the candidates exactly in fp32
            exact = torch.einsum("bd,bcd->bc", queries, self.items[ids])
            exact.masked_fill_(self.mask[ids], float("-inf"))
        else:
            exact = torch.cat(chunk_scores, dim=1)
        top = torch.topk(exact, k, dim=1)
        return top.values, torch.gather(ids, 1, top.indices)

    def search(
        self, queries: np.ndarray, k: int, exclude: Sequence[Sequence[int]] | None = None
    ) -> SearchResult:
        queries = _check_queries(queries, self.dim, k)
        extra = max((len(e) for e in exclude), default=0) if exclude is not None else 0
        fetch = min(k + extra, self.items.shape[0] - 1)
        scores, ids = self.search_tensor(torch.from_numpy(queries), fetch)
        ids_np = ids.cpu().numpy()
        scores_np = scores.cpu().numpy()
        ids_np = np.where(np.isfinite(scores_np), ids_np, -1)
        return _filter(scores_np, ids_np, k, exclude)
