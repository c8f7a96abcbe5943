"""Segmentation metrics (docs/method.md §4): an int64 confusion matrix per target, IoU per
class, and mIoU over the classes whose union is non-zero."""

from __future__ import annotations

import torch
import torch.distributed as dist


def confusion_matrix(
    pred: torch.Tensor, label: torch.Tensor, num_classes: int, ignore_index: int = 255
) -> torch.Tensor:
    """(K, K) int64 counts, rows = ground truth, columns = prediction; ``ignore_index`` skipped.

    pred, label: integer tensors of the same shape, on any device (the result stays there).
    """
    if pred.shape != label.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(label.shape)} differ")
    valid = label != ignore_index
    label, pred = label[valid].long(), pred[valid].long()
    if label.numel() and (int(label.max()) >= num_classes or int(label.min()) < 0):
        raise ValueError(
            f"label values must be in [0, {num_classes}) or {ignore_index}, got "
            f"[{int(label.min())}, {int(label.max())}]: were the labels converted to train ids?"
        )
    idx = label * num_classes + pred
    return torch.bincount(idx, minlength=num_classes * num_classes).view(num_classes, num_classes)


def all_reduce_(cm: torch.Tensor) -> torch.Tensor:
    """Sum a confusion matrix over DDP ranks in place (no-op outside distributed runs)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(cm, op=dist.ReduceOp.SUM)
    return cm


def iou_per_class(cm: torch.Tensor) -> torch.Tensor:
    """float64 (K,): intersection / union, NaN where the union is empty (class absent from both)."""
    cm = cm.double()
    inter = cm.diagonal()
    union = cm.sum(0) + cm.sum(1) - inter
    return torch.where(union > 0, inter / union.clamp_min(1), torch.full_like(inter, float("nan")))


def mean_iou(cm: torch.Tensor) -> float:
    """Mean IoU over classes with a non-empty union (NaN if there is none)."""
    iou = iou_per_class(cm)
    present = ~iou.isnan()
    return float(iou[present].mean()) if bool(present.any()) else float("nan")


def pixel_accuracy(cm: torch.Tensor) -> float:
    total = cm.sum()
    return float(cm.diagonal().sum().double() / total) if int(total) else float("nan")
