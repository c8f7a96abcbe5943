"""Matcher, point sampling and Mask2Former losses against independent float64 references."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist

from recyclelora.models.mask2former.losses import (
    InstanceTargets,
    Mask2FormerLoss,
    semantic_to_instance_targets,
)
from recyclelora.models.mask2former.matcher import (
    HungarianMatcher,
    classification_cost,
    dice_cost,
    sigmoid_bce_cost,
)
from recyclelora.models.mask2former.point_sample import (
    point_sample,
    uncertain_point_coords_with_randomness,
)

# ----------------------------------------------------------------------------- references


def ref_bilinear(img: np.ndarray, x: float, y: float) -> float:
    """align_corners=False bilinear read of a (H, W) array with zero padding outside."""
    h, w = img.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    fx, fy = px - x0, py - y0
    total = 0.0
    for dy, wy in ((0, 1.0 - fy), (1, fy)):
        for dx, wx in ((0, 1.0 - fx), (1, fx)):
            yy, xx = y0 + dy, x0 + dx
            if 0 <= yy < h and 0 <= xx < w:
                total += wy * wx * float(img[yy, xx])
    return total


def ref_softplus(x: float) -> float:
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def ref_sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def ref_bce(x: float, t: float) -> float:
    """Sigmoid BCE of one logit against a (possibly soft) target."""
    return ref_softplus(x) - t * x


def ref_dice(xs: np.ndarray, ts: np.ndarray, eps: float = 1.0) -> float:
    s = [ref_sigmoid(float(v)) for v in xs]
    inter = sum(a * b for a, b in zip(s, ts, strict=True))
    return 1.0 - (2.0 * inter + eps) / (sum(s) + float(ts.sum()) + eps)


def ref_softmax(row: np.ndarray) -> np.ndarray:
    e = np.exp(row - row.max())
    return e / e.sum()


def pixel_centres(h: int, w: int) -> torch.Tensor:
    """(h*w, 2) points (x, y) at the pixel centres of an h x w grid, row-major."""
    ys, xs = torch.meshgrid(
        (torch.arange(h, dtype=torch.float64) + 0.5) / h,
        (torch.arange(w, dtype=torch.float64) + 0.5) / w,
        indexing="ij",
    )
    return torch.stack([xs.flatten(), ys.flatten()], dim=-1).float()


# ----------------------------------------------------------------------------- point_sample


def test_point_sample_matches_manual_bilinear_including_borders() -> None:
    g = torch.Generator().manual_seed(0)
    img = torch.randn(2, 3, 5, 7, generator=g)
    pts = [
        (0.0, 0.0),
        (1.0, 1.0),
        (0.0, 1.0),
        (1.0, 0.3),
        (0.5, 0.5),
        (0.05, 0.97),
        (0.37, 0.61),
        (0.5 / 7, 0.5 / 5),  # centre of the top-left pixel: exact value
        (0.999, 0.001),
    ]
    points = torch.tensor(pts).expand(2, -1, -1).contiguous()
    out = point_sample(img, points)
    assert out.shape == (2, 3, len(pts))
    for b in range(2):
        for c in range(3):
            arr = img[b, c].double().numpy()
            for p, (x, y) in enumerate(pts):
                assert out[b, c, p].item() == pytest.approx(ref_bilinear(arr, x, y), abs=1e-5)
    assert out[0, 0, 7].item() == pytest.approx(img[0, 0, 0, 0].item(), abs=1e-6)
    # The corner point mixes three zero-padded neighbours: a quarter of the corner pixel.
    assert out[0, 0, 0].item() == pytest.approx(0.25 * img[0, 0, 0, 0].item(), abs=1e-6)


# ----------------------------------------------------------------------------- uncertainty


def test_uncertain_points_shape_range_and_selection() -> None:
    n, num_points, ratio, imp = 3, 40, 3.0, 0.75
    logits = torch.randn(n, 1, 6, 9, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(123)
    state = gen.get_state()
    out = uncertain_point_coords_with_randomness(logits, num_points, ratio, imp, generator=gen)
    assert out.shape == (n, num_points, 2)
    assert out.min() >= 0.0 and out.max() <= 1.0

    # Replay the documented draw order: candidates, then the uniform remainder.
    replay = torch.Generator()
    replay.set_state(state)
    num_sampled, k = int(num_points * ratio), int(imp * num_points)
    candidates = torch.rand((n, num_sampled, 2), generator=replay)
    remainder = torch.rand((n, num_points - k, 2), generator=replay)
    assert torch.equal(out[:, k:], remainder)
    for i in range(n):
        arr = logits[i, 0].double().numpy()
        unc = np.array([-abs(ref_bilinear(arr, float(x), float(y))) for x, y in candidates[i]])
        chosen = out[i, :k]
        # Every importance point is a candidate ...
        match = (chosen[:, None, :] == candidates[i][None, :, :]).all(-1)
        assert bool(match.any(1).all())
        picked = match.float().argmax(1).numpy()
        assert len(set(picked.tolist())) == k
        # ... and they are the k most uncertain ones.
        rest = np.setdiff1d(np.arange(num_sampled), picked)
        assert unc[picked].min() >= unc[rest].max() - 1e-6
        np.testing.assert_allclose(np.sort(unc[picked]), np.sort(unc)[-k:], atol=1e-6)


def test_uncertain_points_empty_and_deterministic() -> None:
    empty = uncertain_point_coords_with_randomness(torch.zeros(0, 1, 4, 4), 10)
    assert empty.shape == (0, 10, 2)
    logits = torch.randn(2, 1, 4, 4)
    a = uncertain_point_coords_with_randomness(
        logits, 16, generator=torch.Generator().manual_seed(5)
    )
    b = uncertain_point_coords_with_randomness(
        logits, 16, generator=torch.Generator().manual_seed(5)
    )
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------- targets


def test_semantic_to_instance_targets_ignore_and_empty() -> None:
    seg = torch.tensor(
        [
            [[3, 3, 255], [0, 255, 7]],
            [[255, 255, 255], [255, 255, 255]],
        ],
        dtype=torch.uint8,
    )
    t0, t1 = semantic_to_instance_targets(seg)
    assert t0.labels.tolist() == [0, 3, 7]
    assert t0.labels.dtype == torch.long
    expected = torch.tensor(
        [
            [[0, 0, 0], [1, 0, 0]],
            [[1, 1, 0], [0, 0, 0]],
            [[0, 0, 0], [0, 0, 1]],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(t0.masks, expected)
    # Ignore pixels are background in every mask.
    assert not t0.masks[:, seg[0] == 255].any()
    assert t1.labels.shape == (0,) and t1.masks.shape == (0, 2, 3)
    # (B, 1, H, W) and a list of (H, W) give the same thing.
    t0b, _ = semantic_to_instance_targets(seg.unsqueeze(1).long())
    assert torch.equal(t0b.labels, t0.labels) and torch.equal(t0b.masks, t0.masks)


# ----------------------------------------------------------------------------- costs


def test_cost_matrices_match_direct_formulas() -> None:
    g = torch.Generator().manual_seed(2)
    q, k, num_gt, p = 5, 4, 3, 11
    cls = torch.randn(q, k + 1, generator=g) * 2
    labels = torch.tensor([3, 0, 3])
    logits = torch.randn(q, p, generator=g) * 3
    targets = torch.rand(num_gt, p, generator=g)  # soft, as bilinear GT sampling gives
    targets[0] = (targets[0] > 0.5).float()

    c_cls = classification_cost(cls, labels).double().numpy()
    c_bce = sigmoid_bce_cost(logits, targets).double().numpy()
    c_dice = dice_cost(logits, targets, eps=1.0).double().numpy()
    assert c_cls.shape == c_bce.shape == c_dice.shape == (q, num_gt)

    cls64, x64, t64 = cls.double().numpy(), logits.double().numpy(), targets.double().numpy()
    for i in range(q):
        prob = ref_softmax(cls64[i])
        for j in range(num_gt):
            assert c_cls[i, j] == pytest.approx(-prob[labels[j]], abs=1e-6)
            bce = sum(ref_bce(x64[i, n], t64[j, n]) for n in range(p)) / p
            assert c_bce[i, j] == pytest.approx(bce, abs=1e-5)
            assert c_dice[i, j] == pytest.approx(ref_dice(x64[i], t64[j]), abs=1e-6)


# ----------------------------------------------------------------------------- matcher


def ref_total_cost(cls, mask_logits, gt_labels, gt_masks, wc=2.0, wm=5.0, wd=5.0) -> np.ndarray:
    """Float64 (Q, G) cost from pixel values (points at pixel centres read pixels exactly)."""
    q, g = cls.shape[0], gt_labels.shape[0]
    x = mask_logits.reshape(q, -1).double().numpy()
    t = gt_masks.reshape(g, -1).double().numpy()
    c = cls.double().numpy()
    out = np.zeros((q, g))
    for i in range(q):
        prob = ref_softmax(c[i])
        for j in range(g):
            bce = sum(ref_bce(x[i, n], t[j, n]) for n in range(x.shape[1])) / x.shape[1]
            out[i, j] = -wc * prob[gt_labels[j]] + wm * bce + wd * ref_dice(x[i], t[j])
    return out


@pytest.mark.parametrize("seed", range(6))
def test_matcher_equals_bruteforce(seed: int) -> None:
    g = torch.Generator().manual_seed(100 + seed)
    batch, q, k, h, w = 2, int(torch.randint(3, 7, (1,), generator=g)), 3, 3, 4
    cls = torch.randn(batch, q, k + 1, generator=g) * 2
    masks = torch.randn(batch, q, h, w, generator=g) * 2
    gt_labels, gt_masks = [], []
    for _ in range(batch):
        n = int(torch.randint(1, min(4, q) + 1, (1,), generator=g))
        gt_labels.append(torch.randint(0, k, (n,), generator=g))
        gt_masks.append(torch.rand(n, h, w, generator=g) > 0.5)
    points = pixel_centres(h, w).expand(batch, -1, -1)

    matcher = HungarianMatcher(num_points=h * w)
    result = matcher(cls, masks, gt_labels, gt_masks, points=points)
    for b in range(batch):
        rows, cols = result[b]
        assert rows.dtype == cols.dtype == torch.long
        assert torch.equal(rows, rows.sort().values)
        cost = ref_total_cost(cls[b], masks[b], gt_labels[b], gt_masks[b])
        n = gt_labels[b].numel()
        assert rows.numel() == cols.numel() == n
        assert sorted(cols.tolist()) == list(range(n))
        best, best_perm, second = math.inf, None, math.inf
        for perm in itertools.permutations(range(q), n):  # perm[j] = query of GT j
            total = sum(cost[perm[j], j] for j in range(n))
            if total < best:
                best, best_perm, second = total, perm, best
            elif total < second:
                second = total
        got = sum(cost[r, c] for r, c in zip(rows.tolist(), cols.tolist(), strict=True))
        assert got == pytest.approx(best, abs=1e-6)
        if second - best > 1e-4:  # unique optimum: the indices themselves must agree
            assert {(c, r) for r, c in zip(rows.tolist(), cols.tolist(), strict=True)} == {
                (j, best_perm[j]) for j in range(n)
            }


def test_matcher_reads_pred_and_gt_at_the_same_normalised_points() -> None:
    """GT at 2x the prediction resolution: the cost uses 2x2-block averages of the GT."""
    g = torch.Generator().manual_seed(7)
    q, k = 4, 2
    cls = torch.randn(1, q, k + 1, generator=g)
    masks = torch.randn(1, q, 2, 3, generator=g)
    gt_hi = torch.rand(2, 4, 6, generator=g) > 0.5
    gt_lo = gt_hi.float().reshape(2, 2, 2, 3, 2).mean(dim=(2, 4))  # (2, 2, 3)
    labels = torch.tensor([1, 0])
    matcher = HungarianMatcher(num_points=6)
    pts = pixel_centres(2, 3)
    direct = matcher.image_cost(cls[0], masks[0], labels, gt_hi, pts).double().numpy()
    ref = ref_total_cost(cls[0], masks[0], labels, gt_lo)
    np.testing.assert_allclose(direct, ref, atol=1e-5)


def test_matcher_random_points_empty_gt_no_grad_and_generator() -> None:
    g = torch.Generator().manual_seed(3)
    cls = torch.randn(3, 6, 5, generator=g, requires_grad=True)
    masks = torch.randn(3, 6, 8, 8, generator=g, requires_grad=True)
    gt_labels = [torch.tensor([1, 3]), torch.zeros(0, dtype=torch.long), torch.tensor([0])]
    gt_masks = [
        torch.rand(2, 32, 32, generator=g) > 0.5,
        torch.zeros(0, 32, 32, dtype=torch.bool),
        torch.ones(1, 32, 32, dtype=torch.bool),
    ]
    matcher = HungarianMatcher(num_points=200)
    a = matcher(cls, masks, gt_labels, gt_masks, generator=torch.Generator().manual_seed(9))
    b = matcher(cls, masks, gt_labels, gt_masks, generator=torch.Generator().manual_seed(9))
    assert [x.numel() for x, _ in a] == [2, 0, 1]
    for (r1, c1), (r2, c2) in zip(a, b, strict=True):
        assert torch.equal(r1, r2) and torch.equal(c1, c2)
        assert not r1.requires_grad and r1.dtype == torch.long
    # More GTs than queries: every query is used once.
    rows, cols = matcher(
        cls[:1, :2], masks[:1, :2], [torch.tensor([0, 1, 2])], [torch.ones(3, 8, 8)]
    )[0]
    assert sorted(rows.tolist()) == [0, 1] and len(set(cols.tolist())) == 2


# ----------------------------------------------------------------------------- losses


def _hand_case():
    """2 images, 3 queries, 2 classes (+ no-object), 2x2 masks, explicit matching."""
    cls = torch.tensor(
        [
            [[2.0, -1.0, 0.5], [0.1, 0.3, -0.2], [-1.0, 1.5, 0.0]],
            [[0.0, 0.0, 3.0], [1.2, -0.7, 0.4], [0.3, 2.2, -1.1]],
        ],
        requires_grad=True,
    )
    masks = torch.tensor(
        [
            [[[2.0, -1.0], [0.5, -3.0]], [[0.0, 1.0], [-1.0, 2.0]], [[-2.0, 3.0], [1.0, 0.2]]],
            [[[1.0, 1.0], [-1.0, -1.0]], [[-0.5, 0.7], [2.5, -2.0]], [[0.3, -0.3], [0.9, 1.4]]],
        ],
        requires_grad=True,
    )
    gt_labels = [torch.tensor([1, 0]), torch.tensor([1])]
    gt_masks = [
        torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]]),
        torch.tensor([[[0.0, 0.0], [1.0, 1.0]]]),
    ]
    # image 0: query 2 <- GT 0 (class 1), query 0 <- GT 1 (class 0); image 1: query 1 <- GT 0.
    indices = [(torch.tensor([2, 0]), torch.tensor([0, 1])), (torch.tensor([1]), torch.tensor([0]))]
    # Matched masks ordered by image then query: (0, q0), (0, q2), (1, q1).
    matched = [(0, 0, 1), (0, 2, 0), (1, 1, 0)]  # (image, query, gt)
    return cls, masks, gt_labels, gt_masks, indices, matched


def _hand_reference(cls, masks, gt_labels, gt_masks, matched, num_masks_for_avg=None):
    k = cls.shape[-1] - 1
    c = cls.detach().double().numpy()
    labels = np.full(cls.shape[:2], k)
    for b, q, g in matched:
        labels[b, q] = int(gt_labels[b][g])
    num, den = 0.0, 0.0
    for b in range(c.shape[0]):
        for q in range(c.shape[1]):
            y = labels[b, q]
            wgt = 0.1 if y == k else 1.0
            nll = math.log(np.exp(c[b, q]).sum()) - c[b, q, y]
            num += wgt * nll
            den += wgt
    loss_cls = 2.0 * num / den
    n_masks = num_masks_for_avg if num_masks_for_avg is not None else len(matched)
    bce_sum, dice_sum, n_points = 0.0, 0.0, 0
    for b, q, g in matched:
        x = masks[b, q].detach().double().numpy().ravel()
        t = gt_masks[b][g].double().numpy().ravel()
        n_points = x.size
        bce_sum += sum(ref_bce(float(xi), float(ti)) for xi, ti in zip(x, t, strict=True))
        dice_sum += ref_dice(x, t)
    loss_mask = 5.0 * bce_sum / (n_masks * n_points)
    loss_dice = 5.0 * dice_sum / n_masks
    return loss_cls, loss_mask, loss_dice


def test_loss_single_matches_hand_computation() -> None:
    cls, masks, gt_labels, gt_masks, indices, matched = _hand_case()
    crit = Mask2FormerLoss(num_classes=2, num_points=4)
    points = pixel_centres(2, 2).expand(3, -1, -1)
    loss_cls, loss_mask, loss_dice = crit.loss_single(
        cls, masks, gt_labels, gt_masks, indices=indices, points=points
    )
    ref = _hand_reference(cls, masks, gt_labels, gt_masks, matched)
    assert loss_cls.item() == pytest.approx(ref[0], rel=1e-5)
    assert loss_mask.item() == pytest.approx(ref[1], rel=1e-5)
    assert loss_dice.item() == pytest.approx(ref[2], rel=1e-5)
    (loss_cls + loss_mask + loss_dice).backward()
    assert cls.grad.abs().sum() > 0
    # Only matched queries receive mask gradients.
    assert masks.grad[1, 0].abs().sum() == 0 and masks.grad[0, 1].abs().sum() == 0
    assert masks.grad[0, 0].abs().sum() > 0 and masks.grad[1, 1].abs().sum() > 0


def test_loss_reads_full_resolution_gt_at_the_prediction_points() -> None:
    """GT at 2x the mask resolution, points at the mask pixel centres -> 2x2 GT averages."""
    cls, masks, gt_labels, gt_masks, indices, matched = _hand_case()
    gt_hi = [m.repeat_interleave(2, 1).repeat_interleave(2, 2) for m in gt_masks]
    gt_hi[0][0, 0, 0] = 0.0  # make one block soft: its average becomes 0.75
    gt_lo = [m.reshape(m.shape[0], 2, 2, 2, 2).mean(dim=(2, 4)) for m in gt_hi]
    crit = Mask2FormerLoss(num_classes=2, num_points=4)
    points = pixel_centres(2, 2).expand(3, -1, -1)
    out = crit.loss_single(cls, masks, gt_labels, gt_hi, indices=indices, points=points)
    ref = _hand_reference(cls, masks, gt_labels, gt_lo, matched)
    for got, want in zip(out, ref, strict=True):
        assert got.item() == pytest.approx(want, rel=1e-5)


def test_num_total_masks_is_averaged_across_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake a 2-rank group whose other rank holds 7 masks: the divisor is (3 + 7) / 2. (Its
    class-weight sum equals this rank's, so the class loss's divisor, reduced first, is kept.)"""
    cls, masks, gt_labels, gt_masks, indices, matched = _hand_case()
    calls = []

    def fake_all_reduce(tensor, op=None):  # receives value / world_size
        calls.append(float(tensor))
        if len(calls) == 1:
            tensor.mul_(2)  # class-weight sum: the other rank holds the same
        else:
            tensor.add_(7.0 / 2)

    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a, **kw: 2)
    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    crit = Mask2FormerLoss(num_classes=2, num_points=4)
    points = pixel_centres(2, 2).expand(3, -1, -1)
    out = crit.loss_single(cls, masks, gt_labels, gt_masks, indices=indices, points=points)
    ref = _hand_reference(cls, masks, gt_labels, gt_masks, matched, num_masks_for_avg=5.0)
    for got, want in zip(out, ref, strict=True):
        assert got.item() == pytest.approx(want, rel=1e-5)
    assert len(calls) == 2


