"""Exact top-k in torch for GPU serving (CPU works too): `TorchExactRetriever`.

Per-block score maxima pick the blocks of the catalog that can hold the top-k (half precision
on CUDA), and only their items are scored in fp32. `block_max(queries, items, bias, block)`
returns `[B, n_items / block]`: for each query, the highest score `q . item + bias[item]` within
each block of `block` consecutive items. A Triton kernel computes a tile of scores with one
tensor-core product and keeps only its row maxima, so the B x N score matrix never reaches GPU
memory. Without Triton (or on CPU) the same values are computed with torch.

Kept apart from `model.retrieval` so that a CPU worker never imports Triton.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from kvrec.model.retrieval import ExcludeArg, Exclusions, SearchResult, check_item_vectors, check_queries

try:  # Triton ships with torch's CUDA builds; absent elsewhere
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


if triton is not None:

    @triton.jit
    def _block_max_kernel(
        queries, items, bias, out, n_queries, n_items,
        stride_q, stride_i, stride_o,
        DIM: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_q = tl.program_id(1)
        rows = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        dims = tl.arange(0, DIM)
        q_mask = rows[:, None] < n_queries
        q = tl.load(queries + rows[:, None] * stride_q + dims[None, :], mask=q_mask, other=0.0)
        i_mask = cols[None, :] < n_items
        it = tl.load(items + cols[None, :] * stride_i + dims[:, None], mask=i_mask, other=0.0)
        item_bias = tl.load(bias + cols, mask=cols < n_items, other=float("-inf"))
        scores = tl.dot(q, it) + item_bias[None, :]
        tl.store(out + rows * stride_o + pid_n, tl.max(scores, axis=1), mask=rows < n_queries)


def block_max(queries: torch.Tensor, items: torch.Tensor, bias: torch.Tensor, block: int) -> torch.Tensor:
    """queries [B, D] and items [N, D] (same dtype), bias [N] fp32; N a multiple of `block`."""
    n_items, dim = items.shape
    if triton is not None and queries.is_cuda and dim in (16, 32, 64, 128) and block in (64, 128, 256):
        out = torch.empty((queries.shape[0], n_items // block), device=queries.device, dtype=torch.float32)
        block_q = 64
        grid = (n_items // block, triton.cdiv(queries.shape[0], block_q))
        _block_max_kernel[grid](
            queries, items, bias, out, queries.shape[0], n_items,
            queries.stride(0), items.stride(0), out.stride(0),
            DIM=dim, BLOCK_Q=block_q, BLOCK_N=block,
        )
        return out
    scores = (queries @ items.T).float() + bias
    return scores.view(queries.shape[0], n_items // block, block).amax(dim=2)


class TorchExactRetriever:
    """Exact top-k by inner product in torch, on CPU or CUDA; same `search` contract as Retriever.

    The catalog is cut into blocks of `block` items. Block maxima of the scores (half precision
    on CUDA, fp32 on CPU) pick the `k + margin` best blocks per query: every item of the true
    top-k lies in one of them (a block holding a top-k item has a maximum at least the k-th
    score, and at most k blocks can), so re-scoring those blocks' items in fp32 and taking the
    top-k is exact up to half-precision ties, which the margin absorbs. Unavailable items and
    padding are masked before the maxima; a query's excluded items by over-fetching past them.
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
        if isinstance(item_vectors, torch.Tensor):
            item_vectors = item_vectors.detach().float().cpu().numpy()
        vectors = torch.from_numpy(check_item_vectors(item_vectors)).to(self.device)
        self.n_rows, self.dim = vectors.shape
        padded = -(-self.n_rows // block) * block
        self.items = torch.zeros((padded, self.dim), device=self.device)
        self.items[: self.n_rows] = vectors
        self.half = (self.device.type == "cuda") if half is None else half
        self.items_scoring = self.items.half() if self.half else self.items
        self.block = block
        self.margin = margin
        self.query_chunk = query_chunk
        self.penalty = torch.zeros(padded, device=self.device)
        self.set_unavailable(())
        self.build_report = {
            "kind": "torch-exact", "items": self.n_rows - 1, "dim": self.dim,
            "device": str(self.device), "block": block, "half": self.half,
        }

    def set_unavailable(self, items: Iterable[int]) -> None:
        """Replace the set of items never to return."""
        ids = torch.tensor(sorted({int(i) for i in items}), dtype=torch.long)
        if len(ids) and (ids[0] < 1 or ids[-1] >= self.n_rows):
            bad = int(ids[0]) if ids[0] < 1 else int(ids[-1])
            raise ValueError(f"unavailable item {bad} is outside 1..{self.n_rows - 1}")
        self.penalty.zero_()
        self.penalty[0] = float("-inf")  # padding
        self.penalty[self.n_rows :] = float("-inf")  # rows that fill the last block
        if len(ids):
            self.penalty[ids.to(self.device)] = float("-inf")

    @torch.inference_mode()
    def search_tensor(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k (scores, item indices) of device tensors; -inf scores where fewer remain."""
        queries = queries.to(self.device, torch.float32)
        n_blocks = self.items.shape[0] // self.block
        keep = min(n_blocks, k + self.margin)
        take = min(k, keep * self.block)
        out_scores, out_ids = [], []
        offsets = torch.arange(self.block, device=self.device)
        # the gathered candidate vectors [chunk, keep * block, dim] must fit the gather budget
        budget = (4 << 30) if self.device.type == "cuda" else (256 << 20)
        per_query = keep * self.block * self.dim * 4
        step = max(1, min(self.query_chunk, budget // per_query))
        if keep * 2 > n_blocks:  # pruning would keep most of the catalog: score it all in fp32
            step = max(1, min(self.query_chunk, budget // (self.items.shape[0] * 4)))
            for start in range(0, queries.shape[0], step):
                scores = queries[start : start + step] @ self.items.T + self.penalty
                top = torch.topk(scores, take, dim=1)
                out_scores.append(top.values)
                out_ids.append(top.indices)
            return torch.cat(out_scores), torch.cat(out_ids)
        for start in range(0, queries.shape[0], step):
            chunk = queries[start : start + step]
            scoring = chunk.half() if self.half else chunk
            maxima = block_max(scoring, self.items_scoring, self.penalty, self.block)
            blocks = torch.topk(maxima, keep, dim=1).indices  # [b, keep]
            candidates = (blocks.unsqueeze(-1) * self.block + offsets).view(len(chunk), -1)
            exact = torch.einsum("bd,bcd->bc", chunk, self.items[candidates])
            exact = exact + self.penalty[candidates]
            top = torch.topk(exact, take, dim=1)
            out_scores.append(top.values)
            out_ids.append(torch.gather(candidates, 1, top.indices))
        return torch.cat(out_scores), torch.cat(out_ids)

    @torch.inference_mode()
    def search_excluding(
        self, queries: torch.Tensor, k: int, exclude: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k of device tensors leaving out each query's `exclude` row ([B, E] item indices,
        -1 = none), all on the device: only [B, k] scores and ids remain, best first, -inf / -1
        where fewer than k items are left. The top k + E hold the top k of what is not
        excluded (at most E of them are), so the result is exact."""
        width = 0 if exclude is None else exclude.shape[1]
        fetch = min(k + width, self.n_rows)
        scores, ids = self.search_tensor(queries, fetch)
        valid = torch.isfinite(scores)
        if width:
            exclude = exclude.to(self.device)  # type: ignore[union-attr]
            # [b, fetch, E] comparisons per chunk of queries: bounded memory at any window
            step = max(1, (64 << 20) // max(1, fetch * width))
            for start in range(0, len(ids), step):
                rows = slice(start, start + step)
                excluded = (ids[rows].unsqueeze(2) == exclude[rows].unsqueeze(1)).any(dim=2)
                valid[rows] &= ~excluded
        # the first k valid candidates of each row, in rank order (a stable sort of "invalid")
        order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices[:, :k]
        kept = torch.gather(valid, 1, order)
        top_scores = torch.gather(scores, 1, order).masked_fill(~kept, float("-inf"))
        top_ids = torch.gather(ids, 1, order).masked_fill(~kept, -1)
        if top_scores.shape[1] < k:  # fewer candidates than k in the whole catalog
            pad = k - top_scores.shape[1]
            top_scores = torch.nn.functional.pad(top_scores, (0, pad), value=float("-inf"))
            top_ids = torch.nn.functional.pad(top_ids, (0, pad), value=-1)
        return top_scores, top_ids

    def search(self, queries: np.ndarray, k: int, exclude: ExcludeArg = None) -> SearchResult:
        """`Retriever.search`'s contract: exclusions applied on the device, and only the k best
        of each query cross back to the host."""
        queries = check_queries(queries, self.dim, k)
        excluded = None
        if exclude is not None:
            excluded = torch.from_numpy(padded_exclusions(exclude, len(queries)))
        scores, ids = self.search_excluding(torch.from_numpy(queries), k, excluded)
        return SearchResult(scores.cpu().numpy(), ids.cpu().numpy().astype(np.int64))


def padded_exclusions(exclude: Sequence[Sequence[int]] | Exclusions, n_queries: int) -> np.ndarray:
    """Per-query excluded items (lists, or `Exclusions` such as CSR-built ones) as one
    [n_queries, longest] int64 array, -1 where a row ends."""
    if isinstance(exclude, Exclusions):
        if exclude.n_queries != n_queries:
            raise ValueError(f"exclusions for {exclude.n_queries} queries, not {n_queries}")
        lengths = np.bincount(exclude.rows, minlength=n_queries).astype(np.int64)
        flat = exclude.items  # by row, in order (items that could never be returned left out)
    else:
        if len(exclude) != n_queries:
            raise ValueError(f"exclude has {len(exclude)} lists for {n_queries} queries")
        lengths = np.fromiter(map(len, exclude), dtype=np.int64, count=n_queries)
        flat = np.fromiter(itertools.chain.from_iterable(exclude), dtype=np.int64,
                           count=int(lengths.sum()))
    width = int(lengths.max()) if n_queries else 0
    out = np.full((n_queries, width), -1, dtype=np.int64)
    if width:
        rows = np.repeat(np.arange(n_queries), lengths)
        cols = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        out[rows, cols] = flat
    return out
