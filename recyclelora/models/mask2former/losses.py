"""Mask2Former training criterion for semantic segmentation (plain PyTorch + scipy).

Semantics follow mmdet 3.x ``Mask2FormerHead._loss_by_feat_single`` / ``MaskFormerHead.
loss_by_feat`` driven by mmseg 1.x (``seg_data_to_instance_data``), with the RecycleLoRA
configuration (docs/method.md §2):

- targets: one binary mask per class present in the label map; ignore (255) pixels are
  negatives in every mask;
- class: cross-entropy over K+1 classes, class weights ``[1]*K + [0.1]``, weighted mean
  (``sum_i w[y_i] * ce_i / sum_i w[y_i]``, per rank), loss weight 2.0;
- mask: sigmoid BCE at 12,544 importance-sampled points per matched mask, summed and divided
  by ``num_total_masks * num_points``, loss weight 5.0;
- dice: naive dice (eps 1) at the same points, summed over masks and divided by
  ``num_total_masks``, loss weight 5.0;
- ``num_total_masks`` is averaged over DDP ranks and clamped to >= 1;
- deep supervision: every prediction set is matched and weighed on its own; the last set
  gives ``loss_cls/loss_mask/loss_dice``, the others ``d{i}.loss_*`` (i = 0 first); all
  sets are matched together, in one host round trip (``HungarianMatcher.match_sets``);
- matching costs and loss sums are float32 with autocast disabled (see ``matcher``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .matcher import HungarianMatcher
from .point_sample import generator_on, point_sample, uncertain_point_coords_with_randomness

__all__ = [
    "InstanceTargets",
    "Mask2FormerLoss",
    "dice_loss",
    "reduce_mean",
    "semantic_to_instance_targets",
]

# mmdet's weight_reduce_loss adds float32 eps to every avg_factor.
_AVG_EPS = torch.finfo(torch.float32).eps


class InstanceTargets(NamedTuple):
    """Per-image Mask2Former targets.

    labels: (n,) int64 class ids present in the image.
    masks: (n, H, W) binary masks (bool from ``semantic_to_instance_targets``).
    """

    labels: Tensor
    masks: Tensor


def semantic_to_instance_targets(
    sem_seg: Tensor | Sequence[Tensor], ignore_index: int = 255
) -> list[InstanceTargets]:
    """Turn semantic label maps into one binary mask per present class (mmseg semantics).

    Classes are listed in increasing id order. Pixels labelled ``ignore_index`` belong to no
    mask, i.e. they count as background for every class, exactly as mmseg's
    ``seg_data_to_instance_data`` does. An image with no labelled pixel gives ``n = 0``.

    Args:
        sem_seg: (B, H, W) or (B, 1, H, W) integer label map, or B tensors (H, W) / (1, H, W).
        ignore_index: label of unlabelled pixels.

    Returns:
        B ``InstanceTargets`` with labels (n_i,) int64 and masks (n_i, H, W) bool.
    """
    out: list[InstanceTargets] = []
    for seg in sem_seg:
        if seg.dim() == 3:
            seg = seg.squeeze(0)
        if seg.dim() != 2:
            raise ValueError(f"expected a (H, W) label map, got {tuple(seg.shape)}")
        classes = torch.unique(seg)
        labels = classes[classes != ignore_index].long()
        masks = seg.unsqueeze(0) == labels.to(seg.dtype)[:, None, None]
        out.append(InstanceTargets(labels, masks))
    return out


def reduce_mean(value: Tensor) -> Tensor:
    """Mean of ``value`` over DDP ranks (identity without an initialised process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    value = value.clone()
    dist.all_reduce(value.div_(dist.get_world_size()), op=dist.ReduceOp.SUM)
    return value


def dice_loss(point_logits: Tensor, point_targets: Tensor, eps: float = 1.0) -> Tensor:
    """Per-mask naive dice loss on sigmoid predictions (mmdet ``naive_dice=True``).

    Args:
        point_logits: (N, P) logits.
        point_targets: (N, P) targets in [0, 1].
        eps: smoothing added to numerator and denominator.

    Returns:
        (N,) ``1 - (2 * sum(s * t) + eps) / (sum(s) + sum(t) + eps)``.
    """
    s = point_logits.sigmoid()
    numerator = 2.0 * (s * point_targets).sum(-1)
    denominator = s.sum(-1) + point_targets.sum(-1)
    return 1.0 - (numerator + eps) / (denominator + eps)


class Mask2FormerLoss(nn.Module):
    """Hungarian-matched class + point-sampled mask/dice losses with deep supervision."""

    def __init__(
        self,
        num_classes: int = 19,
        matcher: HungarianMatcher | None = None,
        loss_cls_weight: float = 2.0,
        loss_mask_weight: float = 5.0,
        loss_dice_weight: float = 5.0,
        no_object_weight: float = 0.1,
        num_points: int = 12544,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
        dice_eps: float = 1.0,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher if matcher is not None else HungarianMatcher(num_points=num_points)
        self.loss_cls_weight = loss_cls_weight
        self.loss_mask_weight = loss_mask_weight
        self.loss_dice_weight = loss_dice_weight
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.dice_eps = dice_eps
        class_weight = torch.ones(num_classes + 1)
        class_weight[-1] = no_object_weight
        # Not persistent: a constant of the recipe, kept out of checkpoints.
        self.register_buffer("class_weight", class_weight, persistent=False)

    def loss_single(
        self,
        cls_logits: Tensor,
        mask_logits: Tensor,
        gt_labels: Sequence[Tensor],
        gt_masks: Sequence[Tensor],
        indices: Sequence[tuple[Tensor, Tensor]] | None = None,
        points: Tensor | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Losses of one prediction set.

        Args:
            cls_logits: (B, Q, K+1) class logits.
            mask_logits: (B, Q, h, w) mask logits (1/4 scale in the model).
            gt_labels: B tensors (G_i,) int64.
            gt_masks: B tensors (G_i, H, W), binary, any dtype, any resolution.
            indices: optional precomputed matching, B pairs (query_idx, gt_idx); by default
                ``self.matcher`` is run.
            points: optional (N, P, 2) points for the N matched masks (ordered by image, then
                query index) replacing importance sampling, e.g. for exact tests.
            generator: optional ``torch.Generator`` for matching and point sampling, or one per
                image (draws then independent of how the batch is split over DDP ranks); on
                any device (``point_sample.generator_on``).

        Returns:
            ``(loss_cls, loss_mask, loss_dice)``, scalars, loss weights applied.
        """
        batch, num_queries = cls_logits.shape[:2]
        if indices is None:
            indices = self.matcher(
                cls_logits, mask_logits, gt_labels, gt_masks, generator=generator
            )
        device = cls_logits.device

        # Sort each image's matches by query: the order mmdet's boolean indexing produces.
        batch_idx, query_idx, matched_labels, matched_gt = [], [], [], []
        for i, (q, g) in enumerate(indices):
            q = q.to(device)
            g = g.to(device)
            order = torch.argsort(q)
            q, g = q[order], g[order]
            batch_idx.append(torch.full_like(q, i))
            query_idx.append(q)
            matched_labels.append(gt_labels[i].to(device)[g])
            matched_gt.append(g)
        batch_idx_t = torch.cat(batch_idx)
        query_idx_t = torch.cat(query_idx)

        # Sums over 12,544 points per mask and over all queries: float32 under any autocast.
        with torch.autocast(device.type, enabled=False):
            # Classification: unmatched queries learn "no object" (id K) at weight 0.1.
            labels = torch.full(
                (batch, num_queries), self.num_classes, dtype=torch.long, device=device
            )
            labels[batch_idx_t, query_idx_t] = torch.cat(matched_labels).long()
            labels = labels.flatten()
            class_weight = self.class_weight.to(device)
            ce = F.cross_entropy(
                cls_logits.flatten(0, 1).float(), labels, weight=class_weight, reduction="none"
            )
            # mmdet normalises by this rank's weight sum; the mean over ranks (as for the masks
            # below) makes a DDP run compute the single-process loss; identical on one process.
            cls_avg = reduce_mean(class_weight[labels].sum())
            loss_cls = self.loss_cls_weight * ce.sum() / (cls_avg + _AVG_EPS)

            # torch.full fills on the device; torch.tensor would copy from the host and wait.
            num_masks = torch.full((), float(query_idx_t.numel()), device=device)
            num_total_masks = reduce_mean(num_masks).clamp(min=1.0)

            pred = mask_logits[batch_idx_t, query_idx_t]  # (N, h, w)
            if pred.shape[0] == 0:
                # No GT anywhere in this rank's batch: zero losses still tied to the graph.
                zero = pred.float().sum()
                return loss_cls, zero, zero.clone()
            pred = pred.unsqueeze(1).float()
            point_logits, point_targets = self._sample_points(
                pred, gt_masks, matched_gt, points, generator
            )
            num_points = point_logits.shape[1]
            loss_dice = (
                self.loss_dice_weight
                * dice_loss(point_logits, point_targets, self.dice_eps).sum()
                / (num_total_masks + _AVG_EPS)
            )
            bce = F.binary_cross_entropy_with_logits(point_logits, point_targets, reduction="sum")
            loss_mask = self.loss_mask_weight * bce / (num_total_masks * num_points + _AVG_EPS)
        return loss_cls, loss_mask, loss_dice

    def _sample_points(
        self,
        pred: Tensor,
        gt_masks: Sequence[Tensor],
        matched_gt: Sequence[Tensor],
        points: Tensor | None,
        generator: torch.Generator | Sequence[torch.Generator] | None,
    ) -> tuple[Tensor, Tensor]:
        """(N, P) logits of the matched masks ``pred`` (N, 1, h, w) and their GT at the points.

        Points are importance-sampled per image (with that image's generator when one per
        image is given) unless ``points`` (N, P, 2) are passed.
        """
        device = pred.device
        groups = [g.numel() for g in matched_gt]
        with torch.no_grad():
            if points is None:
                per_image = isinstance(generator, (list, tuple))
                points = torch.cat(
                    [
                        uncertain_point_coords_with_randomness(
                            part,
                            self.num_points,
                            self.oversample_ratio,
                            self.importance_sample_ratio,
                            generator=generator[i] if per_image else generator,
                        )
                        for i, part in enumerate(pred.split(groups))
                        if part.shape[0] > 0
                    ]
                )
            points = points.to(device=device, dtype=torch.float32)
            # Read each image's full-resolution GT at its matched masks' points; gathering
            # and concatenating the (N, H, W) masks first would only copy memory.
            point_targets = torch.cat(
                [
                    point_sample(gt_masks[i].to(device)[g].unsqueeze(1).float(), pts).squeeze(1)
                    for i, (g, pts) in enumerate(zip(matched_gt, points.split(groups), strict=True))
                    if g.numel() > 0
                ]
            )  # (N, P)
        return point_sample(pred, points).squeeze(1), point_targets

    def forward(
        self,
        predictions: Sequence[tuple[Tensor, Tensor]],
        targets: Sequence[InstanceTargets],
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
    ) -> dict[str, Tensor]:
        """Deep-supervised losses.

        Args:
            predictions: L pairs ``(cls_logits (B, Q, K+1), mask_logits (B, Q, h, w))``, in
                decoder order: the set before the first layer first, the final set last
                (L = 10 for 9 decoder layers).
            targets: B ``InstanceTargets`` (see ``semantic_to_instance_targets``).
            generator: optional ``torch.Generator`` for matching and point sampling, or one per
                image (draws then independent of how the batch is split over DDP ranks), on
                any device: one elsewhere than the predictions is replaced by a generator
                derived from it there (``point_sample.generator_on``). Per image, all sets'
                matching points are drawn first (set order), then all sets' loss points.

        Returns:
            ``loss_cls``, ``loss_mask``, ``loss_dice`` for the last set and
            ``d{i}.loss_cls``, ``d{i}.loss_mask``, ``d{i}.loss_dice`` for set i < L-1.
            The training loss is the sum of all values.
        """
        if len(predictions) == 0:
            raise ValueError("need at least one prediction set")
        device = predictions[0][0].device
        gt_labels = [t.labels.to(device) for t in targets]
        # Convert (and move) the masks once, not once per prediction set.
        gt_masks = [t.masks.to(device=device, dtype=torch.float32) for t in targets]
        # Draw on the predictions' device: generators elsewhere are replaced here, once.
        if isinstance(generator, (list, tuple)):
            generator = [generator_on(device, g) for g in generator]
        else:
            generator = generator_on(device, generator)
        # All sets matched together: one device->host copy of costs, one copy of indices back.
        matches = self.matcher.match_sets(predictions, gt_labels, gt_masks, generator=generator)
        per_set = [
            self.loss_single(
                cls_logits, mask_logits, gt_labels, gt_masks, indices=idx, generator=generator
            )
            for (cls_logits, mask_logits), idx in zip(predictions, matches, strict=True)
        ]
        # mmdet's key order: the final set first, then d0 (before the first layer), d1, ...
        names = ("loss_cls", "loss_mask", "loss_dice")
        losses: dict[str, Tensor] = dict(zip(names, per_set[-1], strict=True))
        for i, values in enumerate(per_set[:-1]):
            losses.update(
                {f"d{i}.{name}": value for name, value in zip(names, values, strict=True)}
            )
        return losses
