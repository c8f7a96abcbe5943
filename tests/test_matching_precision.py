"""Matching and losses under mixed precision: float32 costs whatever autocast is active.

References are float64 numpy computations; the low-precision cost that the near-tie case is
built against mirrors what a bf16 / fp16 matmul gives (the costs before they were float32).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from recyclelora.models.mask2former.losses import Mask2FormerLoss
from recyclelora.models.mask2former.matcher import HungarianMatcher

from .test_matcher_losses import pixel_centres

SIDE = 112  # 112 * 112 = 12,544 points, the recipe's count
LOW_PRECISION = [torch.bfloat16, torch.float16]


def mask_cost64(x: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Float64 ``5 * bce + 5 * dice`` (Q, G) of logits x (Q, P) against binary t (G, P)."""
    softplus = np.logaddexp(0.0, x)
    bce = (softplus.sum(1)[:, None] - x @ t.T) / x.shape[1]
    s = 1.0 / (1.0 + np.exp(-x))
    dice = 1.0 - (2.0 * s @ t.T + 1.0) / (s.sum(1)[:, None] + t.sum(1)[None, :] + 1.0)
    return 5.0 * bce + 5.0 * dice


def mask_cost_low(x: torch.Tensor, t: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    """The same cost with its matmuls (and the BCE cost's scaling) in ``dtype``."""
    pos = torch.nn.functional.softplus(-x).to(dtype)
    neg = torch.nn.functional.softplus(x).to(dtype)
    tl, fl = t.to(dtype), (1.0 - t).to(dtype)
    bce = 5.0 * ((pos @ tl.T + neg @ fl.T) / x.shape[1])
    s = x.sigmoid()
    numerator = 2.0 * (s.to(dtype) @ tl.T)
    dice = 1.0 - (numerator.float() + 1.0) / (s.sum(1)[:, None] + t.sum(1)[None, :] + 1.0)
    return (bce.float() + 5.0 * dice).double().numpy()


def class_cost64(cls: np.ndarray, labels: list[int]) -> np.ndarray:
    e = np.exp(cls - cls.max(1, keepdims=True))
    return -2.0 * (e / e.sum(1, keepdims=True))[:, labels]


def swap_gap(cost: np.ndarray) -> float:
    """Diagonal minus anti-diagonal total of a 2 x 2 cost: < 0 means the diagonal wins."""
    return float(cost[0, 0] + cost[1, 1] - cost[0, 1] - cost[1, 0])


def near_tie(dtype: torch.dtype):
    """Two similar queries, two GTs: the class logits of query 0 are set so that the exact
    assignment wins by half the error that ``dtype`` matmuls make in the mask cost."""
    g = torch.Generator().manual_seed(0)
    x0 = 2.0 * torch.randn(SIDE * SIDE, generator=g)
    x = torch.stack([x0, x0 + 0.1 * torch.randn(SIDE * SIDE, generator=g)])
    t = (torch.rand(2, SIDE * SIDE, generator=g) > 0.5).float()
    exact = swap_gap(mask_cost64(x.double().numpy(), t.double().numpy()))
    error = swap_gap(mask_cost_low(x, t, dtype)) - exact
    # Class costs -2 * softmax: query 1 uniform (no gap), query 0 with logit a on class 0 adds
    # -2 (e^a - 1) / (e^a + 2) to the gap; choose it so that the total gap is -error / 2.
    r = (exact + error / 2) / 2
    assert -0.5 < r < 1.0
    a = math.log((1 + 2 * r) / (1 - r))
    cls = torch.tensor([[a, 0.0, 0.0], [0.0, 0.0, 0.0]])
    masks = x.reshape(2, SIDE, SIDE)
    gt = t.reshape(2, SIDE, SIDE).bool()
    return cls, masks, gt, t


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_near_tie_is_matched_exactly_under_autocast(dtype: torch.dtype) -> None:
    cls, masks, gt, t = near_tie(dtype)
    labels = [0, 1]
    x = masks.reshape(2, -1)
    class64 = class_cost64(cls.double().numpy(), labels)
    cost64 = class64 + mask_cost64(x.double().numpy(), t.double().numpy())
    low = class64 + mask_cost_low(x, t, dtype)
    exact = linear_sum_assignment(cost64)[1].tolist()
    # The case is a real near tie: low-precision costs pick the other assignment.
    assert linear_sum_assignment(low)[1].tolist() != exact
    gap = abs(swap_gap(cost64))
    assert 1e-5 < gap < 1e-2

    matcher = HungarianMatcher(num_points=SIDE * SIDE)
    points = pixel_centres(SIDE, SIDE)[None]
    with torch.autocast("cpu", dtype=dtype):
        rows, cols = matcher(cls[None], masks[None], [torch.tensor(labels)], [gt], points)[0]
        cost = matcher.image_cost(cls, masks, torch.tensor(labels), gt, points[0])
    assert rows.tolist() == [0, 1] and cols.tolist() == exact
    assert cost.dtype == torch.float32
    np.testing.assert_allclose(cost.double().numpy(), cost64, atol=gap / 10)


def overflow_case():
    """Confident background logits (~ -12) at 12,544 points: BCE sums pass fp16's 65,504."""
    g = torch.Generator().manual_seed(1)
    cls = torch.randn(1, 4, 3, generator=g)
    masks = torch.randn(1, 4, 28, 28, generator=g) - 12.0
    gt = torch.zeros(2, 112, 112, dtype=torch.bool)
    gt[0, :, :60] = True
    gt[1, :, 50:] = True
    return cls, masks, [torch.tensor([0, 1])], [gt]


def test_fp16_autocast_costs_stay_finite_and_match_fp32() -> None:
    cls, masks, labels, gt = overflow_case()
    matcher = HungarianMatcher()
    points = torch.rand(1, 12544, 2, generator=torch.Generator().manual_seed(2))
    reference = matcher(cls, masks, labels, gt, points)[0]
    full = matcher.image_cost(cls[0], masks[0], labels[0], gt[0], points[0])
    with torch.autocast("cpu", dtype=torch.float16):
        rows, cols = matcher(cls, masks, labels, gt, points)[0]
        half = matcher.image_cost(cls[0], masks[0], labels[0], gt[0], points[0])
    assert torch.isfinite(half).all() and half.dtype == torch.float32
    torch.testing.assert_close(half, full, rtol=0, atol=1e-6)
    assert torch.equal(rows, reference[0]) and torch.equal(cols, reference[1])


def test_fp16_predictions_are_matched_in_float32() -> None:
    """Half-precision logits (what a GPU's fp16 autocast gives the criterion)."""
    cls, masks, labels, gt = overflow_case()
    cls16, masks16 = cls.half(), masks.half()
    matcher = HungarianMatcher()
    points = torch.rand(1, 12544, 2, generator=torch.Generator().manual_seed(2))
    half = matcher.image_cost(cls16[0], masks16[0], labels[0], gt[0], points[0])
    full = matcher.image_cost(cls16[0].float(), masks16[0].float(), labels[0], gt[0], points[0])
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    torch.testing.assert_close(half, full, rtol=0, atol=0)
    got = matcher(cls16, masks16, labels, gt, points)[0]
    want = matcher(cls16.float(), masks16.float(), labels, gt, points)[0]
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


@pytest.mark.parametrize("where", ["mask", "class"])
def test_non_finite_predictions_raise_a_clear_error(where: str) -> None:
    cls, masks, labels, gt = overflow_case()
    if where == "mask":
        masks[0, 1] = float("nan")
    else:
        cls[0, 2, 1] = float("inf")
    with pytest.raises(FloatingPointError, match="non-finite.*logits contain NaN or Inf"):
        HungarianMatcher(num_points=256)(cls, masks, labels, gt)


@pytest.mark.parametrize("autocast", [True, False], ids=["autocast", "bf16-inputs"])
def test_losses_of_bf16_predictions_equal_float32_losses(autocast: bool) -> None:
    """bf16 predictions (what a GPU's bf16 autocast gives), with or without autocast active:
    class CE, BCE and dice are all summed in float32."""
    g = torch.Generator().manual_seed(3)
    cls = (3 * torch.randn(2, 6, 5, generator=g)).bfloat16().requires_grad_()
    masks = (4 * torch.randn(2, 6, 28, 28, generator=g)).bfloat16().requires_grad_()
    labels = [torch.tensor([0, 2, 3]), torch.tensor([1])]
    gt = [torch.rand(3, 112, 112, generator=g) > 0.4, torch.rand(1, 112, 112, generator=g) > 0.7]
    indices = [
        (torch.tensor([1, 4, 5]), torch.tensor([2, 0, 1])),
        (torch.tensor([3]), torch.tensor([0])),
    ]
    points = torch.rand(4, 12544, 2, generator=g)
    crit = Mask2FormerLoss(num_classes=4)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        low = crit.loss_single(cls, masks, labels, gt, indices=indices, points=points)
    full = crit.loss_single(
        cls.detach().float(), masks.detach().float(), labels, gt, indices=indices, points=points
    )
    for a, b in zip(low, full, strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    sum(low).backward()
    assert cls.grad.dtype == torch.bfloat16 and bool(torch.isfinite(cls.grad).all())
    assert masks.grad.dtype == torch.bfloat16 and bool(torch.isfinite(masks.grad).all())
