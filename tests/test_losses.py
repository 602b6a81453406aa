"""The block-wise fused cross-entropy equals the plain full-softmax cross-entropy."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from kvrec.model.losses import softmax_cross_entropy


def _reference(hidden: torch.Tensor, items: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = hidden @ items.T
    logits[:, 0] = float("-inf")
    return F.cross_entropy(logits, targets)


@pytest.mark.parametrize("count, block_rows", [(1, 128), (37, 8), (300, 128), (256, 256)])
def test_loss_and_gradients_equal_plain_cross_entropy(count: int, block_rows: int) -> None:
    generator = torch.Generator().manual_seed(count)
    hidden = torch.randn(count, 16, generator=generator)
    items = torch.randn(501, 16, generator=generator)
    targets = torch.randint(1, 501, (count,), generator=generator)
    leaves = [hidden.clone().requires_grad_(), items.clone().requires_grad_()]
    reference_leaves = [hidden.clone().requires_grad_(), items.clone().requires_grad_()]
    loss = softmax_cross_entropy(*leaves, targets, block_rows=block_rows)
    reference = _reference(*reference_leaves, targets)
    (loss * 3.0).backward()
    (reference * 3.0).backward()
    assert torch.allclose(loss, reference, atol=1e-5, rtol=1e-5)
    for mine, theirs in zip(leaves, reference_leaves, strict=True):
        assert torch.allclose(mine.grad, theirs.grad, atol=1e-6, rtol=1e-4)
    assert torch.count_nonzero(leaves[1].grad[0]) == 0  # padding row gets no gradient


def test_a_wrong_target_changes_the_loss() -> None:
    hidden, items = torch.randn(4, 8), torch.randn(20, 8)
    targets = torch.tensor([1, 2, 3, 4])
    moved = torch.tensor([1, 2, 3, 5])
    assert not torch.allclose(softmax_cross_entropy(hidden, items, targets),
                              softmax_cross_entropy(hidden, items, moved))


def test_no_positions_gives_zero_loss_with_gradients() -> None:
    hidden = torch.zeros(0, 8, requires_grad=True)
    items = torch.randn(10, 8, requires_grad=True)
    loss = softmax_cross_entropy(hidden, items, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and items.grad is not None


@pytest.mark.parametrize("count, block_rows", [(1, 128), (37, 8), (300, 128)])
def test_excluded_items_leave_the_softmax_but_never_the_target(count: int, block_rows: int) -> None:
    generator = torch.Generator().manual_seed(count + 7)
    hidden = torch.randn(count, 16, generator=generator)
    items = torch.randn(201, 16, generator=generator)
    targets = torch.randint(1, 201, (count,), generator=generator)
    excluded = torch.randint(0, 201, (count, 12), generator=generator)
    excluded[:, 0] = targets  # the target among a row's seen items stays a candidate
    leaves = [hidden.clone().requires_grad_(), items.clone().requires_grad_()]
    reference_leaves = [hidden.clone().requires_grad_(), items.clone().requires_grad_()]
    loss = softmax_cross_entropy(*leaves, targets, block_rows=block_rows, excluded=excluded)
    logits = reference_leaves[0] @ reference_leaves[1].T
    mask = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, excluded, True)
    mask[:, 0] = True
    mask[torch.arange(count), targets] = False
    reference = F.cross_entropy(logits.masked_fill(mask, float("-inf")), targets)
    loss.backward()
    reference.backward()
    assert torch.allclose(loss, reference, atol=1e-5, rtol=1e-5)
    for mine, theirs in zip(leaves, reference_leaves, strict=True):
        assert torch.allclose(mine.grad, theirs.grad, atol=1e-6, rtol=1e-4)
    plain = softmax_cross_entropy(hidden, items, targets, block_rows=block_rows)
    assert loss.item() < plain.item()  # fewer competitors: a smaller loss


@pytest.mark.parametrize("smoothing", [0.1, 0.3])
def test_label_smoothing_equals_torch_label_smoothing(smoothing: float) -> None:
    generator = torch.Generator().manual_seed(11)
    hidden = torch.randn(45, 16, generator=generator)
    items = torch.randn(301, 16, generator=generator)
    targets = torch.randint(1, 301, (45,), generator=generator)
    leaves = [hidden.clone().requires_grad_(), items.clone().requires_grad_()]
    reference_leaves = [hidden.clone().requires_grad_(), items.clone().requires_grad_()]
    loss = softmax_cross_entropy(*leaves, targets, block_rows=16, smoothing=smoothing)
    logits = reference_leaves[0] @ reference_leaves[1][1:].T  # the catalog without padding
    reference = F.cross_entropy(logits, targets - 1, label_smoothing=smoothing)
    loss.backward()
    reference.backward()
    assert torch.allclose(loss, reference, atol=1e-5, rtol=1e-5)
    for mine, theirs in zip(leaves, reference_leaves, strict=True):
        assert torch.allclose(mine.grad, theirs.grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("count, block_rows, smoothing", [(1, 128, 0.0), (37, 8, 0.0), (90, 32, 0.2)])
def test_several_weighted_targets_equal_the_weighted_sum_of_cross_entropies(
    count: int, block_rows: int, smoothing: float
) -> None:
    generator = torch.Generator().manual_seed(count + 3)
    hidden = torch.randn(count, 16, generator=generator)
    items = torch.randn(201, 16, generator=generator)
    targets = torch.randint(1, 201, (count, 4), generator=generator)
    weights = torch.rand(count, 4, generator=generator)
    weights[:, 2] = 0.0  # no target here: its index must not matter, padding included
    targets[:, 2] = 0
    weights[0, 1:] = 0.0  # a row with its next item only
    weights = weights / weights.sum(dim=1, keepdim=True) * (1.0 - smoothing)
    leaves = [hidden.clone().requires_grad_(), items.clone().requires_grad_()]
    reference_leaves = [hidden.clone().requires_grad_(), items.clone().requires_grad_()]
    loss = softmax_cross_entropy(*leaves, targets, block_rows=block_rows, smoothing=smoothing,
                                 weights=weights)
    logits = reference_leaves[0] @ reference_leaves[1][1:].T  # the catalog without padding
    log_probabilities = torch.log_softmax(logits, dim=1)
    picked = log_probabilities.gather(1, (targets - 1).clamp(min=0))
    reference = -(weights * picked).sum(dim=1)
    reference = reference - smoothing * log_probabilities.mean(dim=1)
    reference = reference.mean()
    (loss * 2.0).backward()
    (reference * 2.0).backward()
    assert torch.allclose(loss, reference, atol=1e-5, rtol=1e-5)
    for mine, theirs in zip(leaves, reference_leaves, strict=True):
        assert torch.allclose(mine.grad, theirs.grad, atol=1e-6, rtol=1e-4)


def test_one_target_of_weight_one_is_the_plain_loss_and_weights_must_match() -> None:
    generator = torch.Generator().manual_seed(5)
    hidden, items = torch.randn(20, 8, generator=generator), torch.randn(50, 8, generator=generator)
    targets = torch.randint(1, 50, (20,), generator=generator)
    several = torch.stack([targets, torch.zeros_like(targets)], dim=1)
    weights = torch.tensor([[1.0, 0.0]]).expand(20, 2)
    assert torch.allclose(softmax_cross_entropy(hidden, items, several, weights=weights),
                          softmax_cross_entropy(hidden, items, targets))
    with pytest.raises(ValueError, match="weights"):
        softmax_cross_entropy(hidden, items, several)
