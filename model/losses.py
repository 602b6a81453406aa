"""Full-softmax cross-entropy over the catalog without materialising the whole logit matrix.

`F.cross_entropy(hidden @ items.T, targets)` on a batch of ~1,000 positions and a catalog of
~24,000 items allocates ~100 MB of logits, another ~100 MB for their gradient, and streams both
through memory several times; on a CPU the fresh allocations alone (page faults) cost more than
the matrix products. The loss is a sum over positions, so it can be computed a block of rows
at a time: each block's logits stay in cache, and its gradient (softmax - one-hot) is turned
into the gradients of `hidden` and `items` at once, during the forward pass (as fused
linear-cross-entropy kernels do). The backward pass only scales the stored gradients.
The result equals `F.cross_entropy(hidden @ items.T, targets)` with column 0 (padding)
excluded, up to float rounding (tests/test_losses.py). A row may also have several weighted
targets (a target distribution), at the same cost: the gradient is then the row's total weight
times its softmax, less each target's weight.

`excluded` [N, K] optionally leaves more items out of each row's softmax (as evaluation leaves
a user's earlier items out of the ranking); a row's own target is never left out, and 0
entries mean nothing (column 0 is out anyway).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class _ChunkedSoftmaxCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: Tensor,
        items: Tensor,
        targets: Tensor,
        weights: Tensor,
        excluded: Tensor | None,
        smoothing: float,
        block_rows: int,
    ) -> Tensor:
        """`targets` [N, K] with `weights` [N, K] (0 = no target: its index is ignored); each
        row's loss is sum_k weight_k * (logsumexp - logit[target_k]) plus the smoothing term."""
        count = hidden.shape[0]
        grad_hidden = torch.empty_like(hidden)
        grad_items = torch.zeros_like(items)
        total = hidden.new_zeros(())
        for start in range(0, count, block_rows):
            rows = slice(start, start + block_rows)
            block, block_targets, block_weights = hidden[rows], targets[rows], weights[rows]
            logits = block @ items.T  # [rows, n_items + 1]
            if smoothing:
                mean_logit = logits[:, 1:].mean(dim=1, keepdim=True)
            logits[:, 0] = float("-inf")  # row 0 of `items` is padding, never a candidate
            if excluded is not None:
                block_excluded = excluded[rows]
                is_target = (block_excluded.unsqueeze(2) == block_targets.unsqueeze(1)).any(2)
                logits.scatter_(1, block_excluded.masked_fill(is_target, 0), float("-inf"))
            log_normalizer = torch.logsumexp(logits, dim=1, keepdim=True)
            picked = logits.gather(1, block_targets).masked_fill(block_weights == 0, 0.0)
            row_weight = block_weights.sum(dim=1, keepdim=True)
            total += (row_weight * log_normalizer).sum() - (block_weights * picked).sum()
            if smoothing:  # the uniform target over the catalog, with weight `smoothing`
                total += smoothing * (log_normalizer - mean_logit).sum()
            # d(sum of losses)/d(logits) = (total weight) softmax - target distribution, in place
            probabilities = logits.sub_(log_normalizer).exp_()
            if smoothing:
                probabilities.mul_(row_weight + smoothing)
                probabilities[:, 1:] -= smoothing / (items.shape[0] - 1)
            else:
                probabilities.mul_(row_weight)
            probabilities.scatter_add_(1, block_targets, -block_weights)
            torch.mm(probabilities, items, out=grad_hidden[rows])
            grad_items.addmm_(probabilities.T, block)
        scale = 1.0 / max(count, 1)
        ctx.save_for_backward(grad_hidden, grad_items)
        ctx.scale = scale
        return total * scale

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor, Tensor, None, None, None, None, None]:  # type: ignore[override]
        grad_hidden, grad_items = ctx.saved_tensors
        factor = grad_output * ctx.scale
        return grad_hidden * factor, grad_items * factor, None, None, None, None, None


def softmax_cross_entropy(
    hidden: Tensor,
    items: Tensor,
    targets: Tensor,
    block_rows: int = 128,
    excluded: Tensor | None = None,
    smoothing: float = 0.0,
    weights: Tensor | None = None,
) -> Tensor:
    """Mean cross-entropy of `targets` [N] under softmax(hidden [N, d] @ items [V + 1, d].T),
    with column 0 (padding) and each row's `excluded` [N, K] items (not its target) left out
    of the softmax; with label `smoothing` e, the target distribution is (1 - e) on the target
    plus e spread evenly over the V items (not with `excluded`).

    Several targets a row: `targets` [N, K] with `weights` [N, K], the target distribution
    (each row's weights summing to 1 - e; a 0 weight marks no target, whatever its index)."""
    if smoothing and excluded is not None:
        raise ValueError("label smoothing with excluded items is not supported")
    if hidden.shape[0] == 0:
        return (hidden.sum() + items.sum()) * 0.0
    if targets.dim() == 1:
        targets = targets.view(-1, 1)
        weights = hidden.new_full(targets.shape, 1.0 - smoothing)
    elif weights is None or weights.shape != targets.shape:
        raise ValueError("several targets a row need weights of the same shape")
    return _ChunkedSoftmaxCrossEntropy.apply(
        hidden, items, targets, weights.to(hidden.dtype), excluded, smoothing, block_rows)
