"""Evaluation: confusion matrices, IoU/mIoU, and the paper-style report."""

from .metrics import all_reduce_, confusion_matrix, iou_per_class, mean_iou, pixel_accuracy
from .report import markdown_table, summarise, write_report

__all__ = [
    "all_reduce_",
    "confusion_matrix",
    "iou_per_class",
    "markdown_table",
    "mean_iou",
    "pixel_accuracy",
    "summarise",
    "write_report",
]