def test_loss_with_matching_and_importance_sampling_is_reproducible() -> None:
    cls, masks, gt_labels, gt_masks, _, _ = _hand_case()
    crit = Mask2FormerLoss(num_classes=2, num_points=30)
    a = crit.loss_single(
        cls, masks, gt_labels, gt_masks, generator=torch.Generator().manual_seed(4)
    )
    b = crit.loss_single(
        cls, masks, gt_labels, gt_masks, generator=torch.Generator().manual_seed(4)
    )
    for x, y in zip(a, b, strict=True):
        assert torch.isfinite(x) and x.item() == y.item()


def _deep_predictions(num_sets: int, batch: int, q: int, k: int, h: int, w: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(batch, q, k + 1, generator=g).requires_grad_(),
            torch.randn(batch, q, h, w, generator=g).requires_grad_(),
        )
        for _ in range(num_sets)
    ]


def test_deep_supervision_keys_gradients_and_unlabelled_image() -> None:
    k = 4
    seg = torch.randint(0, k, (2, 32, 32), generator=torch.Generator().manual_seed(8))
    seg[0, :5] = 255
    seg[1] = 255  # second image has no labelled pixel
    targets = semantic_to_instance_targets(seg)
    preds = _deep_predictions(10, 2, 6, k, 8, 8, seed=11)
    crit = Mask2FormerLoss(num_classes=k, num_points=64)
    losses = crit(preds, targets, generator=torch.Generator().manual_seed(0))

    names = ["loss_cls", "loss_mask", "loss_dice"]
    expected = names + [f"d{i}.{n}" for i in range(9) for n in names]
    assert list(losses) == expected
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    for cls_logits, mask_logits in preds:
        assert cls_logits.grad is not None and cls_logits.grad.abs().sum() > 0
        assert mask_logits.grad is not None and mask_logits.grad[0].abs().sum() > 0
        # The unlabelled image's queries are all "no object": no mask gradient.
        assert mask_logits.grad[1].abs().sum() == 0


