"""Hungarian matching of Mask2Former queries to ground-truth masks.

Semantics follow mmdet 3.x ``Mask2FormerHead._get_target_single`` + ``HungarianAssigner``
with the match costs of the mmseg / RecycleLoRA configuration::

    ClassificationCost(weight=2.0)                       -> -softmax(cls)[gt_class]
    CrossEntropyLossCost(weight=5.0, use_sigmoid=True)   -> mean-over-points sigmoid BCE
    DiceCost(weight=5.0, pred_act=True, eps=1.0)         -> naive dice on sigmoid(mask)

Per image, the same ``num_points`` uniform random points are read from every predicted mask
(1/4 scale) and every ground-truth mask (full scale); the summed cost matrix is solved on CPU
with ``scipy.optimize.linear_sum_assignment``.

Costs are computed in float32 with autocast disabled, as Mask2Former does: a bf16 matmul over
12,544 points is off by ~1e-3 (enough to flip near-tied assignments) and an fp16 one overflows.
All prediction sets of a batch (deep supervision) are solved from one device->host copy of
their costs, and their indices come back in one host->device copy (``assign``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from .point_sample import point_sample, rand_points

__all__ = [
    "HungarianMatcher",
    "assign",
    "classification_cost",
    "dice_cost",
    "sigmoid_bce_cost",
]


def classification_cost(cls_logits: Tensor, gt_labels: Tensor) -> Tensor:
    """Unweighted class cost: minus the softmax probability of each GT class.

    Args:
        cls_logits: (Q, K+1) class logits, the last column being "no object".
        gt_labels: (G,) class ids in ``[0, K)``.

    Returns:
        (Q, G) float32 costs.
    """
    with torch.autocast(cls_logits.device.type, enabled=False):
        return -cls_logits.float().softmax(-1)[:, gt_labels]


def sigmoid_bce_cost(point_logits: Tensor, point_targets: Tensor) -> Tensor:
    """Unweighted pairwise mask cost: sigmoid BCE of every query vs every GT, mean over points.

    Soft targets (bilinearly sampled GT) are allowed:
    ``cost[q, g] = mean_p [t * bce(x, 1) + (1 - t) * bce(x, 0)]``.

    Args:
        point_logits: (Q, P) mask logits at the points.
        point_targets: (G, P) GT mask values in [0, 1] at the same points.

    Returns:
        (Q, G) float32 costs.
    """
    with torch.autocast(point_logits.device.type, enabled=False):
        x = point_logits.float()
        t = point_targets.float()
        pos = F.binary_cross_entropy_with_logits(x, torch.ones_like(x), reduction="none")
        neg = F.binary_cross_entropy_with_logits(x, torch.zeros_like(x), reduction="none")
        return (pos @ t.T + neg @ (1.0 - t).T) / x.shape[1]


def dice_cost(point_logits: Tensor, point_targets: Tensor, eps: float = 1.0) -> Tensor:
    """Unweighted pairwise naive dice cost on sigmoid predictions.

    ``cost[q, g] = 1 - (2 * sum_p(s * t) + eps) / (sum_p(s) + sum_p(t) + eps)``, ``s = sigmoid``.

    Args:
        point_logits: (Q, P) mask logits at the points.
        point_targets: (G, P) GT mask values in [0, 1] at the same points.
        eps: smoothing (1.0 in the Mask2Former configuration).

    Returns:
        (Q, G) float32 costs.
    """
    with torch.autocast(point_logits.device.type, enabled=False):
        s = point_logits.float().sigmoid()
        t = point_targets.float()
        numerator = 2.0 * (s @ t.T)
        denominator = s.sum(-1)[:, None] + t.sum(-1)[None, :]
        return 1.0 - (numerator + eps) / (denominator + eps)


def assign(costs: Sequence[Tensor]) -> list[tuple[Tensor, Tensor]]:
    """Solve every (Q, G_i) cost matrix with one transfer each way.

    The matrices (any number of images and prediction sets, on one device) are concatenated
    along G, copied to the host once and solved block by block; all indices return in one
    tensor, split per block on the device.

    Returns:
        One pair ``(query_idx, gt_idx)`` of int64 tensors per matrix, on the matrices' device,
        sorted by query index; ``min(Q, G_i)`` matches each.

    Raises:
        FloatingPointError: a cost is NaN or infinite, i.e. the predictions are non-finite.
    """
    if not costs:
        return []
    device = costs[0].device
    widths = [c.shape[1] for c in costs]
    host = torch.cat(list(costs), dim=1).detach().cpu().numpy().astype(np.float64)
    if not np.isfinite(host).all():
        raise FloatingPointError(
            "Hungarian matching got non-finite costs: the predicted class or mask logits "
            "contain NaN or Inf"
        )
    solved = [linear_sum_assignment(b) for b in np.split(host, np.cumsum(widths)[:-1], axis=1)]
    flat = np.concatenate(solved, axis=1).astype(np.int64)  # (2, N): rows, then columns
    query_idx, gt_idx = torch.from_numpy(flat).to(device)
    counts = [r.size for r, _ in solved]
    return list(zip(query_idx.split(counts), gt_idx.split(counts), strict=True))


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to GT masks minimising the weighted cost (mmdet)."""

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_mask: float = 5.0,
        cost_dice: float = 5.0,
        num_points: int = 12544,
        dice_eps: float = 1.0,
    ) -> None:
        super().__init__()
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.num_points = num_points
        self.dice_eps = dice_eps

    def extra_repr(self) -> str:
        return (
            f"cost_class={self.cost_class}, cost_mask={self.cost_mask}, "
            f"cost_dice={self.cost_dice}, num_points={self.num_points}"
        )

    @torch.no_grad()
    def cost_matrix(
        self,
        cls_logits: Tensor,
        point_logits: Tensor,
        gt_labels: Tensor,
        point_targets: Tensor,
    ) -> Tensor:
        """Weighted total cost of one image, in float32 whatever autocast is active.

        Args:
            cls_logits: (Q, K+1) class logits.
            point_logits: (Q, P) mask logits at the sampled points.
            gt_labels: (G,) GT class ids.
            point_targets: (G, P) GT mask values at the same points.

        Returns:
            (Q, G) float32 cost.
        """
        return (
            self.cost_class * classification_cost(cls_logits, gt_labels)
            + self.cost_mask * sigmoid_bce_cost(point_logits, point_targets)
            + self.cost_dice * dice_cost(point_logits, point_targets, self.dice_eps)
        )

    @torch.no_grad()
    def image_cost(
        self,
        cls_logits: Tensor,
        mask_logits: Tensor,
        gt_labels: Tensor,
        gt_masks: Tensor,
        points: Tensor,
    ) -> Tensor:
        """Sample one image's masks at ``points`` and return its weighted cost.

        Args:
            cls_logits: (Q, K+1) class logits.
            mask_logits: (Q, h, w) mask logits (any resolution).
            gt_labels: (G,) GT class ids.
            gt_masks: (G, H, W) binary GT masks (any resolution and dtype).
            points: (P, 2) points ``(x, y)`` in [0, 1], shared by all queries and GTs.

        Returns:
            (Q, G) float32 cost.
        """
        with torch.autocast(mask_logits.device.type, enabled=False):
            pts = points[None].float()
            point_logits = point_sample(mask_logits[None].float(), pts)[0]  # (Q, P)
            point_targets = point_sample(gt_masks[None].float(), pts)[0]  # (G, P)
            return self.cost_matrix(cls_logits, point_logits, gt_labels, point_targets)

    @torch.no_grad()
    def batch_costs(
        self,
        cls_logits: Tensor,
        mask_logits: Tensor,
        gt_labels: Sequence[Tensor],
        gt_masks: Sequence[Tensor],
        points: Sequence[Tensor] | Tensor | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
    ) -> list[Tensor]:
        """The B (Q, G_i) float32 costs of one prediction set (arguments as ``forward``)."""
        batch, num_queries = cls_logits.shape[:2]
        if len(gt_labels) != batch or len(gt_masks) != batch:
            raise ValueError("need one gt_labels and one gt_masks entry per image")
        if points is None:
            points = rand_points((batch, self.num_points, 2), cls_logits.device, generator)
        return [
            self.image_cost(cls_logits[i], mask_logits[i], gt_labels[i], gt_masks[i], points[i])
            if gt_labels[i].numel() > 0
            else cls_logits.new_zeros((num_queries, 0), dtype=torch.float32)
            for i in range(batch)
        ]

    @torch.no_grad()
    def match_sets(
        self,
        predictions: Sequence[tuple[Tensor, Tensor]],
        gt_labels: Sequence[Tensor],
        gt_masks: Sequence[Tensor],
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
    ) -> list[list[tuple[Tensor, Tensor]]]:
        """Match every prediction set of a batch (deep supervision) in one ``assign``.

        Gives what calling ``forward`` on each set in turn with the same generator gives:
        each set's points are drawn in set order.

        Args:
            predictions: L pairs ``(cls_logits (B, Q, K+1), mask_logits (B, Q, h, w))``.
            gt_labels, gt_masks, generator: as in ``forward``.

        Returns:
            L lists of B pairs ``(query_idx, gt_idx)``, as ``forward`` returns them.
        """
        costs = [
            cost
            for cls_logits, mask_logits in predictions
            for cost in self.batch_costs(
                cls_logits, mask_logits, gt_labels, gt_masks, generator=generator
            )
        ]
        matches = assign(costs)
        batch = len(gt_labels)
        return [matches[s * batch : (s + 1) * batch] for s in range(len(predictions))]

    @torch.no_grad()
    def forward(
        self,
        cls_logits: Tensor,
        mask_logits: Tensor,
        gt_labels: Sequence[Tensor],
        gt_masks: Sequence[Tensor],
        points: Sequence[Tensor] | Tensor | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
    ) -> list[tuple[Tensor, Tensor]]:
        """Match every image of a batch.

        Args:
            cls_logits: (B, Q, K+1) class logits.
            mask_logits: (B, Q, h, w) mask logits.
            gt_labels: B tensors (G_i,) of class ids.
            gt_masks: B tensors (G_i, H, W) of binary masks (G_i may be 0).
            points: optional (B, P, 2) (or B tensors (P, 2)) points replacing the uniform
                random draw, e.g. to make matching exact in tests.
            generator: optional ``torch.Generator`` for the random points, or one per image;
                on any device (see ``point_sample.generator_on``).

        Returns:
            B pairs ``(query_idx, gt_idx)`` of int64 tensors on ``cls_logits.device``, sorted
            by query index; ``min(Q, G_i)`` matches per image, none when ``G_i == 0``.

        Raises:
            FloatingPointError: the predictions are non-finite.
        """
        return assign(
            self.batch_costs(cls_logits, mask_logits, gt_labels, gt_masks, points, generator)
        )
