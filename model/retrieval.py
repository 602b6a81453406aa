"""Top-k items by inner product with a user vector, leaving out seen and unavailable items.

`Retriever` (CPU) has four kinds of index:

- `exact`: a torch matrix product over the whole catalog, with excluded items masked before top-k.
- `ivfflat`: faiss inverted lists of raw vectors (`IVF{nlist},Flat`); scores are exact for the
  items it visits, only the lists it probes are approximate.
- `ivfpq`: faiss inverted lists with 4-bit fast-scan product quantization, candidates re-ranked
  with exact scores (`IVF{nlist},PQ{d}x4fs,RFlat`).
- `hnsw`: a faiss HNSW graph of raw vectors (`HNSW32,Flat`).

`auto` is exact below `approx_threshold` items and `ivfpq` above (the fastest measured at
100k items). Building an approximate index measures recall@10 against exact search on sample
queries for a ladder of search settings (nprobe, re-rank factor, efSearch) and keeps the fastest
setting that reaches `recall_target`; what it chose and measured is in `build_report`.

Exclusions are exact: padding (row 0), unavailable items and each query's own excluded items are
never returned. Unavailable items are skipped inside the faiss search (an ID selector); a query's
excluded items are filtered out of an over-fetched candidate list, and the rare query left with
fewer than k candidates is searched again wider, then exactly. Where fewer than k items remain,
indices are -1 and scores -inf.

GPU serving's exact top-k, `TorchExactRetriever`, is in `model.gpu_retrieval` (Triton stays off
the CPU worker's imports).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
import torch

from kvrec.model.choices import RETRIEVAL_KINDS
from kvrec.model.progress import progress_bar

KINDS = RETRIEVAL_KINDS
RECALL_K = 10
_SCORE_BYTES = 64 << 20  # largest query-by-item score matrix the exact path materializes at once


@dataclass
class SearchResult:
    scores: np.ndarray  # [B, k] float32, descending; -inf where fewer than k remain
    indices: np.ndarray  # [B, k] int64 item indices (>= 1); -1 where fewer than k remain


def check_queries(queries: Any, dim: int, k: int) -> np.ndarray:
    """Queries as a contiguous float32 [B, dim] array; ValueError with the reason otherwise."""
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k <= 0:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    array = np.asarray(queries)
    if array.ndim != 2 or array.shape[1] != dim:
        raise ValueError(f"queries must have shape [batch, {dim}], got {list(array.shape)}")
    if not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"queries must be numeric, got dtype {array.dtype}")
    array = np.ascontiguousarray(array, dtype=np.float32)
    if not np.isfinite(array).all():
        raise ValueError("queries contain NaN or infinite values")
    return array


def check_item_vectors(item_vectors: Any) -> np.ndarray:
    array = np.asarray(item_vectors)
    if array.ndim != 2 or array.shape[0] < 2 or array.shape[1] < 1:
        raise ValueError(
            f"item_vectors must be [n_items + 1, d] with row 0 = padding, got {list(array.shape)}"
        )
    array = np.ascontiguousarray(array, dtype=np.float32)
    if not np.isfinite(array).all():
        raise ValueError("item_vectors contain NaN or infinite values")
    return array


class Exclusions:
    """Per-query excluded items of one batch, flattened to keys `row * n_rows + item`: from a
    list per query, or (`from_csr`) from one flat array with each query's offsets into it."""

    def __init__(self, exclude: Sequence[Sequence[int]], n_queries: int, n_rows: int) -> None:
        if len(exclude) != n_queries:
            raise ValueError(f"exclude has {len(exclude)} lists for {n_queries} queries")
        lengths = np.fromiter(map(len, exclude), dtype=np.int64, count=n_queries)
        total = int(lengths.sum())
        items = np.fromiter(itertools.chain.from_iterable(exclude), dtype=np.int64, count=total)
        self._set(lengths, items, n_rows)

    @classmethod
    def from_csr(cls, offsets: np.ndarray, items: np.ndarray, n_rows: int) -> Exclusions:
        """Query q excludes `items[offsets[q]:offsets[q + 1]]` (offsets: [n_queries + 1],
        starting at 0, non-decreasing, ending at len(items))."""
        offsets = np.asarray(offsets, dtype=np.int64)
        items = np.asarray(items, dtype=np.int64)
        if offsets.ndim != 1 or not len(offsets) or offsets[0] != 0 or offsets[-1] != len(items):
            raise ValueError("CSR offsets must start at 0 and end at the number of items")
        lengths = np.diff(offsets)
        if (lengths < 0).any():
            raise ValueError("CSR offsets must be non-decreasing")
        excl = cls.__new__(cls)
        excl._set(lengths, items, n_rows)
        return excl

    def _set(self, lengths: np.ndarray, items: np.ndarray, n_rows: int) -> None:
        self.lengths = lengths
        rows = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
        keep = (items >= 0) & (items < n_rows)  # anything else can never be returned anyway
        self.n_rows = n_rows
        self.rows = rows[keep]
        self.items = items[keep]
        self.keys = self.rows * n_rows + self.items
        self.max_length = int(self.lengths.max(initial=0))

    @property
    def n_queries(self) -> int:
        return len(self.lengths)

    def contains(self, rows: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Boolean mask like `ids`: is ids[r, j] excluded for query rows[r]?

        Candidate items get small codes through a lookup table (a repeated item keeps one
        code), so (row, code) pairs index a dense table: no sorting of the many exclusions.
        """
        flat = ids.ravel()
        real = (flat >= 0) & (flat < self.n_rows)
        if not len(self.items) or not real.any():
            return np.zeros(ids.shape, dtype=bool)
        code = np.full(self.n_rows, -1, dtype=np.int64)
        code[flat[real]] = np.arange(int(real.sum()))
        width = int(real.sum())
        local = np.full(len(self.lengths), -1, dtype=np.int64)
        local[rows] = np.arange(len(rows))
        excluded_code = code[self.items]
        excluded_row = local[self.rows]
        relevant = (excluded_code >= 0) & (excluded_row >= 0)
        excluded = excluded_row[relevant] * width + excluded_code[relevant]
        candidate_row = np.repeat(np.arange(len(rows)), ids.shape[1])
        candidates = candidate_row * width + code[np.where(real, flat, 0)]
        if len(rows) * width <= 1 << 25:
            table = np.zeros(len(rows) * width, dtype=bool)
            table[excluded] = True
            hit = table[candidates]
        else:
            hit = np.isin(candidates, excluded)
        return (hit & real).reshape(ids.shape)

    def of_rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(position within `rows`, item) pairs of the exclusions of those query rows."""
        lookup = np.full(len(self.lengths), -1, dtype=np.int64)
        lookup[rows] = np.arange(len(rows))
        position = lookup[self.rows]
        mine = position >= 0
        return position[mine], self.items[mine]


ExcludeArg = Sequence[Sequence[int]] | Exclusions | None


def exclusions_of(exclude: ExcludeArg, n_queries: int, n_rows: int) -> Exclusions | None:
    """`search`'s `exclude` (lists, a built `Exclusions`, or None) as `Exclusions`."""
    if exclude is None:
        return None
    if isinstance(exclude, Exclusions):
        if exclude.n_queries != n_queries or exclude.n_rows != n_rows:
            raise ValueError(f"exclusions for {exclude.n_queries} queries over {exclude.n_rows} "
                             f"rows, searching {n_queries} over {n_rows}")
        return exclude
    return Exclusions(exclude, n_queries, n_rows)


def first_valid(scores: np.ndarray, ids: np.ndarray, valid: np.ndarray, k: int) -> SearchResult:
    """The first k valid (score, id) pairs of each row, in order; -inf/-1 fill the rest."""
    rank = np.cumsum(valid, axis=1)  # 1-based rank of each valid candidate in its row
    keep = valid & (rank <= k)
    rows, cols = np.nonzero(keep)
    slots = rank[rows, cols] - 1
    out_scores = np.full((len(ids), k), -np.inf, dtype=np.float32)
    out_ids = np.full((len(ids), k), -1, dtype=np.int64)
    out_scores[rows, slots] = scores[rows, cols]
    out_ids[rows, slots] = ids[rows, cols]
    return SearchResult(out_scores, out_ids)


class Retriever:
    """Top-k by inner product over `item_vectors` (row 0 = padding), with exact exclusions."""

    # how many of a query's excluded items the first fetch allows for (None: k). Measured at 100k
    # items, 200-item windows: 2 -> 6.5k q/s when half the true top-10 is excluded (most queries
    # need the second pass) but 50k when windows are random; k (10) -> 33k and 42k; 32 -> 27k, 29k.
    first_pass_margin: int | None = None

    def __init__(
        self,
        item_vectors: np.ndarray,
        *,
        kind: str = "auto",
        approx_threshold: int = 50_000,
        nprobe: int | None = None,
        ef_search: int | None = None,
        k_factor: int | None = None,
        nlist: int | None = None,
        recall_target: float = 0.96,
        sample_queries: np.ndarray | None = None,
        threads: int | None = 1,
        seed: int = 0,
        progress: bool = False,
    ) -> None:
        """Build the index; approximate kinds are tuned to `recall_target` (recall@10 vs exact).

        `nprobe` / `ef_search` / `k_factor` fix a search setting instead of tuning it (recall is
        still measured). `sample_queries` [S, d] are used for tuning; without them, perturbed
        item vectors are. `progress` shows tqdm bars while adding items and tuning. `threads`
        sets faiss's OpenMP threads (process-wide; None keeps faiss's). One is the default: on a
        few shared cores OpenMP's spinning barriers cost more than a second thread gains
        (measured 2.4x faster search, 20-70x faster PQ training, on 2 busy cores).
        """
        if kind not in KINDS:
            raise ValueError(f"unknown retrieval kind {kind!r}; choose from {', '.join(KINDS)}")
        if not 0.0 < recall_target <= 1.0:
            raise ValueError(f"recall_target must be in (0, 1], got {recall_target}")
        self.vectors = check_item_vectors(item_vectors)
        self.n_rows, self.dim = self.vectors.shape
        self.n_items = self.n_rows - 1
        self.kind = kind if kind != "auto" else (
            "exact" if self.n_items < approx_threshold else "ivfpq"
        )
        if threads is not None:
            if threads < 1:
                raise ValueError(f"threads must be >= 1, got {threads}")
            faiss.omp_set_num_threads(threads)
        self.recall_target = recall_target
        self.seed = seed
        self.progress = progress
        self._fixed = {"nprobe": nprobe, "efSearch": ef_search, "k_factor": k_factor}
        self._nlist = nlist
        self._sample_queries = sample_queries
        self._torch_items = torch.from_numpy(self.vectors)
        self._banned = np.zeros(self.n_rows, dtype=bool)
        self._banned[0] = True
        self._bias = torch.zeros(self.n_rows)
        self._bias[0] = float("-inf")
        self._selector: Any = None
        self._selector_bits: np.ndarray | None = None
        self._params: dict[str, int] = {}
        self.build_report: dict[str, Any] = {}
        self._index: Any = None
        self._build()

    # ---------------------------------------------------------------- building and tuning
    def _build(self) -> None:
        started = time.perf_counter()
        report: dict[str, Any] = {"kind": self.kind, "items": self.n_items, "dim": self.dim}
        if self.kind == "exact":
            report["factory"] = "torch matmul + masked top-k"
        else:
            report["factory"] = self._build_index()
            report["index_seconds"] = round(time.perf_counter() - started, 3)
            report.update(self._tune())
        report["build_seconds"] = round(time.perf_counter() - started, 3)
        self.build_report = report

    def _build_index(self) -> str:
        """Build the faiss index over all rows (position = item index; row 0 filtered later)."""
        n = self.n_rows
        if self.kind == "hnsw":
            self._index = faiss.IndexHNSWFlat(self.dim, 32, faiss.METRIC_INNER_PRODUCT)
            self._index.hnsw.efConstruction = 40
            self._add_all()
            return "HNSW32,Flat (efConstruction 40)"
        # ~0.8 sqrt(n) lists (a power of two): measured fastest at recall 0.95 on clustered catalogs
        nlist = self._nlist or int(np.clip(2 ** round(np.log2(0.8 * np.sqrt(n))), 16, 4096))
        nlist = max(1, min(nlist, n // 39))
        if self.kind == "ivfflat":
            spec = f"IVF{nlist},Flat"
        elif self.kind == "ivfpq":
            spec = f"IVF{nlist},PQ{self.dim}x4fs,RFlat"
        else:
            raise AssertionError(self.kind)
        self._index = faiss.index_factory(self.dim, spec, faiss.METRIC_INNER_PRODUCT)
        ivf = faiss.extract_index_ivf(self._index)
        ivf.cp.niter = 10
        rng = np.random.default_rng(self.seed)
        train_size = min(n, 64 * nlist)
        sample = self.vectors[np.sort(rng.choice(n, size=train_size, replace=False))]
        self._index.train(sample)
        self._add_all()
        self._nlist = nlist
        return spec

    def _add_all(self) -> None:
        """Add every row to the index, in chunks behind a progress bar when asked."""
        step = 50_000
        with progress_bar(total=self.n_rows, enabled=self.progress, desc=f"{self.kind} index",
                          unit="item") as bar:
            for start in range(0, self.n_rows, step):
                self._index.add(self.vectors[start : start + step])
                bar.update(min(step, self.n_rows - start))

    def _tuning_queries(self) -> np.ndarray:
        if self._sample_queries is not None:
            return check_queries(self._sample_queries, self.dim, RECALL_K)
        rng = np.random.default_rng(self.seed)
        # 2,000 queries, fewer above 500k items: exact ground truth is the cost of tuning
        size = min(self.n_items, int(np.clip(1e9 / self.n_rows, 1000, 2000)))
        picks = self.vectors[rng.integers(1, self.n_rows, size=size)]
        noise = rng.standard_normal(picks.shape).astype(np.float32)
        return picks + 0.5 * noise * self.vectors[1:].std(axis=0, keepdims=True)

    def _ladder(self) -> list[list[dict[str, int]]]:
        """Search settings to try: groups of growing breadth, each of growing re-rank depth."""
        if self.kind == "hnsw":
            groups = [[{"efSearch": ef}] for ef in (16, 24, 32, 48, 64, 96, 128, 256, 512)]
        else:
            probes = [p for p in (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256) if p <= self._nlist]
            factors = (2, 4, 8, 16) if self.kind == "ivfpq" else (0,)
            groups = [[{"nprobe": p, "k_factor": f} for f in factors] for p in probes]
            if self.kind == "ivfflat":
                groups = [[{"nprobe": g[0]["nprobe"]}] for g in groups]
        fixed = {name: value for name, value in self._fixed.items() if value is not None}
        if fixed:
            seen: set[tuple[tuple[str, int], ...]] = set()
            pinned = []
            for group in groups:
                members = []
                for setting in group:
                    merged = {**setting, **{n: v for n, v in fixed.items() if n in setting}}
                    key = tuple(sorted(merged.items()))
                    if key not in seen:
                        seen.add(key)
                        members.append(merged)
                if members:
                    pinned.append(members)
            groups = pinned
        return groups

    def _tune(self) -> dict[str, Any]:
        """Keep the fastest setting whose recall@10 against exact reaches the target."""
        queries = self._tuning_queries()
        truth = self._exact_search(queries, RECALL_K, None).indices
        trials: list[tuple[float, float, dict[str, int]]] = []  # (recall, seconds, setting)
        fastest_meeting = float("inf")
        ladder = self._ladder()
        for group in progress_bar(ladder, enabled=self.progress, desc=f"tuning {self.kind}"):
            slower = False
            for position, setting in enumerate(group):
                self._params = setting
                self._index.search(queries[:64], RECALL_K, params=self._search_params())  # warm-up
                started = time.perf_counter()
                found = self.search(queries, RECALL_K).indices
                seconds = time.perf_counter() - started
                recall = recall_at_k(found, truth)
                trials.append((recall, seconds, setting))
                if position == 0 and seconds > 1.2 * fastest_meeting:
                    slower = True  # the cheapest setting at this breadth loses already
                    break
                if recall >= self.recall_target:
                    fastest_meeting = min(fastest_meeting, seconds)
                    break  # deeper re-ranking at this breadth only costs more
            # broader groups cost more: stop once one met the target (single-setting groups)
            # or once a whole breadth is slower than the best setting found
            if slower or (fastest_meeting < float("inf") and len(group) == 1):
                break
        meeting = [t for t in trials if t[0] >= self.recall_target]
        recall, seconds, chosen = (
            min(meeting, key=lambda t: t[1]) if meeting else max(trials, key=lambda t: t[0])
        )
        self._params = chosen
        return {
            **chosen,
            **({"nlist": self._nlist} if self.kind != "hnsw" else {}),
            "recall@10": round(recall, 4),
            "recall_target": self.recall_target,
            "meets_target": recall >= self.recall_target,
            "recall_queries": len(queries),
            "tuning_queries_per_s": round(len(queries) / seconds),
            "settings_tried": len(trials),
        }

    def _search_params(self) -> Any:
        selector = self._selector
        if self.kind == "hnsw":
            return faiss.SearchParametersHNSW(efSearch=self._params["efSearch"], sel=selector)
        ivf = faiss.SearchParametersIVF(nprobe=self._params["nprobe"], sel=selector)
        if self.kind == "ivfpq":
            return faiss.IndexRefineSearchParameters(
                k_factor=self._params["k_factor"], base_index_params=ivf
            )
        return ivf

    # ---------------------------------------------------------------- unavailable items
    def set_unavailable(self, items: Iterable[int]) -> None:
        """Replace the set of items never to return (out of stock, withdrawn); no rebuild."""
        ids = np.unique(np.fromiter((int(i) for i in items), dtype=np.int64))
        if len(ids) and (ids[0] < 1 or ids[-1] > self.n_items):
            bad = ids[0] if ids[0] < 1 else ids[-1]
            raise ValueError(f"unavailable item {bad} is outside 1..{self.n_items}")
        self._banned[:] = False
        self._banned[0] = True
        self._banned[ids] = True
        self._bias = torch.where(
            torch.from_numpy(self._banned), float("-inf"), 0.0
        ).to(torch.float32)
        if len(ids):
            allowed = np.packbits(~self._banned, bitorder="little")
            self._selector_bits = allowed  # faiss keeps a raw pointer: hold the array
            self._selector = faiss.IDSelectorBitmap(self.n_rows, faiss.swig_ptr(allowed))
        else:
            self._selector = self._selector_bits = None

    @property
    def unavailable(self) -> set[int]:
        return {int(i) for i in np.nonzero(self._banned)[0] if i > 0}

    # ---------------------------------------------------------------- search
    def search(self, queries: np.ndarray, k: int, exclude: ExcludeArg = None) -> SearchResult:
        """Top-k per query, best first, never padding, unavailable or the query's excluded items
        (`exclude`: a list per query, or `Exclusions`, e.g. `Exclusions.from_csr`)."""
        queries = check_queries(queries, self.dim, k)
        excl = exclusions_of(exclude, len(queries), self.n_rows)
        if self.kind == "exact":
            return self._exact_search(queries, k, excl)
        return self._approximate_search(queries, k, excl)

    def _exact_search(
        self, queries: np.ndarray, k: int, excl: Exclusions | None, rows: np.ndarray | None = None
    ) -> SearchResult:
        """Masked exact top-k; `rows` are the queries' positions in the batch `excl` describes."""
        rows = np.arange(len(queries)) if rows is None else rows
        take = min(k, self.n_rows)
        chunk = max(1, _SCORE_BYTES // (4 * self.n_rows))
        out_scores, out_ids = [], []
        with torch.inference_mode():
            for start in range(0, len(queries), chunk):
                block = torch.from_numpy(queries[start : start + chunk])
                scores = block @ self._torch_items.T
                scores += self._bias
                if excl is not None:
                    at, items = excl.of_rows(rows[start : start + chunk])
                    flat = torch.from_numpy(at * self.n_rows + items)
                    scores.view(-1).index_fill_(0, flat, float("-inf"))
                top = torch.topk(scores, take, dim=1)
                out_scores.append(top.values.numpy())
                out_ids.append(top.indices.numpy())
        scores_np = np.concatenate(out_scores)
        ids_np = np.concatenate(out_ids).astype(np.int64)
        return first_valid(scores_np, ids_np, np.isfinite(scores_np), k)

    def _candidates(self, queries: np.ndarray, fetch: int) -> tuple[np.ndarray, np.ndarray]:
        scores, ids = self._index.search(queries, fetch, params=self._search_params())
        return scores, ids.astype(np.int64)

    def _approximate_search(self, queries: np.ndarray, k: int, excl: Exclusions | None) -> SearchResult:
        rows = np.arange(len(queries))
        # over-fetch a little: padding, and a few of the query's own excluded items near the top
        margin = self.first_pass_margin or k
        extra = 1 + (min(excl.max_length, margin) if excl is not None else 0)
        fetch = min(k + extra, self.n_rows)
        scores, ids = self._candidates(queries, fetch)
        result, short = self._filter(scores, ids, rows, k, excl)
        if short.any():  # excluded items filled the list: fetch past all of them
            wide = min(k + 1 + int(excl.lengths[short].max()) if excl else fetch * 2, self.n_rows)
            if wide > fetch:
                scores, ids = self._candidates(queries[short], wide)
                again, still = self._filter(scores, ids, rows[short], k, excl)
                self._merge(result, again, np.nonzero(short)[0])
                short[np.nonzero(short)[0]] = still
        if short.any():  # the index reached too few items (small lists, many unavailable)
            exact = self._exact_search(queries[short], k, excl, rows[short])
            exact_rows = np.nonzero(short)[0]
            self._merge(result, exact, exact_rows)
        return result

    def _filter(
        self, scores: np.ndarray, ids: np.ndarray, rows: np.ndarray, k: int, excl: Exclusions | None
    ) -> tuple[SearchResult, np.ndarray]:
        valid = (ids >= 0) & ~self._banned[np.clip(ids, 0, None)]
        if excl is not None:
            valid &= ~excl.contains(rows, ids)
        result = first_valid(scores, ids, valid, k)
        short = valid.sum(axis=1) < k
        return result, short

    @staticmethod
    def _merge(into: SearchResult, part: SearchResult, rows: np.ndarray) -> None:
        into.scores[rows] = part.scores
        into.indices[rows] = part.indices


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each row of `truth` (ignoring -1) that appears in the same row of `found`."""
    hits, total = 0, 0
    for got, want in zip(found.tolist(), truth.tolist(), strict=True):
        wanted = {i for i in want if i >= 0}
        hits += len(wanted.intersection(got))
        total += len(wanted)
    return hits / total if total else 1.0