def test_all_ignore_batch_gives_zero_mask_losses_and_weighted_ce() -> None:
    k = 3
    targets = semantic_to_instance_targets(torch.full((1, 16, 16), 255, dtype=torch.long))
    preds = _deep_predictions(2, 1, 5, k, 4, 4, seed=12)
    crit = Mask2FormerLoss(num_classes=k, num_points=32)
    losses = crit(preds, targets)
    assert list(losses) == ["loss_cls", "loss_mask", "loss_dice"] + [
        "d0.loss_cls",
        "d0.loss_mask",
        "d0.loss_dice",
    ]
    assert losses["loss_mask"].item() == 0.0 and losses["loss_dice"].item() == 0.0
    # All queries are "no object" with the same weight: the weighted mean is the plain mean.
    logits = preds[-1][0].detach().double()[0]
    ref = 2.0 * float((torch.logsumexp(logits, -1) - logits[:, k]).mean())
    assert losses["loss_cls"].item() == pytest.approx(ref, rel=1e-5)
    sum(losses.values()).backward()
    for cls_logits, mask_logits in preds:
        assert cls_logits.grad.abs().sum() > 0
        assert mask_logits.grad is not None and mask_logits.grad.abs().sum() == 0


def test_default_configuration_runs_at_model_scale() -> None:
    """Recipe sizes (100 queries, 12,544 points, 1/4-scale masks vs 512 labels), small batch."""
    torch.manual_seed(0)
    seg = torch.randint(0, 19, (1, 512, 512))
    seg[:, :100] = 255
    targets = semantic_to_instance_targets(seg)
    preds = _deep_predictions(2, 1, 100, 19, 128, 128, seed=13)
    crit = Mask2FormerLoss()
    assert crit.matcher.num_points == 12544
    assert crit.class_weight.tolist() == pytest.approx([1.0] * 19 + [0.1])
    losses = crit(preds, targets, generator=torch.Generator().manual_seed(1))
    assert len(losses) == 6 and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert "class_weight" not in crit.state_dict()


def test_instance_targets_on_other_dtypes() -> None:
    """uint8 / long masks and an explicit InstanceTargets give the same loss as bool."""
    preds = _deep_predictions(1, 1, 3, 2, 4, 4, seed=14)
    m = torch.zeros(1, 8, 8, dtype=torch.bool)
    m[0, :4] = True
    crit = Mask2FormerLoss(num_classes=2, num_points=16)
    vals = []
    for masks in (m, m.to(torch.uint8), m.long()):
        out = crit(
            preds, [InstanceTargets(torch.tensor([1]), masks)], torch.Generator().manual_seed(2)
        )
        vals.append([v.item() for v in out.values()])
    assert vals[0] == vals[1] == vals[2]
