"""Evaluation results as ``metrics.json`` and a markdown table shaped like Tables 3-4."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from ..atomic import write_text
from .metrics import iou_per_class, mean_iou, pixel_accuracy


def target_results(cm: torch.Tensor, class_names: Sequence[str]) -> dict:
    iou = iou_per_class(cm)
    return {
        "mIoU": 100 * mean_iou(cm),
        "aAcc": 100 * pixel_accuracy(cm),
        "IoU": {
            n: (None if math.isnan(v) else 100 * v)
            for n, v in zip(class_names, iou.tolist(), strict=True)
        },
        "pixels": int(cm.sum()),
    }


def summarise(confusions: dict[str, torch.Tensor], class_names: Sequence[str]) -> dict:
    """Per-target results and ``Avg.``, the mean of the per-target mIoUs (docs/method.md §4)."""
    targets = {t: target_results(cm.cpu(), class_names) for t, cm in confusions.items()}
    miou = [r["mIoU"] for r in targets.values()]
    return {"targets": targets, "Avg": sum(miou) / len(miou) if miou else float("nan")}


def fmt(v: float | None) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"


def markdown_table(results: dict, class_names: Sequence[str]) -> str:
    """mIoU per target and Avg. (Tables 3-4), then per-class IoU, one row per target."""
    targets = results["targets"]
    lines = [
        "| " + " | ".join([*targets, "Avg."]) + " |",
        "|" + "---:|" * (len(targets) + 1),
        "| "
        + " | ".join([*(fmt(r["mIoU"]) for r in targets.values()), fmt(results["Avg"])])
        + " |",
        "",
        "| target | " + " | ".join(class_names) + " | mIoU |",
        "|---|" + "---:|" * (len(class_names) + 1),
    ]
    for name, r in targets.items():
        cells = [fmt(r["IoU"][c]) for c in class_names]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {fmt(r['mIoU'])} |")
    return "\n".join(lines) + "\n"


def write_report(results: dict, class_names: Sequence[str], out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "metrics.json", json.dumps(results, indent=2))
    write_text(out / "metrics.md", markdown_table(results, class_names))
    return out / "metrics.json"
