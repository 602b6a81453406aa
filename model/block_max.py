"""Per-block maxima of query-item scores without materializing the score matrix (CUDA).

`block_max(queries, items, bias, block)` returns `[B, n_items / block]`: for each query, the
highest score `q . item + bias[item]` within each block of `block` consecutive items. A Triton
kernel computes a tile of scores with one tensor-core product and keeps only its row maxima,
so the B x N score matrix never reaches GPU memory. Without Triton (or on CPU) the same values
are computed with torch.
"""

from __future__ import annotations

import torch

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
