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

from model.block_max import block_max

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
    """Exact top-k by inner product in torch, on CPU or CUDA.

    Scores are computed in half precision on CUDA (fp32 on CPU) for query chunks; the catalog is
    cut into blocks of `block` items and only the `k + margin` blocks with the highest maximum
    score are kept. Every item of the true top-k lies in one of them (a block holding a top-k
    item has a maximum at least the k-th score, and at most k blocks can), so re-scoring the
    items of those blocks in fp32 and taking the top-k is exact up to half-precision ties,
    which the margin absorbs.
    """

    def __init__(
        self,
        item_vectors: np.ndarray | torch.Tensor,
        *,
        device: str = "cpu",
        block: int = 128,
        margin: int = 8,
        query_chunk: int = 4096,
        half: bool | None = None,
    ) -> None:
        self.device = torch.device(device)
        vectors = torch.as_tensor(item_vectors, dtype=torch.float32).to(self.device)
        self.dim = vectors.shape[1]
        self.n_rows = vectors.shape[0]
        padded = -(-self.n_rows // block) * block
        self.items = torch.zeros((padded, self.dim), device=self.device)
        self.items[: self.n_rows] = vectors
        self.half = (self.device.type == "cuda") if half is None else half
        self.items_scoring = self.items.half() if self.half else self.items
        self.block = block
        self.margin = margin
        self.query_chunk = query_chunk
        self.banned = torch.zeros(padded, dtype=torch.bool, device=self.device)
        self._reset_banned(())

    def _reset_banned(self, items: Iterable[int]) -> None:
        self.banned.zero_()
        self.banned[0] = True  # padding
        self.banned[self.n_rows :] = True  # rows added to fill the last block
        index = torch.tensor(sorted({int(i) for i in items}), dtype=torch.long)
        if len(index):
            self.banned[index.to(self.device)] = True
        self.penalty = torch.zeros(self.banned.shape, device=self.device)
        self.penalty[self.banned] = float("-inf")

    def set_unavailable(self, items: Iterable[int]) -> None:
        self._reset_banned(items)

    @torch.inference_mode()
    def search_tensor(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k (scores, item indices) of device tensors; padding/unavailable never returned."""
        queries = queries.to(self.device, torch.float32)
        n_blocks = self.items.shape[0] // self.block
        keep = min(n_blocks, k + self.margin)
        out_scores, out_ids = [], []
        offsets = torch.arange(self.block, device=self.device)
        for start in range(0, queries.shape[0], self.query_chunk):
            chunk = queries[start : start + self.query_chunk]
            scoring = chunk.half() if self.half else chunk
            maxima = block_max(scoring, self.items_scoring, self.penalty, self.block)
            blocks = torch.topk(maxima, keep, dim=1).indices  # [b, keep]
            candidates = (blocks.unsqueeze(-1) * self.block + offsets).view(len(chunk), -1)
            exact = torch.einsum("bd,bcd->bc", chunk, self.items[candidates])
            exact = exact + self.penalty[candidates]
            top = torch.topk(exact, min(k, exact.shape[1]), dim=1)
            out_scores.append(top.values)
            out_ids.append(torch.gather(candidates, 1, top.indices))
        return torch.cat(out_scores), torch.cat(out_ids)

    def search(
        self, queries: np.ndarray, k: int, exclude: Sequence[Sequence[int]] | None = None
    ) -> SearchResult:
        queries = _check_queries(queries, self.dim, k)
        extra = max((len(e) for e in exclude), default=0) if exclude is not None else 0
        fetch = min(k + extra, self.n_rows - 1)
        scores, ids = self.search_tensor(torch.from_numpy(queries), fetch)
        ids_np = ids.cpu().numpy()
        scores_np = scores.cpu().numpy()
        ids_np = np.where(np.isfinite(scores_np), ids_np, -1)
        return _filter(scores_np, ids_np, k, exclude)
